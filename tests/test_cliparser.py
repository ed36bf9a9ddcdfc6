"""The command line explains itself: every flag has help with its default, every command
has examples, the README's command section matches, and --version comes from the metadata.

The checks iterate over whatever commands the parser has, so new commands and flags
are held to the same convention (see the docstring of actclust/cliparser.py).
"""

import argparse
import importlib.metadata
import re

import pytest

from actclust.cli import COMMANDS
from actclust.cliparser import build_parser
from helpers import REPO, run_cli


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _documented_actions(parser: argparse.ArgumentParser):
    return [a for a in parser._actions if not isinstance(a, (argparse._HelpAction,
                                                              argparse._SubParsersAction))]


def _examples(parser: argparse.ArgumentParser) -> list[str]:
    text = parser.format_help()
    assert "\nexamples:\n" in text, f"`{parser.prog} --help` has no examples section"
    tail = text.split("\nexamples:\n", 1)[1]
    return [line.strip() for line in tail.splitlines() if line.strip()]


def _readme_commands() -> str:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    return readme.split("\n## Commands\n", 1)[1].split("\n## ", 1)[0]


def test_there_are_commands_and_each_has_a_handler():
    commands = _commands()
    assert {"extract", "verify", "cluster", "evaluate", "run", "sweep", "report"} <= set(commands)
    assert set(commands) == set(COMMANDS)


@pytest.mark.parametrize("command", [None, *_commands()])
def test_every_argument_has_one_line_help_with_its_default(command):
    parser = build_parser() if command is None else _commands()[command]
    missing, no_default = [], []
    for action in _documented_actions(parser):
        name = action.option_strings[-1] if action.option_strings else action.dest
        text = action.help
        if not text or text == argparse.SUPPRESS or not text.strip():
            missing.append(name)
            continue
        assert "\n" not in text, f"{parser.prog} {name}: help must be one line"
        takes_value = action.option_strings and action.nargs != 0
        if takes_value and "(default: " not in text and "(required" not in text:
            no_default.append(name)
    assert not missing, f"`{parser.prog}`: no help text for {missing}"
    assert not no_default, f"`{parser.prog}`: help says neither (default: ...) nor (required) " \
                           f"for {no_default}"


@pytest.mark.parametrize("command", [None, *_commands()])
def test_every_help_renders_and_ends_with_one_or_two_examples(command):
    parser = build_parser() if command is None else _commands()[command]
    examples = _examples(parser)
    assert 1 <= len(examples) <= 2, examples
    for line in examples:
        assert line.startswith("actclust " if command is None else f"actclust {command}"), line
    assert parser.description and not re.search(r"``|:class:|:func:|::", parser.description)


def test_top_level_help_is_prose_with_every_command(capsys):
    proc = run_cli("--help")
    assert proc.returncode == 0, proc.stderr
    first = proc.stdout.split("\n\n")[1]
    assert first.startswith("actclust records which FFN neurons")
    assert "``" not in proc.stdout
    for command in _commands():
        assert re.search(rf"^\s+{command}\s+\S", proc.stdout, re.M), command


def test_version_comes_from_the_package_metadata():
    proc = run_cli("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"actclust {importlib.metadata.version('actclust')}"


@pytest.mark.parametrize("command", list(_commands()))
def test_readme_lists_every_flag_and_example_of_each_command(command):
    section = _readme_commands()
    synopsis = [line for line in section.splitlines() if line.startswith(f"actclust {command} ")
                or line == f"actclust {command}"]
    assert synopsis, f"README's Commands section has no `actclust {command} ...` line"
    flags = {opt for a in _documented_actions(_commands()[command]) for opt in a.option_strings
             if opt.startswith("--") and opt not in ("--verbose",)}
    listed = set(re.findall(r"--[a-z][a-z-]*", synopsis[0]))
    assert flags <= listed, f"README's `actclust {command}` line lacks {sorted(flags - listed)}"
    for example in _examples(_commands()[command]):
        assert example in section, f"README's Commands section lacks the example: {example}"
