"""Issue 12, single process: no silent loss of state, no monitor failure that silences a task.

One test per item (the DDP items are in ``test_distributed_reliability.py``); each failed on the
code before the fix (noted in its docstring)."""

from __future__ import annotations

import io
import math
import pickle
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from test_reliability_issue27 import TINY, _trainer
from torch.utils.data import ConcatDataset, DataLoader

from fisher_callbacks import FisherCollector
from fisher_callbacks.callbacks import FisherMonitor, ForgettingRiskMonitor, QKOVInterferenceMonitor
from lightning_examples.multitask import OffsetIds
from lightning_examples.synthetic import SyntheticTask, SyntheticTasks, TinyGPT, collate


def _val_loader():
    return DataLoader(SyntheticTask("math", 8, seed=1), batch_size=8, collate_fn=collate)


class _FlaggedBatches(pl.Callback):
    """Records (task tag, sample id) of every training batch of a flagged step."""

    def __init__(self, fm: FisherMonitor) -> None:
        self.fm, self.samples, self.steps = fm, [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.fm.is_flagged(trainer.global_step):
            self.steps.append([t for t in batch["task"]])
            self.samples.extend(zip(batch["task"], batch["sample_id"].tolist()))


def test_rehearsal_keeps_replayed_samples_apart_from_the_probe_set(tmp_path):
    """Item 1. Before: run_probe's reset of 'general' wiped the replayed training samples at every
    boundary (their Fisher count, EMA and store went to zero); now they live under
    'general@train' and the probe set under 'general'."""
    mixture = ConcatDataset([OffsetIds("general", 32, 0), OffsetIds("math", 96, 10_000)])
    train = DataLoader(
        mixture, batch_size=8, shuffle=True, collate_fn=collate, generator=torch.Generator().manual_seed(0)
    )
    probe = DataLoader(SyntheticTask("general", 8, seed=2), batch_size=8, collate_fn=collate)
    fm = FisherMonitor(
        train_task="math",
        reference_tasks={"general": probe},
        capture_every_n_steps=2,
        ema_samples_per_step=0,
        max_samples_per_task=64,
    )
    rm = ForgettingRiskMonitor(fm, reference_tasks=["general"])
    qm = QKOVInterferenceMonitor(fm, pairs=[("general", "math"), ("general@train", "math")], n_permutations=5)
    rec = _FlaggedBatches(fm)
    _trainer(tmp_path, [fm, qm, rm, rec]).fit(TinyGPT(**TINY), train, _val_loader())
    replayed = [sid for task, sid in rec.samples if task == "general"]
    assert replayed, "the shuffled mixture must replay general samples on flagged steps"
    c = fm.collector
    assert c.num_samples("general@train") == len(replayed)  # nothing wiped by the two boundaries
    assert sorted(c.sample_ids("general@train")) == sorted(replayed)
    assert c.ema_steps("general@train") == sum("general" in tags for tags in rec.steps)
    math_ids = [sid for task, sid in rec.samples if task == "math"]
    assert c.num_samples("math") == len(math_ids)
    assert c.num_samples("general") == 8 and sorted(c.sample_ids("general")) == list(range(8))  # probe
    assert ("general@train", "math") in qm.latest and ("general", "math") in qm.latest
    assert rm.history["general"]["step"] == [4, 8]


def test_typo_in_a_pair_is_an_error_and_every_distinct_warning_reaches_the_user(tmp_path):
    """Item 3. Before: a pair naming an unknown task logged zeros with one swallowed warning, and
    only the first warning caught during a heatmap reached the user."""
    dm = SyntheticTasks(n_train=64, n_val=8, n_probe=4, batch_size=8)
    fm = FisherMonitor(train_task="math", reference_tasks=["general"], capture_every_n_steps=2)
    qm = QKOVInterferenceMonitor(fm, pairs=[("general", "maths")], n_permutations=5)
    with pytest.raises(
        ValueError, match=r"unknown task\(s\) \['maths'\]; known tasks: \['general', 'math'\]"
    ):
        _trainer(tmp_path, [fm, qm]).fit(TinyGPT(**TINY), datamodule=dm)

    fm = FisherMonitor(train_task="math", reference_tasks=["general"], capture_every_n_steps=4)
    qm = QKOVInterferenceMonitor(fm, pairs=[("general", "math")], n_permutations=5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trainer(tmp_path, [fm, qm], max_steps=12).fit(TinyGPT(**TINY), datamodule=dm)
    relayed = [str(w.message) for w in caught if str(w.message).startswith("QKOVInterferenceMonitor")]
    # each points at the monitor's line that caught it, not at contextlib's exit
    where = {Path(w.filename).name for w in caught if str(w.message).startswith("QKOVInterferenceMonitor")}
    assert where == {"qkov.py"}, where  # the engine's line
    # first boundary: both Fishers are small (4 probe samples; 8 math samples from step 0), two
    # distinct warnings of one heatmap; later boundaries repeat the probe one: shown once
    general = [m for m in relayed if "the Fisher of task 'general' comes from 4 sample(s)" in m]
    maths = [m for m in relayed if "the Fisher of task 'math' comes from 8 sample(s)" in m]
    assert len(general) == 1 and len(maths) == 1, relayed
    assert len(relayed) == len(set(relayed))


def test_probe_cap_cuts_string_ids_and_integer_task_tags_are_tasks(tmp_path):
    """Item 4. Before: probe_max_samples cut the tensors but not a list of string ids ("8 sample
    ids for 4 samples": the probe set silently unwatched), and integer task tags disabled the
    capture for the rest of the run."""

    def string_ids(items):
        batch = collate(items)
        batch["sample_id"] = [f"g{i}" for i in batch["sample_id"].tolist()]
        return batch

    def int_tags(items):
        batch = collate(items)
        batch["task"] = torch.full((len(items),), 3)
        return batch

    probe = DataLoader(SyntheticTask("general", 8, seed=2), batch_size=8, collate_fn=string_ids)
    train = DataLoader(SyntheticTask("math", 64), batch_size=8, collate_fn=int_tags)
    fm = FisherMonitor(
        train_task="math", reference_tasks={"general": probe}, capture_every_n_steps=2, probe_max_samples=4
    )
    rm = ForgettingRiskMonitor(fm, reference_tasks=["general"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trainer(tmp_path, [fm, rm]).fit(TinyGPT(**TINY), train, _val_loader())
    messages = [str(w.message) for w in caught]
    assert not any("failed" in m for m in messages), messages
    assert fm.collector.sample_ids("general") == ["g0", "g1", "g2", "g3"]
    assert fm.probe["general"].n == 4 and rm.history["general"]["step"] == [4, 8]
    assert not fm.capture_failed and fm.captured_steps == 4
    assert fm.collector.num_samples("3") == 32  # 4 flagged steps x 8 samples tagged 3


def test_monitor_and_collector_pickle_with_their_rng_state():
    """Item 6 (unit; the regression test is the ddp_spawn fit in test_distributed_reliability.py).
    The RNG travels as plain bytes through multiprocessing's pickler (a tensor would go through
    shared memory, which made ddp_spawn fail at launch) and continues where it was."""
    from multiprocessing.reduction import ForkingPickler

    fm = FisherMonitor(seed=3)
    torch.randperm(5, generator=fm._steps.rng.generator)  # used: the state, not the seed, must travel
    clone = pickle.loads(ForkingPickler.dumps(fm))
    expected = torch.randperm(9, generator=fm._steps.rng.generator)
    assert torch.equal(torch.randperm(9, generator=clone._steps.rng.generator), expected)
    assert isinstance(fm._steps.rng.__getstate__()["state"], bytes)
    collector = FisherCollector(TinyGPT(**TINY), seed=5)
    torch.rand(4, generator=collector.generator)
    clone = pickle.loads(ForkingPickler.dumps(collector))
    expected = torch.rand(6, generator=collector.generator)
    assert torch.equal(torch.rand(6, generator=clone.generator), expected)
    state = collector.state_dict()["generator"]
    assert state.dtype == torch.uint8 and state.device.type == "cpu"


def _tensor_bytes(tree) -> int:
    if torch.is_tensor(tree):
        return tree.numel() * tree.element_size()
    if isinstance(tree, dict):
        return sum(_tensor_bytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(_tensor_bytes(v) for v in tree)
    return 0


def test_checkpoint_switches_and_the_overhead_formula(tmp_path):
    """Item 7. Before: no way to keep the store and the parameter copies out of checkpoints. The
    formula of docs/costs.md gives the callback state's tensor bytes; resume without them still works."""
    sizes, paths = {}, {}
    for light in (False, True):
        ckpt = ModelCheckpoint(dirpath=tmp_path / f"ckpt{light}", every_n_train_steps=8, save_top_k=-1)
        fm = FisherMonitor(
            train_task="math",
            reference_tasks=["general"],
            capture_every_n_steps=2,
            max_samples_per_task=16,
            checkpoint_store=not light,
        )
        rm = ForgettingRiskMonitor(fm, reference_tasks=["general"], checkpoint_params=not light)
        dm = SyntheticTasks(n_train=64, n_val=8, n_probe=8, batch_size=8)
        model = TinyGPT(**TINY)
        trainer = _trainer(tmp_path, [fm, rm, ckpt], enable_checkpointing=True)
        trainer.fit(model, datamodule=dm)
        paths[light] = next((tmp_path / f"ckpt{light}").glob("*.ckpt"))
        state = torch.load(paths[light], weights_only=False)["callbacks"]
        sizes[light] = {"fm": _tensor_bytes(state[fm.state_key]), "rm": _tensor_bytes(state[rm.state_key])}
        # docs/costs.md: sum over tasks of n_stored * P_mon * itemsize + P_mon * 4 * (1 + has_ema [+ synced])
        p_mon = sum(math.prod(s) for s in fm.collector.param_shapes.values())
        p_all = sum(p.numel() for p in model.parameters() if p.requires_grad)
        c = fm.collector
        n_stored = 0 if light else sum(c.num_stored(t) for t in c.tasks)
        fm_expected = n_stored * p_mon * 4 + sum(p_mon * 4 * (1 + (c.ema_steps(t) > 0)) for t in c.tasks)
        # anchor + anchor Fisher per reference task (+ the trainable params at the last
        # measurement, fp32, and R probe gradients there in gradient_dtype, bf16 by default)
        rm_expected = p_mon * 4 + 1 * p_mon * 4 + (0 if light else p_all * 4 + 1 * p_all * 2)
        slack = 16_384  # RNG states (5 KB each), counters, the accumulators' per-head sums
        assert fm_expected <= sizes[light]["fm"] <= fm_expected + slack, (light, sizes, fm_expected)
        assert rm_expected <= sizes[light]["rm"] <= rm_expected + slack, (light, sizes, rm_expected)
    assert sizes[True]["fm"] < sizes[False]["fm"] / 3 and sizes[True]["rm"] < sizes[False]["rm"] / 3
    # resume from the light checkpoint: Fisher sums and EMA kept, store refills, prediction restarts
    fm = FisherMonitor(
        train_task="math", reference_tasks=["general"], capture_every_n_steps=2, max_samples_per_task=16
    )
    rm = ForgettingRiskMonitor(fm, reference_tasks=["general"])
    dm = SyntheticTasks(n_train=64, n_val=8, n_probe=8, batch_size=8)
    _trainer(tmp_path, [fm, rm], max_steps=12).fit(TinyGPT(**TINY), datamodule=dm, ckpt_path=str(paths[True]))
    assert fm.collector.num_samples("math") == 6 * 8  # 4 flagged steps before, 2 after the resume
    assert fm.collector.num_stored("math") == 16  # refilled from the samples after the resume
    assert fm.collector.ema_steps("math") == 6  # the flagged steps (EMA every 4: also flagged)
    hist = rm.history["general"]
    # the boundary of the checkpoint step (8, saved before its validation) is evaluated at resume
    assert hist["step"] == [4, 8, 12] and all(math.isfinite(v) for v in hist["predicted"])


def test_all_masked_batch_counts_and_column_id_tensors_are_flattened(tmp_path):
    """Item 8. Before: ``[B, 1]`` sample-id tensors were stored as one-element lists. A batch with
    every label -100 (NaN loss) counts as a captured step with no sample, never a skipped one."""
    calls = []

    def masked_first(items):
        batch = collate(items)
        if not calls:
            batch["labels"] = torch.full_like(batch["labels"], -100)
        calls.append(1)
        batch["sample_id"] = batch["sample_id"].view(-1, 1)  # [B, 1]
        return batch

    train = DataLoader(SyntheticTask("math", 16), batch_size=8, collate_fn=masked_first)
    fm = FisherMonitor(train_task="math", capture_every_n_steps=1, ema_samples_per_step=0)
    trainer = _trainer(tmp_path, [fm], max_steps=2, val_every=None, limit_train_batches=2)
    trainer.fit(TinyGPT(**{**TINY, "lr": 0.0}), train)
    assert fm.captured_steps == 2 and fm.skipped_steps == 0
    assert fm.collector.num_samples("math") == 8
    assert fm.collector.sample_ids("math") == list(range(8, 16))
    buffer = io.BytesIO()
    torch.save(fm.state_dict(), buffer)  # plain ints: the state saves and loads
    saved = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)["collector"]
    assert saved["store"]["tasks"]["math"]["ids"][0] == 8
