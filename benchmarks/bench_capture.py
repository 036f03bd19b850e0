"""Overhead of per-sample capture against a plain forward+backward, measured interleaved.

Prints, for tiny GPT-2 and Llama-GQA (4 layers, hidden 256, B=16, T=64):
- flagged step: capture in the normal backward + Fisher sum, EMA and
  reservoir store (what FisherMonitor does)                          budget <= 1.15x
- non-flagged step: hooks attached, EMA from a 4-sample subset       budget <= 1.05x
- standalone per_sample_gradients (forward + autograd.grad)          (reference)
- the micro-batch-1 loop it replaces                                 (anchor 1.4-2.0x)
Usage: python benchmarks/bench_capture.py [--repeats 15]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import bench_model, interleaved, lm_data, verdict

import fisher_callbacks as fc
from fisher_callbacks.losses import per_sample_losses, reduction_scale


def run(kind: str, batch: int, seq: int, repeats: int, ema_k: int = 4) -> None:
    model = bench_model(kind).train()
    layout = fc.AttentionLayout.from_model(model)
    data = lm_data(batch, seq)
    params = [p for p in model.parameters() if p.requires_grad]
    capture = fc.PerSampleGradientCapture(model, layout)
    collector = fc.FisherCollector(model, layout, gradient_memory_mb=256, max_samples_per_task=32)
    scale = reduction_scale(data["labels"], "causal_lm", "token_mean")

    def zero():
        for p in params:
            p.grad = None

    def plain():
        zero()
        model(**data).loss.backward()

    counter = iter(range(10**9))

    def flagged():  # as FisherMonitor: streamed from the hooks into the collector's ingest
        capture.attach()
        zero()
        ingest = collector.ingest(["flagged"] * batch, [next(counter) for _ in range(batch)], ema=True)
        capture.arm(scale=scale, sink=ingest, chunk=batch)
        model(**data).loss.backward()
        ingest.commit()
        capture.disarm()

    def ema_step():
        capture.attach()
        zero()
        idx = torch.randperm(batch)[:ema_k]
        ingest = collector.ingest(["train"] * ema_k, fisher=False, ema=True, store=False)
        capture.arm(idx, scale=scale[idx], sink=ingest, chunk=ema_k)
        model(**data).loss.backward()
        ingest.commit()
        capture.disarm()

    def disarmed():
        capture.attach()
        zero()
        model(**data).loss.backward()

    def standalone():
        fc.per_sample_gradients(model, data, layout)

    def loop():
        names = layout.monitored_parameters()
        p = dict(model.named_parameters())
        for i in range(batch):
            one = {k: v[i : i + 1] for k, v in data.items()}
            torch.autograd.grad(per_sample_losses(model, one).sum(), [p[n] for n in names])

    fns = {
        "plain": plain,
        "flagged": flagged,
        "ema": ema_step,
        "disarmed": disarmed,
        "standalone": standalone,
        "loop": loop,
    }
    t = interleaved(fns, repeats)
    capture.remove()
    base = t["plain"]
    print(
        f"\n{kind}: {layout.num_layers} layers, {layout.num_heads} heads "
        f"({layout.num_kv_heads} KV), B={batch}, T={seq}; plain step {base * 1e3:.1f} ms"
    )
    rows = [
        ("flagged step, capture + store + Fisher/EMA", t["flagged"] / base, 1.15),
        (f"non-flagged step, EMA from {ema_k} samples", t["ema"] / base, 1.05),
        ("non-flagged step, hooks disarmed", t["disarmed"] / base, 1.05),
        ("per_sample_gradients (standalone)", t["standalone"] / base, None),
        ("micro-batch-1 loop (anchor 1.4-2.0x)", t["loop"] / base, None),
    ]
    for label, ratio, budget in rows:
        tag = f"budget <= {budget:.2f}x  {verdict(ratio, budget)}" if budget else ""
        print(f"  {label:<46} {ratio:5.2f}x  {tag}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--ema-samples", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads (ratios vs a plain step)")
    for kind in ("gpt2", "llama"):
        run(kind, args.batch, args.seq, args.repeats, args.ema_samples)


if __name__ == "__main__":
    main()
