"""A command's one-line help comes from the module that implements it, so it cannot drift."""

import subprocess
import sys

import fastinfluence.demo
from fastinfluence.cli import build_parser, summary


def command_help(parser, name: str) -> str:
    sub = next(a for a in parser._actions if a.dest == "command")
    return next(a.help for a in sub._choices_actions if a.dest == name)


def test_summary_is_the_first_paragraph_on_one_line():
    assert summary("\n  Find the poisoned\n  examples.\n\n  More detail.\n") == "Find the poisoned examples"


def test_demo_help_is_its_docstring_whether_or_not_the_module_is_loaded():
    expected = summary(fastinfluence.demo.__doc__)
    assert "backdoor" in expected.lower()
    assert command_help(build_parser(None), "demo") == expected  # the stub `fastinfluence --help` shows
    assert command_help(build_parser("demo"), "demo") == expected  # the demo's own registration


def test_top_level_help_describes_the_demo():
    out = subprocess.run([sys.executable, "-m", "fastinfluence", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert " ".join(out.stdout.split()).count(summary(fastinfluence.demo.__doc__)) == 1
