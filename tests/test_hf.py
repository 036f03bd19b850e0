"""The suite on the Hugging Face Trainer: a real ``Trainer.train`` with FisherTrainerCallback, W&B
(offline) and TensorBoard; per-sample capture under gradient accumulation against the micro-batch-1
loop; the same numbers as the Lightning callbacks on the same seeded run."""

from __future__ import annotations

import functools
import math
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from ddp_run import run_torchrun
from reference import assert_close_rel, microbatch_gradients
from torch.utils.data import DataLoader, Dataset
from transformers import Trainer, TrainingArguments

from fisher_callbacks.callbacks import FisherMonitor, ForgettingRiskMonitor, QKOVInterferenceMonitor
from fisher_callbacks.engine import fisher as fisher_engine
from fisher_callbacks.engine.forgetting_report import ForgettingReport
from fisher_callbacks.hf import FisherTrainerCallback
from lightning_examples.synthetic import SyntheticTask, TinyGPT, collate

SMALL = dict(n_layer=2, n_head=4, n_embd=32, pretrain_steps=40, pretrain_lr=1e-2)


def _pretrained(lr=3e-3) -> TinyGPT:
    lm = TinyGPT(lr=lr, **SMALL)
    lm.pretrain_general()
    return lm


def _probe() -> DataLoader:
    return DataLoader(SyntheticTask("general", 16, seed=7), batch_size=8, collate_fn=collate)


def _args(tmp_path, **overrides) -> TrainingArguments:
    base = dict(
        output_dir=str(tmp_path / "hf"),
        max_steps=12,
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        eval_strategy="steps",
        eval_steps=4,
        logging_steps=2,
        save_strategy="no",
        report_to=[],
        remove_unused_columns=False,
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    return TrainingArguments(**{**base, **overrides})


def _callback(**kwargs) -> FisherTrainerCallback:
    options = dict(
        train_task="math",
        reference_tasks={"general": _probe()},
        capture_every_n_steps=4,
        max_samples_per_task=16,
        probe_max_samples=16,
        pairs=[("general", "math")],
        warn_threshold=0.3,
        qkov_options={"n_permutations": 20, "top_k": 5},
    )
    return FisherTrainerCallback(**{**options, **kwargs})


def test_trainer_runs_the_whole_suite_and_logs_everywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))  # the offline run lands here
    model = _pretrained().model
    seen: list[set[str]] = []
    forward = model.forward

    @functools.wraps(forward)  # the same signature: the Trainer and the probe passes read it
    def spy(*args, **kwargs):
        seen.append(set(kwargs))
        return forward(*args, **kwargs)

    model.forward = spy
    callback = _callback()
    trainer = Trainer(
        model=model,
        args=_args(tmp_path, report_to=["tensorboard", "wandb"], run_name="hf-suite"),
        train_dataset=SyntheticTask("math", 64),
        eval_dataset=SyntheticTask("math", 8, seed=1),
        data_collator=collate,
        callbacks=[callback],
    )
    trainer.train()
    assert trainer.state.global_step == 12
    assert seen and not any({"task", "sample_id"} & keys for keys in seen)  # never the model's
    rows = trainer.state.log_history
    boundaries = [r["step"] for r in rows if "forgetting/general/predicted" in r]
    assert boundaries == [4, 8, 12]
    early = [r["step"] for r in rows if "forgetting/general/measured" in r and r["step"] not in boundaries]
    assert early == [1, 2]  # the early probes of the first interval
    assert callback.forgetting.history["general"]["step"] == [4, 8, 12]
    for key in (
        "fisher/math/trace",
        "fisher/general/trace",
        "qkov/general_vs_math/Q/fisher_overlap",
        "forgetting/general/predicted",
        "forgetting/general/warning",
        "forgetting/general/forecast",
    ):
        assert any(key in r for r in rows), key
    assert callback.fisher.collector.num_samples("math") > 0
    # task tags and sample ids reached the callback
    assert set(callback.fisher.collector.sample_ids("math")) <= set(range(64))
    out = Path(tmp_path / "hf" / "fisher_callbacks")
    assert list((out / "figures").glob("qkov_*.png")) and list((out / "figures").glob("forgetting_*.png"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logdirs = {p.parent for p in Path(tmp_path / "hf").rglob("events.out.tfevents.*")}
    tags = {"scalars": set(), "images": set()}
    for d in logdirs:
        events = EventAccumulator(str(d))
        events.Reload()
        for kind in tags:
            tags[kind].update(events.Tags()[kind])
    assert any("forgetting/general/measured" in t for t in tags["scalars"]), sorted(tags["scalars"])[:20]
    assert any(t.startswith("qkov") for t in tags["images"]), sorted(tags["images"])
    import wandb

    assert wandb.run is not None  # the Trainer's WandbCallback started it; figures went there
    media = list(Path(wandb.run.dir).glob("media/images/**/*.png"))
    assert any("qkov" in str(p) for p in media), media[:5]


def test_stop_threshold_stops_the_trainer(tmp_path):
    callback = _callback(warn_threshold=0.2, stop_threshold=0.3)
    trainer = Trainer(
        model=_pretrained().model,
        args=_args(tmp_path, max_steps=40, learning_rate=1e-2),
        train_dataset=SyntheticTask("math", 64),
        eval_dataset=SyntheticTask("math", 8, seed=1),
        data_collator=collate,
        callbacks=[callback],
    )
    trainer.train()
    assert callback.forgetting.stopped_at is not None
    assert trainer.state.global_step < 40


def test_removed_columns_file_every_sample_under_train_task_with_one_warning(tmp_path):
    callback = _callback(pairs=(), forgetting=False)
    trainer = Trainer(
        model=_pretrained().model,
        args=_args(tmp_path, max_steps=4, remove_unused_columns=True, eval_strategy="no"),
        train_dataset=[{k: v for k, v in s.items()} for s in SyntheticTask("math", 32)],
        data_collator=collate,
        callbacks=[callback],
    )
    with pytest.warns(UserWarning, match="remove_unused_columns=False") as caught:
        trainer.train()
    assert sum("remove_unused_columns=False" in str(w.message) for w in caught) == 1
    assert callback.fisher.collector.num_samples("math") > 0  # filed under train_task


class _Fixed(Dataset):
    """The first ``n`` samples of a task in order (the HF sampler shuffles indices, not content)."""

    def __init__(self, task: SyntheticTask, n: int) -> None:
        self.items = [task[i] for i in range(n)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


@pytest.mark.parametrize("accumulation", [1, 2])
def test_capture_under_gradient_accumulation_equals_the_microbatch_loop(tmp_path, accumulation):
    lm = _pretrained()
    model = lm.model
    data = SyntheticTask("math", 8, seed=3)
    # uneven target counts across micro-batches: num_items_in_batch spans both
    data.labels[:4, -5:] = -100
    names = [n for n, _ in model.named_parameters() if ".attn." in n]
    expected = microbatch_gradients(model, collate([data[i] for i in range(8)]), names)
    callback = FisherTrainerCallback(
        train_task="math", capture_every_n_steps=1, store="exact", max_samples_per_task=8, check_loss=True
    )
    trainer = Trainer(
        model=model,
        args=_args(
            tmp_path,
            max_steps=1,
            learning_rate=0.0,
            per_device_train_batch_size=8 // accumulation,
            gradient_accumulation_steps=accumulation,
            eval_strategy="no",
        ),
        train_dataset=_Fixed(data, 8),
        data_collator=collate,
        callbacks=[callback],
    )
    trainer.train()
    ids, grads = callback.fisher.collector.stored_gradients("math")
    assert sorted(ids) == list(range(8))
    assert set(grads) <= set(expected)
    for name, rows in grads.items():
        assert_close_rel(rows.float(), expected[name][torch.tensor(ids)], rtol=1e-4)


def _hf_run(tmp_path, steps=8):
    callback = _callback()
    model = _pretrained().model
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    trainer = Trainer(
        model=model,
        args=_args(tmp_path / "hf", max_steps=steps),
        train_dataset=_Fixed(SyntheticTask("math", 8), 8),
        eval_dataset=SyntheticTask("math", 8, seed=1),
        data_collator=collate,
        callbacks=[callback],
        optimizers=(optimizer, None),
    )
    trainer.train()
    return callback


class _OneBatch(pl.LightningDataModule):
    def train_dataloader(self):
        return DataLoader(_Fixed(SyntheticTask("math", 8), 8), batch_size=8, collate_fn=collate)

    def val_dataloader(self):
        return DataLoader(SyntheticTask("math", 8, seed=1), batch_size=8, collate_fn=collate)


def _lightning_run(tmp_path, steps=8):
    fm = FisherMonitor(
        train_task="math",
        reference_tasks={"general": _probe()},
        capture_every_n_steps=4,
        max_samples_per_task=16,
        probe_max_samples=16,
    )
    qm = QKOVInterferenceMonitor(fm, pairs=[("general", "math")], n_permutations=20, top_k=5)
    rm = ForgettingRiskMonitor(fm, reference_tasks=["general"], warn_threshold=0.3)
    trainer = pl.Trainer(
        max_steps=steps,
        val_check_interval=4,
        check_val_every_n_epoch=None,
        limit_val_batches=1,
        callbacks=[fm, qm, rm],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        accelerator="cpu",
        default_root_dir=tmp_path / "pl",
        num_sanity_val_steps=0,
    )
    trainer.fit(_pretrained(), datamodule=_OneBatch())
    return fm, qm, rm


def test_lightning_and_hf_trainer_give_the_same_numbers(tmp_path):
    hf = _hf_run(tmp_path)
    fm, qm, rm = _lightning_run(tmp_path)
    for task in ("math", "general"):
        a = sum(float(f.sum()) for f in fm.collector.fisher(task).values())
        b = sum(float(f.sum()) for f in hf.fisher.collector.fisher(task).values())
        assert b == pytest.approx(a, rel=1e-4), task
    ha, hb = rm.history["general"], hf.forgetting.history["general"]
    assert ha["step"] == hb["step"] == [4, 8]
    for key in ("measured", "predicted", "ewc_quadratic", "forecast"):
        scale = max(abs(v) for v in ha[key] if math.isfinite(v)) or 1.0
        assert hb[key] == pytest.approx(ha[key], abs=1e-4 * scale), key
    assert [a["step"] for a in rm.alerts] == [a["step"] for a in hf.forgetting.alerts]
    (pair,) = qm.latest
    for block in ("Q", "K", "V", "O"):
        for key in ("fisher_overlap", "conflict_cosine", "layer_head_avg"):
            assert_close_rel(hf.qkov.latest[pair][block][key], qm.latest[pair][block][key], rtol=1e-4)


def test_the_callback_does_not_change_the_training_it_watches(tmp_path):
    """The same seeded Trainer run with and without the whole suite (capture every step, early
    probes, boundaries): the same losses and the same final weights."""
    runs = []
    for attach in (False, True):
        model = _pretrained().model
        trainer = Trainer(
            model=model,
            args=_args(tmp_path / str(attach), max_steps=8),
            train_dataset=SyntheticTask("math", 64),
            eval_dataset=SyntheticTask("math", 8, seed=1),
            data_collator=collate,
            callbacks=[_callback(capture_every_n_steps=1)] if attach else [],
        )
        trainer.train()
        losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
        runs.append((losses, {n: p.detach().clone() for n, p in model.named_parameters()}))
    (plain_losses, plain), (watched_losses, watched) = runs
    assert watched_losses == plain_losses
    for name, weight in plain.items():
        assert torch.equal(watched[name], weight), name


def test_resume_from_a_trainer_checkpoint_continues_the_monitors(tmp_path):
    """``train(resume_from_checkpoint=...)`` restores the monitors saved with the checkpoint: the
    resumed run's forgetting history and Fisher sums are those of the uninterrupted run."""

    def run(output, resume=None, steps=8):
        callback = _callback()
        trainer = Trainer(
            model=_pretrained().model,
            args=_args(tmp_path / output, max_steps=steps, save_strategy="steps", save_steps=4),
            train_dataset=SyntheticTask("math", 64),
            eval_dataset=SyntheticTask("math", 8, seed=1),
            data_collator=collate,
            callbacks=[callback],
        )
        trainer.train(resume_from_checkpoint=resume)
        return callback

    whole = run("whole")
    run("resumed", steps=4)  # stops at step 4 with checkpoint-4 ...
    assert (tmp_path / "resumed" / "hf" / "checkpoint-4" / "fisher_callbacks.pt").is_file()
    resumed = run("resumed", resume=True)  # ... from which this one goes on to step 8
    a, b = whole.forgetting.history["general"], resumed.forgetting.history["general"]
    assert b["step"] == a["step"] == [4, 8]
    for key in ("measured", "predicted", "forecast"):
        scale = max(abs(v) for v in a[key])
        assert b[key] == pytest.approx(a[key], abs=1e-5 * scale), key
    for task in ("math", "general"):
        trace = sum(float(f.sum()) for f in whole.fisher.collector.fisher(task).values())
        again = sum(float(f.sum()) for f in resumed.fisher.collector.fisher(task).values())
        assert again == pytest.approx(trace, rel=1e-5), task


def _torchrun(script: str, *argv, out: Path, cwd: Path) -> dict:
    """``python -m torch.distributed.run --nproc_per_node 2 tests/{script} {argv}`` (CPU, gloo, one
    OpenMP thread); what rank 0 wrote to ``out``."""
    run_torchrun(Path(__file__).parent / script, *argv, cwd=cwd)
    return torch.load(out, weights_only=False)


def test_two_processes_give_the_numbers_of_one(tmp_path):
    """``torch.distributed.run`` with 2 CPU processes (gloo), 4 samples each per step, against one
    process with 8: accelerate hands rank r every other batch of the same shuffled order, so the
    steps see the same samples; Fisher sums are synced, probe sets reduced, warnings gathered."""
    out = tmp_path / "ddp" / "out.pt"
    ddp = _torchrun("hf_ddp_script.py", out, out=out, cwd=tmp_path)
    assert ddp["world"] == 2
    callback = _callback()
    trainer = Trainer(
        model=_pretrained().model,
        args=_args(tmp_path / "one", max_steps=8),
        train_dataset=SyntheticTask("math", 64),
        eval_dataset=SyntheticTask("math", 8, seed=1),
        data_collator=collate,
        callbacks=[callback],
    )
    trainer.train()
    one = callback.fisher.collector
    assert ddp["samples"]["math"] == one.num_samples("math") == 16
    assert ddp["samples"]["general"] == 2 * one.num_samples("general")  # each rank probes the set
    for task, trace in ddp["traces"].items():
        assert trace == pytest.approx(sum(float(f.sum()) for f in one.fisher(task).values()), rel=1e-4), task
    a, b = callback.forgetting.history["general"], ddp["forgetting"]
    assert b["step"] == a["step"] == [4, 8]
    for key in ("measured", "predicted"):
        assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    assert all("[ranks 0, 1]" in w for w in ddp["warnings"])  # gathered once, from rank zero


def _leaves(tree, path=()):
    """``(path, leaf)`` of nested dicts."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _leaves(value, (*path, key))
    else:
        yield path, tree


def _assert_same(a, b, path="", rel=1e-4):
    """Nested dicts/lists of floats and tensors equal to ``rel`` (of the tensor's largest entry)."""
    if isinstance(a, dict):
        assert set(a) == set(b), (path, set(a) ^ set(b))
        for key in a:
            _assert_same(a[key], b[key], f"{path}/{key}", rel)
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}[{i}]", rel)
    elif torch.is_tensor(a):
        assert a.shape == b.shape and a.dtype == b.dtype, path
        if a.is_floating_point() and a.numel():
            assert_close_rel(b.double(), a.double(), rtol=rel, msg=path)
        else:
            assert torch.equal(a, b), path
    elif isinstance(a, float) and not (math.isnan(a) and math.isnan(b)):
        assert b == pytest.approx(a, rel=rel, abs=1e-9), path
    elif not isinstance(a, float):
        assert a == b, path


@pytest.fixture(scope="module")
def hf_fsdp2_runs(tmp_path_factory):
    """The same seeded 2-process fit under DDP and under accelerate's FSDP2 (checkpoint at step 4),
    and the FSDP2 fit resumed from its checkpoint-4 (tests/hf_fsdp2_script.py)."""
    tmp = tmp_path_factory.mktemp("hf_fsdp2")
    runs = {}
    for kind in ("ddp", "fsdp2"):
        out = tmp / kind / "out.pt"
        runs[kind] = _torchrun("hf_fsdp2_script.py", kind, out, out=out, cwd=tmp)
    out = tmp / "resumed.pt"
    runs["resumed"] = _torchrun(
        "hf_fsdp2_script.py", "fsdp2", out, tmp / "fsdp2" / "hf" / "checkpoint-4", out=out, cwd=tmp
    )
    return runs


def test_hf_trainer_under_fsdp2_gives_the_numbers_of_ddp(hf_fsdp2_runs):
    """accelerate's FSDP2 (``fully_shard`` per GPT2Block and on the root) under the HF Trainer,
    2 CPU processes: every logged ``fisher/*``, ``qkov/*`` and ``forgetting/*`` value, the Fisher
    traces and the forgetting history equal the DDP run's; the engines watch the Trainer's
    sharded model (DTensor parameters) and hold its forgetting state as local shards."""
    ddp, fsdp = hf_fsdp2_runs["ddp"], hf_fsdp2_runs["fsdp2"]
    assert fsdp["fsdp"] and not ddp["fsdp"]
    assert fsdp["sharded"] and fsdp["same_model"] and not ddp["sharded"]
    for task in ("math", "general"):
        assert fsdp["traces"][task] == pytest.approx(ddp["traces"][task], rel=1e-4), task
        assert fsdp["samples"][task] == ddp["samples"][task]
    _assert_same(ddp["forgetting"], fsdp["forgetting"])
    assert ddp["forgetting"]["step"] == [4, 8]

    def scalars(run):
        return {
            (row["step"], key): value
            for row in run["history"]
            for key, value in row.items()
            if key.split("/")[0] in ("fisher", "qkov", "forgetting")
        }

    want, got = scalars(ddp), scalars(fsdp)
    assert set(got) == set(want)
    assert {k.split("/")[0] for _, k in want} == {"fisher", "qkov", "forgetting"}
    for key, value in want.items():
        if key[1] == "fisher/memory_mb":  # the forgetting state: this rank's shards under FSDP2
            assert got[key] < value, key
        else:
            _assert_same(value, got[key], str(key))
    assert fsdp["warnings"] == ddp["warnings"]
    ours = [w for w in fsdp["all_warnings"] if "fisher_callbacks" in w]
    assert not any("FSDP2" in w or "failed" in w or "DTensor" in w for w in ours), ours


def test_hf_fsdp2_checkpoint_holds_the_whole_state_and_resumes_the_monitors(hf_fsdp2_runs):
    """``on_save`` under FSDP2: every rank takes the state (the engines gather their shards whole,
    a collective), rank 0 writes it: it is the DDP run's state, whole tensors included (so it
    resumes on any number of ranks). Resumed from that checkpoint (the Trainer's sharded model
    and optimizer, the monitors' state) the fit gives the uninterrupted history."""
    ddp, fsdp = hf_fsdp2_runs["ddp"]["saved"], hf_fsdp2_runs["fsdp2"]["saved"]
    assert "ranks" not in fsdp["ForgettingEngine"] and fsdp["ForgettingEngine"]["anchor"]
    assert set(ddp) == set(fsdp)
    for engine in ddp:
        _assert_same(ddp[engine], fsdp[engine], engine)
    resumed, uninterrupted = hf_fsdp2_runs["resumed"], hf_fsdp2_runs["fsdp2"]
    assert resumed["sharded"]
    _assert_same(uninterrupted["forgetting"], resumed["forgetting"], rel=1e-5)
    for task in ("math", "general"):
        assert resumed["traces"][task] == pytest.approx(uninterrupted["traces"][task], rel=1e-5), task


def test_a_reused_callback_starts_afresh_on_the_next_model(tmp_path):
    """One fit is one run: the same callback on a second Trainer (another model) monitors that
    model from its own anchor, with none of the first run's samples or history."""
    callback = _callback(forgetting_options={"early_probe_step": None})
    for run in ("first", "second"):
        model = _pretrained().model
        trainer = Trainer(
            model=model,
            args=_args(tmp_path / run, max_steps=4),
            train_dataset=SyntheticTask("math", 64),
            eval_dataset=SyntheticTask("math", 8, seed=1),
            data_collator=collate,
            callbacks=[callback],
        )
        trainer.train()
        assert callback.forgetting.history["general"]["step"] == [4]
        assert callback.fisher.collector.num_samples("math") == 8  # the flagged step 0 of this run
        monitored = callback.fisher.layout.monitored_parameters()
        live = dict(model.named_parameters())
        assert all(callback.fisher.collector.model.get_parameter(n) is live[n] for n in monitored)


def test_fsdp_asked_for_but_not_applied_is_detected():
    """``TrainingArguments.fsdp`` on CPU: accelerate drops FSDP without a word and trains
    unsharded (DDP); the callback tells that apart (and warns at train begin)."""
    import types

    from fisher_callbacks.hf import fsdp_not_applied

    model = _pretrained().model
    assert fsdp_not_applied(types.SimpleNamespace(fsdp=["full_shard"]), model)
    assert not fsdp_not_applied(types.SimpleNamespace(fsdp=[]), model)
    assert not fsdp_not_applied(types.SimpleNamespace(), model)


def _trained(tmp_path, callback, n_train=64, **overrides) -> Trainer:
    """A pretrained tiny GPT-2 trained on "math" with ``callback``; ``overrides`` of :func:`_args`."""
    trainer = Trainer(
        model=_pretrained().model,
        args=_args(tmp_path, **overrides),
        train_dataset=SyntheticTask("math", n_train),
        eval_dataset=SyntheticTask("math", 8, seed=1),
        data_collator=collate,
        callbacks=[callback],
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    trainer.messages = [str(w.message) for w in caught]
    return trainer


def test_forgetting_metrics_join_the_evaluation_metrics_for_the_best_model(tmp_path):
    """``metric_for_best_model`` (and ``EarlyStoppingCallback``) read the evaluation's metrics:
    the boundary's scalars join them as ``eval_<name>``. Before: a KeyError at the first
    evaluation."""
    callback = _callback(pairs=[])
    trainer = _trained(
        tmp_path,
        callback,
        metric_for_best_model="forgetting/general/measured",
        greater_is_better=False,
        save_strategy="steps",
        save_steps=4,
    )
    measured = callback.forgetting.history["general"]["measured"]
    assert len(measured) == 3
    assert trainer.state.best_metric == pytest.approx(min(measured), rel=1e-6)
    evals = [row for row in trainer.state.log_history if "eval_loss" in row]
    assert len(evals) == 3 and "eval_forgetting/general/measured" not in evals[0]  # logged once, as before


def test_a_loss_the_trainer_computes_itself_is_one_warning_not_a_silent_empty_fisher(tmp_path):
    """``label_smoothing_factor`` makes the Trainer pop ``labels`` before the model's forward:
    nothing can be captured. Before: no warning, and an empty Fisher of ``train_task``."""
    callback = _callback(pairs=[])
    trainer = _trained(tmp_path, callback, max_steps=4, label_smoothing_factor=0.1)
    said = [m for m in trainer.messages if "got no labels" in m]
    assert len(said) == 1 and "label_smoothing_factor" in said[0]
    assert callback.fisher.collector.num_stored("math") == 0


def test_epoch_evaluations_are_boundaries_without_the_end_of_training_warning(tmp_path):
    """Before: eval_strategy='epoch' warned that the monitors evaluate only at the end."""
    callback = _callback(pairs=[])
    trainer = _trained(tmp_path, callback, 32, max_steps=-1, num_train_epochs=3, eval_strategy="epoch")
    assert not [m for m in trainer.messages if "evaluate once at the end" in m]
    assert callback.forgetting.history["general"]["step"] == [4, 8, 12]


def test_an_evaluation_at_an_early_probe_step_measures_once(tmp_path):
    """The Trainer's last evaluation at step 4 falls on an early probe (steps 1, 2, 4 of the first
    interval of 10). Before: the probe set was passed twice and the step had two measured rows."""
    callback = _callback(pairs=[])
    trainer = _trained(tmp_path, callback, max_steps=4, eval_steps=10)
    steps = [row["step"] for row in trainer.state.log_history if "forgetting/general/measured" in row]
    assert steps == [1, 2, 4]
    assert callback.forgetting.history["general"]["step"] == [4]


def test_the_trainer_goes_on_when_a_monitor_fails_at_a_boundary(tmp_path, monkeypatch):
    """The HF side of ``tests/test_monitor_failures.py``: each engine's boundary is contained."""
    monkeypatch.setattr(fisher_engine, "fisher_scalars", _raise)
    monkeypatch.setattr(ForgettingReport, "timeline", _raise)
    callback = _callback()
    trainer = _trained(tmp_path, callback, max_steps=8)
    assert trainer.state.global_step == 8
    assert [m for m in trainer.messages if "no Fisher scalars at step 4" in m], trainer.messages
    assert [m for m in trainer.messages if "no timeline of general at step 4" in m], trainer.messages
    assert callback.forgetting.history["general"]["step"][-1] == 8  # still measuring


def _raise(*args, **kwargs):
    raise RuntimeError("injected failure")
