"""The README's promises: it starts with the two commands, and its quick-start runs as it is."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def _quickstart() -> str:
    text = README.read_text()
    section = text.split("## Quick start", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, flags=re.S)
    assert match, "no python block in the README's quick start"
    return match.group(1)


def test_readme_starts_with_the_two_commands():
    first_block = re.search(r"```bash\n(.*?)```", README.read_text(), flags=re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.splitlines()]
    assert commands == ["make demo", "make test"]


def test_readme_quickstart_runs_as_written(tmp_path, monkeypatch):
    code = _quickstart()
    for needed in ("import fisher_callbacks as fc", "import lightning.pytorch as pl", "probe = DataLoader"):
        assert needed in code
    monkeypatch.chdir(tmp_path)  # the Trainer writes lightning_logs/ here
    namespace: dict = {"__name__": "__readme__"}
    exec(compile(code, f"{README}:quick-start", "exec"), namespace)
    trainer = namespace["trainer"]
    assert trainer.global_step == 20
    metrics = trainer.callback_metrics
    for name in (
        "forgetting/count/measured",
        "forgetting/count/predicted",
        "qkov/count_vs_skip/Q/fisher_overlap",
    ):
        assert name in metrics, name
    assert namespace["monitor"].collector.num_samples("skip") > 0
