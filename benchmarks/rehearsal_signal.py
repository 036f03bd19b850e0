"""A candidate signal for the early warning, measured: does the training batch pull the probe back?

The early warning reads only the probe drift, and on the tiny plateau control ("quarter math":
every batch three quarters the reference task, one quarter the new one) the drift is that of a
forgetting run until it bends (docs/early_warning.md, round 4). What bends it is rehearsal: the
reference samples in the training batches push the probe loss back down, harder the more it has
risen. This script measures that push, with the slow exact reference (a micro-batch-1 loop), on
a forgetting run and a control of each family of the validation grid, seed by seed: tiny GPT-2
("math" at lr 1e-3 and the plateau control), MiniLM ("size" and converge on general, lr 3e-5),
Gemma-3 ("narrow" and other English, lr 2e-5; MiniLM and Gemma-3 need their optional packages):

- ``c_i = g_i . P g_A``: sample ``i``'s first-order contribution to the drift's fall, with ``g_i``
  its own gradient, ``g_A`` the probe set's gradient at the same weights and ``P`` AdamW's
  preconditioner (``1 / (sqrt(v_hat) + eps)`` of the step before; the identity at the first step);
- ``share = sum_i max(c_i, 0) / sum_i |c_i|``: the restoring share of the batch (0: every sample
  pushes the probe loss up; 0.5: the batch is balanced, the drift stops rising to first order);
- ``d_eq = d (1 - share) / share``: where the drift would settle if the restoring part grew in
  proportion to the drift while the rest stayed (``inf`` at share 0).

Prints one line per run (every ``--every`` steps: drift, share, ``d_eq``) and the crossing of
0.5 nats. Measured after round 4 (docs/early_warning.md): it tells the tiny plateau control from
the forgetting runs by a factor > 10 in ``d_eq``, and fails on MiniLM (a noisy share, ``d_eq``
below the threshold where a warning is due) and Gemma-3 (every sample pulls back while the drift
rises): not adopted. The validation grid has run tiny seeds 0-13, MiniLM 0-9 and Gemma-3 0-3
(tuned or reported on): judge any signal for a new round on seeds never run before.

    python benchmarks/rehearsal_signal.py [--family tiny --seeds 0-11 --steps 20 --every 2 --raw]
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import replace
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.warning_validation import THRESHOLD, Run, build, parse_seeds

Rows = list[tuple[int, float, float]]  # (step, drift after it, restoring share of its batch)
_KEYS = ("input_ids", "attention_mask", "labels")


def _loss(module: torch.nn.Module, batch: dict) -> torch.Tensor:
    return module(**{k: batch[k] for k in _KEYS}).loss


def _flat_grad(module: torch.nn.Module, params: list[torch.Tensor], batch: dict) -> torch.Tensor:
    return torch.cat([g.flatten() for g in torch.autograd.grad(_loss(module, batch), params)])


def restoring_share(contributions: torch.Tensor) -> float:
    """``sum max(c_i, 0) / sum |c_i|`` (0.0 for an all-zero batch)."""
    total = float(contributions.abs().sum())
    return float(contributions.clamp(min=0).sum()) / total if total > 0 else 0.0


def measure(module: pl.LightningModule, batches, probe: dict, steps: int, raw: bool = False) -> Rows:
    """``[(step, drift after it, restoring share of its batch)]``: ``steps`` AdamW steps of
    ``module`` (its own ``configure_optimizers``) on ``batches``, the probe loss on ``probe``.
    Gradients for the share are taken in eval mode (no dropout noise), the step in train mode;
    ``raw``: ``P`` is the identity at every step."""
    params = [p for p in module.parameters() if p.requires_grad]
    opt = module.configure_optimizers()
    beta2, eps = opt.param_groups[0]["betas"][1], opt.param_groups[0]["eps"]
    module.eval()
    with torch.no_grad():
        base = float(_loss(module, probe))
    rows, batches = [], iter(batches)
    for step in range(1, steps + 1):
        batch = next(batches)
        module.eval()
        direction = _flat_grad(module, params, probe)
        if step > 1 and not raw:
            v = torch.cat([opt.state[p]["exp_avg_sq"].flatten() for p in params])
            direction = direction / ((v / (1.0 - beta2 ** (step - 1))).sqrt() + eps)
        contributions = torch.stack(
            [
                _flat_grad(module, params, {k: batch[k][i : i + 1] for k in _KEYS}) @ direction
                for i in range(batch["input_ids"].shape[0])
            ]
        )
        del direction
        module.train()
        opt.zero_grad()
        _loss(module, batch).backward()
        opt.step()
        module.eval()
        with torch.no_grad():
            drift = float(_loss(module, probe)) - base
        rows.append((step, drift, restoring_share(contributions)))
    return rows


# A forgetting run and a control per family: the grid's own runs (warning_validation), by seed.
PAIRS = {
    "tiny": (
        Run("tiny", "math", 1e-3),
        Run("tiny", "control: quarter math", 1e-3, task="phases:mixed*200", control=True),
    ),
    "minilm": (
        Run("minilm", "size", 3e-5, task="size"),
        Run("minilm", "control: converge on general", 3e-5, task="general", control=True),
    ),
    "gemma": (
        Run("gemma", "narrow", 2e-5, task="narrow"),
        Run("gemma", "control: other English", 2e-5, task="general_other", control=True),
    ),
}


def run_pair(family: str, seed: int, control: bool, steps: int, lr: float | None = None, raw=False) -> Rows:
    """:func:`measure` on the forgetting run of ``family`` (or its control) on ``seed``, built
    as the validation grid builds it (``lr``: another learning rate)."""
    run = replace(PAIRS[family][control], seed=seed)
    module, dm, _ = build(run if lr is None else replace(run, lr=lr))
    module.setup("fit")  # the tiny model pretrains here
    probe = _whole(dm.probe_dataloader("general"))
    return measure(module, _cycle(dm.train_dataloader), probe, steps, raw)


def _whole(loader) -> dict:
    """The probe set as one batch (its loader's batches share one padded length)."""
    batches = list(loader)
    return {k: torch.cat([b[k] for b in batches]) for k in _KEYS}


def _cycle(loader_fn):
    while True:
        yield from loader_fn()


def equilibrium(drift: float, share: float) -> float:
    """``d (1 - share) / share`` for a drift above the anchor (nan at or below it; inf when
    nothing restores)."""
    if drift <= 0:
        return math.nan
    return drift * (1.0 - share) / share if share > 0 else math.inf


def line(name: str, seed: int, rows: Rows, every: int) -> str:
    crossing = next((s for s, d, _ in rows if d >= THRESHOLD), None)
    cells = [f"{s}: {d:.3f} {sh:.2f} {equilibrium(d, sh):.2g}" for s, d, sh in rows if s % every == 0]
    return f"{name:<18} s{seed:<3} crossing {crossing if crossing else '-':>2} | " + " | ".join(cells)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(PAIRS), default="tiny")
    parser.add_argument("--seeds", default="0-11", help="seeds: 12-15 or 0,3")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--every", type=int, default=2)
    parser.add_argument("--lr", type=float, default=None, help="the runs' lr (default: the grid's)")
    parser.add_argument("--runs", default="forgetting,control")
    parser.add_argument("--raw", action="store_true", help="P = identity (plain gradients)")
    args = parser.parse_args()
    print("per step shown: drift (nats), restoring share of the batch, d_eq = drift (1 - share) / share")
    for seed in sorted(parse_seeds(args.seeds)):
        for name in args.runs.split(","):
            rows = run_pair(args.family, seed, name == "control", args.steps, args.lr, args.raw)
            print(line(f"{args.family} {name}", seed, rows, args.every), flush=True)


if __name__ == "__main__":
    main()
