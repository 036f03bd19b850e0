"""The README's promises: it starts with the two commands, its quick-start runs as it is, and its
links (and those of the pages under docs/) lead to files and headings that exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


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


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # no headings inside code blocks
    return {_slug(h) for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}


def test_readme_and_docs_links_resolve():
    pages = [README, *sorted((ROOT / "docs").glob("*.md"))]
    assert len(pages) > 1
    checked = 0
    for page in pages:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # http(s) and other schemes
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            assert dest.exists(), f"{page.name}: link to {target} leads nowhere"
            if anchor:
                assert anchor in _anchors(dest), f"{page.name}: no heading #{anchor} in {dest.name}"
            checked += 1
    assert checked >= 10  # the README points to every docs page


def test_readme_hf_quickstart_runs_as_written(tmp_path, monkeypatch):
    section = README.read_text().split("## Quick start: Hugging Face Trainer and TRL", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    assert "from fisher_callbacks.hf import FisherTrainerCallback" in code
    monkeypatch.chdir(tmp_path)  # the Trainer writes hf_quickstart/ here
    namespace: dict = {"__name__": "__readme_hf__"}
    exec(compile(code, f"{README}:hf-quick-start", "exec"), namespace)
    trainer, callback = namespace["trainer"], namespace["callback"]
    assert trainer.state.global_step == 20
    assert callback.forgetting.history["count"]["step"] == [10, 20]
    rows = trainer.state.log_history
    for key in ("forgetting/count/predicted", "qkov/count_vs_skip/Q/fisher_overlap", "fisher/skip/trace"):
        assert any(key in r for r in rows), key
    assert callback.fisher.collector.num_samples("skip") > 0
