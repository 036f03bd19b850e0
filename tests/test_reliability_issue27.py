"""Issue 27: the monitors never change the training they watch, never misfile, never die on a typo.

One test per case of the issue's "Why" list (noted in each docstring, with what happened before
the fix)."""

from __future__ import annotations

import math
import warnings

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from fisher_callbacks.callbacks import FisherMonitor, ForgettingRiskMonitor, QKOVInterferenceMonitor
from lightning_examples.synthetic import SyntheticTask, SyntheticTasks, TinyGPT, collate

TINY = dict(n_layer=2, n_head=2, n_embd=16, pretrain_steps=0)
DROPOUT = dict(
    n_layer=2, n_head=2, n_embd=16, n_positions=32, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1
)


def _trainer(tmp_path, callbacks, max_steps=8, val_every=4, **kwargs):
    """A CPU Trainer validating every ``val_every`` steps (one batch), no logger, no checkpoints."""
    kwargs.setdefault("enable_checkpointing", False)
    kwargs.setdefault("limit_val_batches", 1)
    kwargs.setdefault("check_val_every_n_epoch", None)
    return pl.Trainer(
        max_steps=max_steps,
        val_check_interval=val_every,
        num_sanity_val_steps=0,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=callbacks,
        **kwargs,
    )


def _loader(task: str, n: int, seed: int, batch_size: int = 8, **kwargs) -> DataLoader:
    return DataLoader(SyntheticTask(task, n, seed=seed), batch_size=batch_size, collate_fn=collate, **kwargs)


def _relayed(caught, who: str = "") -> list[str]:
    return [str(w.message) for w in caught if str(w.message).startswith(who or "")]


class _Losses(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].detach().clone())


def _seeded_fit(tmp_path, workers: int, suite: bool) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """12 steps with dropout 0.1 and a train loader shuffled by the GLOBAL torch RNG."""
    pl.seed_everything(0)
    model = TinyGPT(model_type="gpt2", hf_config=DROPOUT, pretrain_steps=0)
    train = _loader("math", 64, 0, shuffle=True, num_workers=workers)  # no generator: global stream
    rec = _Losses()
    callbacks: list[pl.Callback] = [rec]
    if suite:
        fm = FisherMonitor(
            train_task="math",
            reference_tasks={"general": _loader("general", 8, 2)},  # iterating it draws a seed
            capture_every_n_steps=3,
            ema_every_n_steps=1,
            ema_samples_per_step=2,
            store="sketch",
            sketch_dim=16,
        )
        callbacks += [
            fm,
            QKOVInterferenceMonitor(fm, pairs=[("general", "math")], n_permutations=5, variant="signed"),
            ForgettingRiskMonitor(fm, reference_tasks=["general"]),
        ]
    _trainer(tmp_path, callbacks, max_steps=12).fit(model, train, _loader("math", 8, 1))
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    return weights, torch.stack(rec.losses)


@pytest.mark.parametrize("workers", [0, 2])
def test_the_suite_does_not_change_the_training_it_watches(tmp_path, workers):
    """Case 1. Before: iterating the probe DataLoader drew its base seed from the global torch
    RNG, so every later dropout mask and shuffle changed (weights off by up to 0.059)."""
    plain_w, plain_l = _seeded_fit(tmp_path / "plain", workers, suite=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        watched_w, watched_l = _seeded_fit(tmp_path / "watched", workers, suite=True)
    assert torch.equal(plain_l, watched_l)
    for name, w in plain_w.items():
        assert torch.equal(w, watched_w[name]), name


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(p_value="exact"), r"p_value must be one of .*got 'exact'"),
        (dict(fdr_method="bonferroni"), r"fdr_method must be one of \('by', 'bh'\)"),
        (dict(n_permutations=0), r"n_permutations must lie in \[1, inf\)"),
        (dict(fdr_alpha=0), r"fdr_alpha must lie in \(0, 1\]"),
        (dict(fdr_alpha=math.nan), r"fdr_alpha must be a number, got NaN"),
        (dict(fisher="pooledd"), r"fisher must be one of .*; did you mean 'pooled'\?"),
        (dict(top_k=-1), r"top_k must lie in \[0, inf\)"),
        (dict(variant="signd"), r"did you mean 'signed'\?"),
        (dict(every_n_validations=0), r"every_n_validations must lie in \[1, inf\)"),
        (dict(pairs=["general"]), r"pairs must be \(task_a, task_b\) tuples"),
    ],
)
def test_qkov_settings_fail_at_construction(kwargs, message):
    """Case 8. Before: each of these constructed, then the metric, built outside the boundary's
    error handling, raised at the first boundary and the fit died."""
    with pytest.raises(ValueError, match=message):
        QKOVInterferenceMonitor(**kwargs)


@pytest.mark.parametrize(
    ("cls", "kwargs", "message"),
    [
        (ForgettingRiskMonitor, dict(warn_threshold=math.nan), r"warn_threshold must be a number, got NaN"),
        (ForgettingRiskMonitor, dict(stop_threshold=math.nan), r"stop_threshold must be a number, got NaN"),
        (ForgettingRiskMonitor, dict(warn_threshold=-1.0), r"warn_threshold must lie in \(0, inf\)"),
        (ForgettingRiskMonitor, dict(alert_wait_seconds=math.nan), r"alert_wait_seconds must be a number"),
        (ForgettingRiskMonitor, dict(predict_on="monitor"), r"did you mean 'monitored'\?"),
        (ForgettingRiskMonitor, dict(horizon_steps=-5), r"horizon_steps must lie in"),
        (ForgettingRiskMonitor, dict(horizon_steps=math.nan), r"horizon_steps must be a number"),
        (ForgettingRiskMonitor, dict(early_probe_step="autoo"), r"early_probe_step must be 'auto'"),
        (FisherMonitor, dict(gradient_memory_mb=math.nan), r"gradient_memory_mb must be a number, got NaN"),
        (FisherMonitor, dict(gradient_memory_mb=math.inf), r"gradient_memory_mb must lie in \[0, inf\)"),
        (FisherMonitor, dict(ema_decay=1.0), r"ema_decay must lie in \[0, 1\)"),
        (FisherMonitor, dict(store="skech"), r"store must be one of .*did you mean 'sketch'\?"),
        (FisherMonitor, dict(fisher_type="ture"), r"did you mean 'true'\?"),
        (FisherMonitor, dict(loss_reduction="token-mean"), r"did you mean 'token_mean'\?"),
        (FisherMonitor, dict(capture_every_n_steps=-1), r"capture_every_n_steps must lie in \[0, inf\)"),
        (FisherMonitor, dict(loss_type="causal"), r"loss_type must be one of"),
        (FisherMonitor, dict(capture_chunk=0), r"capture_chunk must lie in \[1, inf\)"),
    ],
)
def test_monitor_arguments_fail_at_construction_naming_the_argument(cls, kwargs, message):
    """Case 7. Before: warn_threshold=nan / stop_threshold=nan were accepted (nothing measured
    all run), gradient_memory_mb=nan failed at fit start with "cannot convert float NaN to
    integer", and typos were errors without a hint."""
    with pytest.raises(ValueError, match=message):
        cls(**kwargs)


def test_a_non_number_is_a_type_error_naming_the_argument():
    with pytest.raises(TypeError, match=r"top_k must be an integer, got 2.5"):
        QKOVInterferenceMonitor(top_k=2.5)
    with pytest.raises(TypeError, match=r"warn_threshold must be a number, got '0.1'"):
        ForgettingRiskMonitor(warn_threshold="0.1")


def _collate_off_by(key: str, extra: int):
    def collate_wrong(items):
        out = collate(items)
        values = list(out[key].tolist() if torch.is_tensor(out[key]) else out[key])
        out[key] = values + values[:extra] if extra > 0 else values[:extra]
        return out

    return collate_wrong


@pytest.mark.parametrize(("key", "extra"), [("task", 1), ("task", -1), ("sample_id", 1), ("sample_id", -1)])
def test_a_task_or_id_list_of_the_wrong_length_is_an_error_naming_the_batch_size(tmp_path, key, extra):
    """Case 2. Before: B+1 task tags (or ids) for a batch of B were cut to B without a word, so
    samples could be filed under another sample's task; B-1 failed with an IndexError."""
    wrong = _collate_off_by(key, extra)
    train = DataLoader(SyntheticTask("math", 32, seed=0), batch_size=8, collate_fn=wrong)
    fm = FisherMonitor(train_task="math", capture_every_n_steps=1, ema_samples_per_step=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trainer(tmp_path, [fm], max_steps=2, limit_val_batches=0).fit(TinyGPT(**TINY), train)
    failed = [m for m in _relayed(caught, "FisherMonitor") if f"batch[{key!r}] has" in m]
    assert len(failed) == 1, _relayed(caught)
    assert f"has {8 + extra} entries for a batch of 8 samples" in failed[0]
    assert fm.collector.num_samples("math") == 0  # nothing misfiled; training went on
    assert fm.captured_steps == 0


def test_a_task_without_stored_samples_logs_no_qkov_values(tmp_path):
    """Case 5. Before: a pair whose task had no stored sample logged zero maps,
    fisher_overlap=0.0 and most_conflicting_layer=0 ("no interference" on the dashboard) with a
    console warning "returning zero maps"."""
    dm = SyntheticTasks(n_train=64, n_val=8, n_probe=4, batch_size=8)
    fm = FisherMonitor(train_task="math", reference_tasks=["general"], capture_every_n_steps=0)
    qm = QKOVInterferenceMonitor(fm, pairs=[("general", "math")], n_permutations=5)
    trainer = _trainer(tmp_path, [fm, qm], max_steps=8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(TinyGPT(**TINY), datamodule=dm)
    assert not [k for k in trainer.callback_metrics if k.startswith("qkov/")], trainer.callback_metrics
    assert qm.latest == {}
    empty = [m for m in _relayed(caught, "QKOVInterferenceMonitor") if "no stored samples for 'math'" in m]
    assert len(empty) == 1, _relayed(caught)  # two boundaries, one warning
    assert not [m for m in _relayed(caught) if "zero maps" in m]


def test_callbacks_reused_for_a_new_fit_rebind_to_the_new_model_and_restart(tmp_path):
    """Case 4. Before: reused for a second fit of a new model, the hooks stayed on the old model,
    every boundary of the new fit counted as done (steps restart at 0), stale fisher/* values
    and zero maps were logged ("steps must be strictly increasing", "no samples for task")."""
    dm = SyntheticTasks(n_train=64, n_val=8, n_probe=8, batch_size=8)
    fm = FisherMonitor(train_task="math", reference_tasks=["general"], capture_every_n_steps=2)
    qm = QKOVInterferenceMonitor(fm, pairs=[("general", "math")], n_permutations=5)
    rm = ForgettingRiskMonitor(fm, reference_tasks=["general"])
    first, second = TinyGPT(**TINY), TinyGPT(**TINY, seed=1)
    _trainer(tmp_path, [fm, qm, rm]).fit(first, datamodule=dm)
    once = (fm.captured_steps, list(rm.history["general"]["step"]), rm.tracker.baseline["general"])
    assert once[:2] == (4, [4, 8])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = _trainer(tmp_path, [fm, qm, rm])
        trainer.fit(second, datamodule=dm)
    assert not [m for m in _relayed(caught) if "strictly increasing" in m or "no samples" in m]
    assert fm.collector.model is second and fm.captured_steps == 4  # this fit's steps only
    assert rm.history["general"]["step"] == [4, 8] and len(rm.history["general"]["measured"]) == 2
    assert rm.tracker.baseline["general"] != once[2]  # anchored on the new model
    assert set(qm.latest) == {("general", "math")}
    assert fm.collector.num_samples("math") == 4 * 8
    assert not any(m._forward_hooks for m in first.modules())  # nothing left on the old model
    assert "qkov/general_vs_math/Q/fisher_overlap" in trainer.callback_metrics


class _NoAttention(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        return self.net(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_entry_point_warns_and_stays_out_of_a_model_it_cannot_map(tmp_path, monkeypatch):
    """Case 9. Before: with FISHER_CALLBACKS=1 any Trainer whose model had no mappable attention
    died at setup."""
    monkeypatch.setenv("FISHER_CALLBACKS", "1")
    monkeypatch.setenv("FISHER_CALLBACKS_REFERENCE", "general")
    data = DataLoader(torch.utils.data.TensorDataset(torch.randn(16, 4)), batch_size=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = _trainer(tmp_path, [], max_steps=3, limit_val_batches=0)
        model = _NoAttention()
        trainer.fit(model, data)
    assert trainer.global_step == 3
    fm = next(cb for cb in trainer.callbacks if isinstance(cb, FisherMonitor))
    assert not fm.active
    out = [m for m in _relayed(caught, "FisherMonitor") if "the suite stays out of this fit" in m]
    assert len(out) == 1, _relayed(caught)
    assert not any(m._forward_hooks for m in model.modules())


def _suite(refs):
    fm = FisherMonitor(train_task="math", reference_tasks=refs, capture_every_n_steps=2)
    return fm, ForgettingRiskMonitor(fm, reference_tasks=refs)


def test_adding_a_reference_task_on_resume_keeps_the_others_anchor_and_history(tmp_path):
    """Case 6. Before: the state_key included reference_tasks, so adding one on resume reset the
    original task's anchor (baseline 3.5102 -> 3.5236) and lost its history, with only
    Lightning's generic "callbacks need to be provided" warning."""
    dm = SyntheticTasks(n_train=64, n_val=8, n_probe=8, batch_size=8)
    fm, rm = _suite(["general"])
    model = TinyGPT(**TINY)
    trainer = _trainer(tmp_path, [fm, rm])
    trainer.fit(model, datamodule=dm)
    ckpt = tmp_path / "run.ckpt"
    trainer.save_checkpoint(ckpt)
    baseline, steps = rm.tracker.baseline["general"], list(rm.history["general"]["step"])
    measured = list(rm.history["general"]["measured"])

    fm2, rm2 = _suite(["general", "math"])
    _trainer(tmp_path, [fm2, rm2], max_steps=12).fit(TinyGPT(**TINY), datamodule=dm, ckpt_path=ckpt)
    assert rm2.tracker.baseline["general"] == baseline
    assert rm2.history["general"]["step"] == [*steps, 12]
    assert rm2.history["general"]["measured"][:2] == measured
    assert rm2.history["math"]["step"] == [12]  # the added task, anchored at the resume (step 8)

    # a checkpoint written under the old key (reference tasks in it) still resumes its state
    state = torch.load(ckpt, weights_only=False)
    callbacks = state["callbacks"]
    callbacks["ForgettingRiskMonitor{'reference_tasks': ['general']}"] = callbacks.pop(rm.state_key)
    old = tmp_path / "old.ckpt"
    torch.save(state, old)
    fm3, rm3 = _suite(["general"])
    _trainer(tmp_path, [fm3, rm3], max_steps=12).fit(TinyGPT(**TINY), datamodule=dm, ckpt_path=old)
    assert rm3.tracker.baseline["general"] == baseline
    assert rm3.history["general"]["step"] == [*steps, 12]


class _WeightedLoss(TinyGPT):
    """``training_step`` returns ``weight * loss`` (+ ``aux`` x a z-loss on the logits, +
    ``penalty`` x an L2 penalty on the attention weights)."""

    def __init__(self, weight: float = 1.0, aux: float = 0.0, penalty: float = 0.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.weight, self.aux, self.penalty = weight, aux, penalty

    def training_step(self, batch, batch_idx):
        out = self(batch["input_ids"], batch["attention_mask"], batch["labels"])
        loss = self.weight * out.loss + self.aux * out.logits.float().logsumexp(-1).square().mean()
        if self.penalty:
            attn = [p for n, p in self.named_parameters() if "attn" in n and n.endswith("weight")]
            loss = loss + self.penalty * sum(p.square().sum() for p in attn)
        return loss


def _first_step_fisher(tmp_path, weight: float, aux: float = 0.0, penalty: float = 0.0):
    fm = FisherMonitor(train_task="math", capture_every_n_steps=1, ema_samples_per_step=0, store="exact")
    train = _loader("math", 8, 0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = _trainer(tmp_path, [fm], max_steps=1, limit_val_batches=0)
        trainer.fit(_WeightedLoss(weight, aux, penalty, **TINY), train)
    checks = [m for m in _relayed(caught, "FisherMonitor") if "the training loss is" in m or ".grad" in m]
    return fm, fm.collector.fisher("math"), checks


def test_a_weighted_training_loss_is_rescaled_and_an_auxiliary_term_is_warned(tmp_path):
    """Case 3. Before: ``return 0.5 * loss`` halved every stored per-sample gradient (Fisher 4x
    too small) without a word; an auxiliary loss term went unnoticed too."""
    plain_fm, plain, plain_checks = _first_step_fisher(tmp_path / "plain", 1.0)
    assert plain_checks == [] and plain_fm.loss_factor == 1.0
    half_fm, half, half_checks = _first_step_fisher(tmp_path / "half", 0.5)
    assert len(half_checks) == 1 and "0.5 x the per-sample loss" in half_checks[0], half_checks
    assert half_fm.loss_factor == pytest.approx(0.5, rel=1e-5)
    for name, f in plain.items():
        err = (half[name] - f).norm() / f.norm()
        assert err <= 1e-5, (name, float(err))
    aux_fm, _, aux_checks = _first_step_fisher(tmp_path / "aux", 1.0, aux=0.1)
    assert len(aux_checks) == 1 and "explained by no per-sample loss" in aux_checks[0], aux_checks
    assert aux_fm.loss_factor == 1.0
    _, _, penalty_checks = _first_step_fisher(tmp_path / "penalty", 1.0, penalty=1.0)
    assert len(penalty_checks) == 1 and "does not come through their outputs" in penalty_checks[0]


def test_a_metric_failing_at_a_boundary_is_a_warning_and_no_key_not_a_dead_run(tmp_path):
    """Case 8, the boundary side. Before: the metric was built outside the per-pair error
    handling, so a setting it rejects killed the fit at the first boundary."""
    dm = SyntheticTasks(n_train=64, n_val=8, n_probe=8, batch_size=8)
    fm = FisherMonitor(train_task="math", reference_tasks=["general"], capture_every_n_steps=2)
    qm = QKOVInterferenceMonitor(fm, pairs=[("general", "math")], n_permutations=5)
    qm.p_value = "exact"  # past the constructor's check: what a failing metric looks like
    trainer = _trainer(tmp_path, [fm, qm])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(TinyGPT(**TINY), datamodule=dm)
    assert trainer.global_step == 8
    failed = [m for m in _relayed(caught, "QKOVInterferenceMonitor") if "general vs math failed" in m]
    assert len(failed) == 1 and "p_value" in failed[0], _relayed(caught)
    assert not [k for k in trainer.callback_metrics if k.startswith("qkov/")]
