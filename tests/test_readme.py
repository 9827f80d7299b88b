"""The README is the front door: short, its links resolve, its quickstart runs, its commands are run."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import save_word_model

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
# Each shell command of the README, and the file that runs it (CI, or a test).
RUN_BY = {
    "make demo": (".ci/run", "make demo-quick"),  # the same target with --quick: CI's time allows no more
    "make test": (".ci/run", "make test"),
    "pip install .": ("tests/test_packaging_wheel.py", '"pip", "wheel"'),
}


def _blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def test_readme_is_at_most_250_lines_and_starts_with_the_two_commands():
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    first = _blocks(text, "bash")[0]
    assert [line.split("#")[0].strip() for line in first.splitlines()] == ["make demo", "make test"]
    for section in ("## Install", "## Quickstart", "## Which path for which job", "## Results", "## Documentation"):
        assert section in text, section


def test_every_shell_command_of_the_readme_is_run_by_ci_or_a_test():
    commands = [
        line.split("#")[0].strip() for block in _blocks(README.read_text(), "bash") for line in block.splitlines()
    ]
    unrun = [c for c in commands if c and c not in RUN_BY]
    assert not unrun, f"run these in CI or a test, and add them to RUN_BY: {unrun}"
    for command, (where, text) in RUN_BY.items():
        assert text in (ROOT / where).read_text(), f"{command}: {where} no longer runs {text}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_and_images_resolve(page):
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text())
    missing = [t for t in targets if "://" not in t and not (page.parent / t).exists()]
    assert not missing, missing


def test_every_docs_page_is_linked_from_the_readme():
    text = README.read_text()
    unlinked = [p.name for p in PAGES[1:] if f"(docs/{p.name})" not in text]
    assert not unlinked, unlinked


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama and a word-level tokenizer that covers the quickstart's words."""
    words = ["what", "is", "plus", "one", "?", *map(str, range(40))]
    return save_word_model(tmp_path_factory.mktemp("model"), words, layers=2)


def test_the_quickstart_runs_as_written(model_dir, tmp_path):
    text = README.read_text()
    (code,) = _blocks(text[text.index("## Quickstart") :], "python")[:1]
    line = 'model_dir = "path/to/model"'
    assert line in code
    code = code.replace(line, f"model_dir = {str(model_dir)!r}")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    top = re.findall(r"'(t\d+)'", proc.stdout)
    assert len(top) == 4, proc.stdout[-2000:]
    assert any((tmp_path / "runs" / "unlearn").glob("checkpoint-*")), "the unlearning run saved no checkpoint"
