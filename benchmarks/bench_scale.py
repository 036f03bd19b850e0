"""Scale: what one stored sample costs, how many fit in 512 MB, a flagged step and a boundary.

Models are built from configs (random weights; cost does not depend on them):

- ``tiny``: Llama-GQA, 4 layers, hidden 256, 8 heads, 2 KV heads;
- ``135m``: Llama-GQA as SmolLM-135M: hidden 576, 30 layers, 9 heads, 3 KV heads, intermediate
  1536, vocab 49152;
- ``1b``: Llama, hidden 2048, 16 layers, 32 heads, 8 KV heads, intermediate 8192, vocab 32000.

Per model and store (``exact``, ``sketch`` at the default ``sketch_dim``) it prints:

- bytes per stored sample and samples per task in 512 MB (1 and 2 tasks), from the collector
  (the 1B and 7B rows use a model on the ``meta`` device: no weights are allocated);
- the flagged-step ratio: forward + backward + SGD step with per-sample capture, Fisher sum, EMA
  and the store's ingest, against a plain step (forward + backward + SGD), interleaved in one
  process (median over ``--repeats``); B = 4, T = 128;
- boundary seconds: one ``compute_heatmap`` of a task pair with the stored samples (64 per task
  for sketches; what fits for the exact store), signed scores, 200 permutations.

Run: ``python benchmarks/bench_scale.py [--models tiny,135m] [--repeats 3] [--threads 2]``.
The 1B flagged step (4 GB of weights, tens of seconds per step on 2 CPU cores; sketch store only,
no whole-batch variant, to fit in 16 GB) runs only with
``--models ...,1b`` and is skipped when the host has under 16 GB of RAM.
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import time
import warnings

import torch
from common import interleaved
from transformers import AutoConfig, AutoModelForCausalLM

from fisher_callbacks.capture import PerSampleGradientCapture
from fisher_callbacks.fisher import FisherCollector
from fisher_callbacks.interference import QKOVInterferenceMetric
from fisher_callbacks.layouts import AttentionLayout
from fisher_callbacks.losses import reduction_scale
from fisher_callbacks.store import exact_bytes_per_sample

CONFIGS = {
    "tiny": dict(
        num_hidden_layers=4,
        hidden_size=256,
        num_attention_heads=8,
        num_key_value_heads=2,
        intermediate_size=1024,
        vocab_size=512,
    ),
    "135m": dict(
        num_hidden_layers=30,
        hidden_size=576,
        num_attention_heads=9,
        num_key_value_heads=3,
        intermediate_size=1536,
        vocab_size=49152,
        tie_word_embeddings=True,
    ),
    "1b": dict(
        num_hidden_layers=16,
        hidden_size=2048,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=8192,
        vocab_size=32000,
    ),
    "7b": dict(  # Llama-2-7B shape (paper rows only)
        num_hidden_layers=32,
        hidden_size=4096,
        num_attention_heads=32,
        num_key_value_heads=32,
        intermediate_size=11008,
        vocab_size=32000,
    ),
    "8b-gqa": dict(  # Llama-3-8B shape (paper rows only)
        num_hidden_layers=32,
        hidden_size=4096,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        vocab_size=128256,
    ),
}
B, T = 4, 128


def build(name: str, device: str = "cpu"):
    cfg = AutoConfig.for_model("llama", max_position_embeddings=T, **CONFIGS[name])
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(cfg).float()


def memory_rows(name: str) -> None:
    model = build(name, "meta")
    layout = AttentionLayout.from_model(model)
    for store in ("exact", "sketch"):
        c = FisherCollector(model, layout, store=store)
        per = c.bytes_per_sample
        print(
            f"  {name:7s} {store:6s} bytes/sample {per / 2**20:9.3f} MB   samples/task in 512 MB: "
            f"1 task {c.store.capacity_per_task(1):6d}, 2 tasks {c.store.capacity_per_task(2):6d}"
        )


def batch(vocab: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def step_rows(name: str, repeats: int) -> None:
    model = build(name)
    layout = AttentionLayout.from_model(model)
    vocab = CONFIGS[name]["vocab_size"]
    data = batch(vocab, 0)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    capture = PerSampleGradientCapture(model, layout).attach()
    # The 1B model (4.4 GB of weights, as much again of gradients): the sketch store only, no
    # whole-batch variant (its [B, all monitored weights] alone is 2.7 GB), to fit in 24 GB.
    light = name == "1b"
    stores = ("sketch",) if light else ("exact", "sketch")
    collectors = {s: FisherCollector(model, layout, store=s, max_samples_per_task=64) for s in stores}
    exact_bytes = exact_bytes_per_sample(layout, torch.float32)
    scale = reduction_scale(data["labels"], "causal_lm", "token_mean")
    counter = {"id": 0}
    largest = max(math.prod(s) for s in collectors["sketch"].param_shapes.values()) * 4

    def plain() -> None:
        opt.zero_grad(set_to_none=True)
        model(**data).loss.backward()
        opt.step()

    def flagged(store: str, chunk: int | None):
        """What FisherMonitor does on a flagged step: the hooks stream each projection's
        per-sample gradients, ``chunk`` samples at a time, into the collector's ingest."""

        def run() -> None:
            opt.zero_grad(set_to_none=True)
            ids = list(range(counter["id"], counter["id"] + B))
            counter["id"] += B
            collector = collectors[store]
            ingest = collector.ingest(["train"] * B, ids, fisher=True, ema=True, store=True)
            capture.arm(scale=scale, sink=ingest, chunk=chunk)
            model(**data).loss.backward()
            sums = ingest.commit()
            capture.disarm()
            if collector.needs_whitening:  # the monitor's first captured step (not sketched)
                collector.initial_whitening(sums, ingest.count)
            opt.step()

        return run

    def buffered() -> None:
        """The whole-batch path (``[B, all monitored weights]`` held, then filed)."""
        opt.zero_grad(set_to_none=True)
        capture.arm(scale=scale)
        model(**data).loss.backward()
        grads = capture.pop()
        ids = list(range(counter["id"], counter["id"] + B))
        counter["id"] += B
        collectors["sketch"].add_gradients(grads, "train", ids, update_ema=True, check_finite=False)
        del grads
        opt.step()

    variants = {"sketch": flagged("sketch", 1)}
    if not light:
        variants = {
            "exact": flagged("exact", None),
            **variants,
            "sketch, chunk 4": flagged("sketch", 4),
            "sketch, buffered": buffered,
        }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # Memory. The sink sees every tensor the hooks make: the largest is the transient a
        # streamed step holds (one chunk of one projection). Peak RSS after warm-up (collector
        # state allocated, first whitening set) then shows what each path adds on top.
        plain()
        for _ in range(3):
            flagged("sketch", 1)()
        assert collectors["sketch"].num_stored("train") == 2 * B  # the first step set the whitening
        largest_seen = {"bytes": 0}
        ingest = collectors["sketch"].ingest(["train"] * B, list(range(-B, 0)), ema=True)

        def recording(n, g, start):
            largest_seen["bytes"] = max(largest_seen["bytes"], g.numel() * g.element_size())
            ingest(n, g, start)

        recording.head_major = ingest.head_major
        opt.zero_grad(set_to_none=True)
        capture.arm(scale=scale, sink=recording, chunk=1)
        model(**data).loss.backward()
        ingest.commit()
        capture.disarm()
        base = peak_rss_mb()
        flagged("sketch", 1)()
        streamed = peak_rss_mb()
        if not light:
            buffered()
        whole = peak_rss_mb()
        print(
            f"  {name:7s} memory: largest tensor a streamed step (chunk 1) hands over "
            f"{largest_seen['bytes'] / 2**20:.1f} MB (one sample of the largest projection "
            f"{largest / 2**20:.1f} MB); store {collectors['sketch'].stored_bytes / 2**20:.0f} MB "
            f"(cap 512 MB); peak RSS growth after warm-up: streamed step +{streamed - base:.0f} MB, "
            f"buffered step +{whole - streamed:.0f} MB (B x all monitored weights: "
            f"{B * exact_bytes / 2**20:.0f} MB{', not run' if light else ''})"
        )
        times = interleaved({"plain": plain, **variants}, repeats, warmup=1)
    for store in variants:
        print(
            f"  {name:7s} {store:17s} flagged step {times[store] / times['plain']:.2f}x "
            f"(plain {times['plain']:.2f} s, flagged {times[store]:.2f} s, median of {repeats})"
        )
    if light:  # the boundary's cost is the sketches' (model size matters little): bench_boundary.py
        capture.remove()
        return
    # boundary: fill a second task to 64 samples (copies of captured rows with new ids and random
    # scales) and time one heatmap of the pair with the tests
    for store, collector in collectors.items():
        opt.zero_grad(set_to_none=True)
        capture.arm(scale=scale)
        model(**data).loss.backward()
        grads = capture.pop()
        g = torch.Generator().manual_seed(1)
        cap = collector.store.capacity_per_task(2)
        for task in ("train", "ref"):
            while collector.num_stored(task) < min(64, cap):
                factor = torch.randn(B, generator=g)
                scaled = {n: x * factor.view(-1, *([1] * (x.dim() - 1))) for n, x in grads.items()}
                ids = list(range(counter["id"], counter["id"] + B))
                counter["id"] += B
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    collector.add_gradients(scaled, task, ids, check_finite=False)
                del scaled
        metric = QKOVInterferenceMetric(None, collector, variant="signed", n_permutations=200)
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            metric.compute_heatmap("ref", "train")
        sec = time.perf_counter() - t0
        print(
            f"  {name:7s} {store:6s} boundary heatmap {sec:.2f} s "
            f"({collector.num_stored('ref')} x {collector.num_stored('train')} samples, signed, 200 perms, "
            f"store {collector.stored_bytes / 2**20:.0f} MB)"
        )
        del grads
    capture.remove()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="tiny,135m")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    models = args.models.split(",")
    print(f"bench_scale: B={B}, T={T}, SGD, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("bytes per stored sample and samples per task in 512 MB (default sketch_dim):")
    for name in ("tiny", "135m", "1b", "7b", "8b-gqa"):
        memory_rows(name)
    ram_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    print("flagged step (ratio to a plain step, interleaved) and boundary seconds:")
    for name in models:
        if name == "1b" and ram_gb < 16:
            print(f"  1b      skipped: {ram_gb:.0f} GB RAM here (16 GB needed: weights, grads, Fisher state)")
            continue
        step_rows(name, args.repeats)


if __name__ == "__main__":
    main()
