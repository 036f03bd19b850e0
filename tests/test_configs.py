"""Every YAML in configs/ loads through LightningCLI and runs one fast_dev_run step."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_examples.forgetting_demo import DemoCLI
from lightning_examples.synthetic import SyntheticTasks, TinyGPT

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_configs_exist():
    assert {p.name for p in CONFIGS} >= {"forgetting_demo.yaml", "llama_gqa_recipe.yaml"}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_config_loads_and_runs_fast_dev_run(config, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.chdir(tmp_path)
    cli = DemoCLI(
        TinyGPT,
        SyntheticTasks,
        args=[
            "fit",
            "--config",
            str(config),
            "--trainer.fast_dev_run=2",
            "--trainer.devices=1",
            "--trainer.strategy=auto",
            "--trainer.precision=32-true",
            "--model.pretrain_steps=0",
            "--data.n_train=32",
            "--data.n_probe=8",
        ],
        save_config_kwargs={"overwrite": True},
    )
    names = {type(cb).__name__ for cb in cli.trainer.callbacks}
    assert {"FisherMonitor", "QKOVInterferenceMonitor", "ForgettingRiskMonitor"} <= names
    accumulate = cli.trainer.accumulate_grad_batches
    assert cli.trainer.global_step == 2 // accumulate
