"""Memory ledger: bytes per named group, each tensor once, logged at train start."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger

from fisher_callbacks.callbacks import FisherMonitor, ForgettingRiskMonitor, QKOVInterferenceMonitor
from fisher_callbacks.fisher import FisherCollector
from fisher_callbacks.memory import format_ledger, suite_ledger, tensor_bytes, total_mb, trainable_bytes
from lightning_examples.synthetic import SyntheticTasks, TinyGPT
from tests.tiny_models import lm_batch, tiny_causal_lm


def test_tensor_bytes_counts_each_storage_once():
    a = torch.zeros(10, 4)
    views = {"x": a[0], "y": a[1:3], "z": [a, a.T]}
    seen: set = set()
    assert tensor_bytes(views, seen) == 160
    assert tensor_bytes(a, seen) == 0  # already counted
    assert tensor_bytes(torch.zeros(3, dtype=torch.bfloat16)) == 6


def test_meta_tensors_have_sizes():
    t = torch.empty(1000, 4, device="meta")
    assert tensor_bytes({"a": t, "b": torch.empty(5, device="meta")}) == 16000 + 20


def test_collector_ledger_matches_its_tensors():
    model = tiny_causal_lm("gpt2")
    col = FisherCollector(model, store="exact", gradient_memory_mb=4, ema_decay=0.9)
    batch = lm_batch(4, 10)
    col.collect(batch, "a")
    col.update_ema(batch, "a")
    held = col.fisher("a")
    ledger = col.memory_ledger()
    weight_bytes = sum(4 * torch.Size(s).numel() for s in col.param_shapes.values())
    assert ledger["fisher_sum[a]"] == weight_bytes
    assert ledger["ema[a]"] == weight_bytes
    assert ledger["fisher_cache"] == weight_bytes
    rows = ledger["store.rows[a]"]
    assert rows >= 4 * weight_bytes  # 4 stored samples (capacity grows geometrically)
    assert rows == tensor_bytes(col.store._tasks["a"])
    # the Fisher means are cached only while a caller holds them
    assert col.fisher("a") is held
    del held
    assert "fisher_cache" not in col.memory_ledger()


def test_sketch_store_ledger_names_the_whitening():
    model = tiny_causal_lm("llama")
    col = FisherCollector(model, store="sketch", sketch_dim=16)
    col.collect(lm_batch(4, 10), "a")
    ledger = col.memory_ledger()
    weight_bytes = sum(4 * torch.Size(s).numel() for s in col.param_shapes.values())
    assert ledger["store.whitening"] == weight_bytes
    assert "store.rows[a]" in ledger


def _fit(tmp_path, callbacks):
    dm = SyntheticTasks(n_train=64, n_val=8, n_probe=8, batch_size=8)
    model = TinyGPT(lr=1e-3, n_layer=2, n_head=4, n_embd=32, pretrain_steps=5)
    trainer = pl.Trainer(
        max_steps=4,
        val_check_interval=2,
        limit_val_batches=1,
        callbacks=callbacks,
        logger=CSVLogger(tmp_path),
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
    )
    trainer.fit(model, datamodule=dm)
    return trainer, model


def test_suite_ledger_logged_at_train_start(tmp_path, caplog):
    fm = FisherMonitor(train_task="math", reference_tasks=["general"], capture_every_n_steps=2)
    qm = QKOVInterferenceMonitor(fm, pairs=[("general", "math")], n_permutations=10)
    rm = ForgettingRiskMonitor(fm, reference_tasks=["general"])
    with caplog.at_level(logging.INFO, logger="fisher_callbacks"):
        trainer, model = _fit(tmp_path, [fm, qm, rm])
    assert any("memory ledger" in r.getMessage() for r in caplog.records)
    text = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    assert "fisher/memory_mb" in text
    ledger = suite_ledger([fm, qm, rm], model)
    assert ledger and all(v > 0 for v in ledger.values())
    # the anchor is a copy of the monitored weights; the model's own weights are never counted
    monitored = sum(model.get_parameter(n).numel() * 4 for n in fm.layout.monitored_parameters())
    assert ledger["ForgettingRiskMonitor/anchor"] == monitored
    # a tensor shared by two monitors (the probe gradient) is counted once
    assert total_mb(ledger) * 2**20 == sum(ledger.values())
    separately = sum(sum(m.memory_ledger(None).values()) for m in (fm, qm, rm))
    assert sum(ledger.values()) <= separately
    table = format_ledger(ledger, trainable_bytes(model))
    assert "total" in table and "x trainable weights" in table


def test_probe_gradients_kept_only_for_a_reader(tmp_path):
    """Without a ForgettingRiskMonitor no probe pass keeps a weight-sized gradient; with one,
    the gradient is there (and counted once although both monitors hold it)."""
    fm = FisherMonitor(train_task="math", reference_tasks=["general"], capture_every_n_steps=2)
    qm = QKOVInterferenceMonitor(fm, pairs=[("general", "math")], n_permutations=10)
    _fit(tmp_path / "a", [fm, qm])
    assert fm.probe["general"].grad == {}
    assert fm.probe["general"].n > 0
    assert "probe" not in fm.memory_ledger() or fm.memory_ledger()["probe"] < 2**12
    fm = FisherMonitor(train_task="math", reference_tasks=["general"], capture_every_n_steps=2)
    rm = ForgettingRiskMonitor(fm, reference_tasks=["general"])
    _, model = _fit(tmp_path / "b", [fm, rm])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(fm.probe["general"].grad) == trainable


def test_available_memory_is_known_on_a_linux_cpu_or_none():
    from fisher_callbacks.memory import available_memory

    free = available_memory(torch.device("cpu"))
    assert free is None or free > 0
    if Path("/proc/meminfo").is_file():
        assert free is not None
    assert available_memory(torch.device("meta")) is None
