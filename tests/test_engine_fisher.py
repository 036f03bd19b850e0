"""The Fisher engine driven without Lightning, through a plain :class:`Host` on a real tiny model:
a per-sample factor handed to ``batch_start`` (what the Hugging Face adapter passes) captures the
micro-batch-1 gradients, also when the training loss carries a constant weight."""

from __future__ import annotations

import ast
import warnings
from pathlib import Path

import pytest
import torch
from reference import max_rel_error, microbatch_gradients
from tiny_models import lm_batch, tiny_causal_lm

from fisher_callbacks.engine.fisher import FisherEngine
from fisher_callbacks.engine.host import Host
from fisher_callbacks.losses import per_sample_loss, target_token_counts

TOL = 1e-5


class _Host(Host):
    """The trainer as a plain loop: the model, a step counter, and the scalars it was given."""

    def __init__(self, module: torch.nn.Module, step: int = 0) -> None:
        self.module, self.step = module, step
        self.logged: list[dict[str, float]] = []

    def log_scalars(self, values, *, sync_dist=False, rank_zero_only=False) -> None:
        self.logged.append(dict(values))

    def request_stop(self) -> None:
        raise AssertionError("the Fisher engine never stops a run")


@pytest.mark.parametrize("weight", [1.0, 0.5])
def test_given_scale_captures_the_microbatch_gradients(weight):
    """A training loss ``weight * sum_i w_i l_i`` (per-sample weights ``w_i``, as a trainer's own
    reduction gives) and ``batch_start(host, batch, scale=s)`` with ``s_i = 1 / w_i`` (what
    :func:`reduction_scale` gives for its reductions): the stored per-sample gradients are those
    of each sample run alone (``grad l_i``); a constant ``weight`` is measured by the loss check
    (``loss_factor``) and divided out."""
    model = tiny_causal_lm("gpt2")
    batch = {**lm_batch(batch=4, seq=10), "sample_id": ["a", "b", "c", "d"]}
    counts = target_token_counts(batch["labels"], "causal_lm")
    w = torch.tensor([0.3, 1.0, 2.5, 0.7]) * (counts > 0)  # any weights, 0 where no target
    scale = torch.where(w > 0, 1.0 / w.clamp_min(1e-30), torch.zeros_like(w))

    engine = FisherEngine(train_task="t", capture_every_n_steps=1, store="exact", ema_samples_per_step=0)
    host = _Host(model)
    engine.prepare(host, probe_gradients_wanted=False)
    engine.batch_start(host, batch, scale=scale)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    losses, _ = per_sample_loss(logits, batch["labels"], "causal_lm")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (weight * (w * torch.nan_to_num(losses)).sum()).backward()
        engine.after_backward(host)
    said = [str(c.message) for c in caught if "training loss" in str(c.message)]
    assert len(said) == (weight != 1.0) and all("0.5 x the per-sample loss" in m for m in said), said
    engine.batch_end()

    ids, got = engine.collector.stored_gradients("t")
    kept = [i for i, s in enumerate(scale.tolist()) if s > 0]
    assert ids == [batch["sample_id"][i] for i in kept]
    ref = microbatch_gradients(model, batch, engine.layout.monitored_parameters())
    assert max_rel_error(got, {n: g[kept] for n, g in ref.items()}) <= TOL
    assert engine.loss_factor == pytest.approx(weight, rel=1e-5)
    assert engine.captured_steps == 1 and engine.skipped_steps == 0 and not engine.capture_failed

    engine.boundary(host)  # no probe set: the fisher/* scalars of the training task
    assert host.logged[-1]["fisher/t/num_samples"] == len(kept)
    assert host.logged[-1]["fisher/skipped_steps"] == 0.0
    engine.release()
    assert all(not m._forward_hooks for m in model.modules())


def test_scale_of_another_batch_size_is_an_error():
    model = tiny_causal_lm("gpt2")
    engine = FisherEngine(capture_every_n_steps=1)
    host = _Host(model)
    engine.prepare(host, probe_gradients_wanted=False)
    with pytest.raises(ValueError, match=r"scale must have shape \[4\]"):
        engine.batch_start(host, lm_batch(batch=4, seq=10), scale=torch.ones(3))
    engine.release()


def test_engine_modules_import_no_lightning():
    engine_dir = Path(__file__).resolve().parent.parent / "fisher_callbacks" / "engine"
    for path in engine_dir.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(n.split(".")[0] in ("lightning", "pytorch_lightning") for n in names), path
