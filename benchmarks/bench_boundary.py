"""One validation boundary at scale: 8 layers x 32 heads, 5 tasks, 20 pairs, 200 permutations.

DESIGN section 5 budget: <= 30 s on 2 CPU cores (382 s with the exact store). A Llama config with
8 layers, hidden 1024, 32 heads (head_dim 32) and 8 KV heads is built on the ``meta`` device (no
weights; only the shapes matter); 5 tasks get ``--samples`` per-sample gradients each (random,
through ``FisherCollector.add_gradients``, so the Fisher sums and the sketches are the real ones)
into the sketch store, and the QK-OV heatmaps of all 20 ordered task pairs are computed as
``QKOVInterferenceMonitor`` does at a boundary: signed pair scores, Fisher overlap, conflict
cosine, 200-permutation tests per (layer, head, block) and BY over the 8 x (32 + 8 + 8 + 32) = 640
tests of each pair.

Run: ``python benchmarks/bench_boundary.py [--samples 32] [--threads 2] [--sketch-dim 256]``.
"""

from __future__ import annotations

import argparse
import itertools
import time
import warnings

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from fisher_callbacks.fisher import FisherCollector
from fisher_callbacks.interference import QKOVInterferenceMetric
from fisher_callbacks.layouts import AttentionLayout
from fisher_callbacks.store import DEFAULT_SKETCH_DIM

BUDGET_S = 30.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sketch-dim", type=int, default=DEFAULT_SKETCH_DIM)
    ap.add_argument("--permutations", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = AutoConfig.for_model(
        "llama",
        num_hidden_layers=8,
        hidden_size=1024,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=2816,
        vocab_size=1024,
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    layout = AttentionLayout.from_model(model)
    tasks = [f"task{i}" for i in range(5)]
    collector = FisherCollector(
        model, layout, store="sketch", sketch_dim=args.sketch_dim, max_samples_per_task=args.samples
    )
    g = torch.Generator().manual_seed(0)
    chunk = 8
    base = {
        n: torch.randn(chunk, *layout.param_shapes[n], generator=g) for n in layout.monitored_parameters()
    }
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for ti, task in enumerate(tasks):
            for start in range(0, args.samples, chunk):
                factor = torch.randn(chunk, generator=g) + 0.1 * ti
                grads = {n: x * factor.view(-1, 1, 1) for n, x in base.items()}
                collector.add_gradients(grads, task, list(range(start, start + chunk)), check_finite=False)
                del grads
    fill = time.perf_counter() - t0
    metric = QKOVInterferenceMetric(layout, collector, variant="signed", n_permutations=args.permutations)
    pairs = list(itertools.permutations(tasks, 2))
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for a, b in pairs:
            hm = metric.compute_heatmap(a, b)
    total = time.perf_counter() - t0
    print(
        f"bench_boundary: 8 layers x 32 heads (8 KV), {len(tasks)} tasks x {args.samples} samples, "
        f"sketch_dim {args.sketch_dim} ({collector.bytes_per_sample / 2**20:.2f} MB/sample), "
        f"{torch.get_num_threads()} threads"
    )
    print(f"  ingest of {len(tasks) * args.samples} samples: {fill:.1f} s")
    print(
        f"  boundary: {len(pairs)} pairs, {hm.stats['num_tests']} tests each, {args.permutations} "
        f"permutations: {total:.1f} s ({total / len(pairs):.2f} s a pair); budget {BUDGET_S:.0f} s "
        f"-> {'OK' if total <= BUDGET_S else 'OVER'}"
    )


if __name__ == "__main__":
    main()
