"""A command's one-line help is the first paragraph of its module's docstring, so it cannot drift,
and building every command's parser imports neither torch nor transformers."""

import subprocess
import sys

import fastinfluence.cli.demo
from fastinfluence.cli import COMMANDS, build_parser
from fastinfluence.cli.common import summary


def command_help(parser, name: str) -> str:
    sub = next(a for a in parser._actions if a.dest == "command")
    return next(a.help for a in sub._choices_actions if a.dest == name)


def test_summary_is_the_first_paragraph_on_one_line():
    assert summary("\n  Find the poisoned\n  examples.\n\n  More detail.\n") == "Find the poisoned examples"


def test_every_command_help_is_its_module_docstring():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert len(sub.choices) == len(COMMANDS)
    for name, command in sub.choices.items():
        module = sys.modules[command.get_default("func").__module__]
        assert module in COMMANDS and command_help(parser, name) == summary(module.__doc__), name


def test_top_level_help_describes_the_demo():
    expected = summary(fastinfluence.cli.demo.__doc__)
    assert "backdoor" in expected.lower()
    out = subprocess.run([sys.executable, "-m", "fastinfluence", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert " ".join(out.stdout.split()).count(expected) == 1


def test_every_command_help_imports_neither_torch_nor_transformers():
    probe = (
        "import sys, contextlib, io\n"
        "from fastinfluence.cli import COMMANDS, build_parser, main\n"
        "names = list(next(a for a in build_parser()._actions if a.dest == 'command').choices)\n"
        "for argv in [['--help'], ['--version']] + [[n, '--help'] for n in names]:\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        try: main(argv)\n"
        "        except SystemExit: pass\n"
        "print(len(names) == len(COMMANDS), sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "True []", out.stderr[-2000:]
