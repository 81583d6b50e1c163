"""``--help`` and the README's synopsis stay true to the parser (issue 22, item 13): every
option a command takes is in the README's "Command line" block, and help text is wrapped to
the terminal."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from objstream.common.cli import GLOBAL_OPTIONS, build_parser

README = Path(__file__).resolve().parents[2] / "README.md"
GLOBAL = {*GLOBAL_OPTIONS, "--connect-timeout", "--tls-ca", "--tls-cert", "--tls-key", "--quiet"}


def _synopsis() -> dict[str, set[str]]:
    """Options the README's synopsis gives each command (``JOB OPTIONS`` spelled out)."""
    text = README.read_text()
    block = text.split("## Command line", 1)[1].split("```text", 1)[1].split("```", 1)[0]
    after = block.split("JOB OPTIONS:", 1)[1].split("\nobjstream", 1)[0]
    shared = set(re.findall(r"--[a-z][a-z-]*", after))
    commands: dict[str, set[str]] = {}
    for line in block.splitlines():
        words = line.split()
        if len(words) < 3 or words[0] != "objstream" or words[1] == "--version":
            continue
        options = set(re.findall(r"--[a-z][a-z-]*", line))
        if "[JOB OPTIONS]" in line:
            options |= shared
        commands.setdefault(f"{words[1]} {words[2]}", set()).update(options)
    return commands


def _commands() -> dict[str, set[str]]:
    parser = build_parser()
    found: dict[str, set[str]] = {}
    for side_action in parser._subparsers._group_actions:  # type: ignore[union-attr]
        assert isinstance(side_action, argparse._SubParsersAction)
        for side, side_parser in side_action.choices.items():
            for action in side_parser._subparsers._group_actions:
                assert isinstance(action, argparse._SubParsersAction)
                for name, command in action.choices.items():
                    options = {
                        o
                        for a in command._actions
                        for o in a.option_strings
                        if o.startswith("--") and o not in GLOBAL and o != "--help"
                    }
                    found[f"{side} {name}"] = options
    return found


def test_the_readme_synopsis_names_every_option_of_every_command() -> None:
    synopsis = _synopsis()
    for command, options in _commands().items():
        assert command in synopsis, f"{command} is missing from the README's synopsis"
        missing = options - synopsis[command]
        assert not missing, f"README's synopsis of {command} lacks {sorted(missing)}"
        unknown = synopsis[command] - options - GLOBAL
        assert not unknown, f"README's synopsis of {command} names {sorted(unknown)}"


@pytest.mark.parametrize(
    "argv",
    [["job", "--help"], ["producer", "send-file", "--help"], ["consumer", "listen", "--help"]],
)
def test_help_is_wrapped_to_the_terminal(argv: list[str]) -> None:
    env = {**os.environ, "COLUMNS": "80"}
    done = subprocess.run(
        [sys.executable, "-m", "objstream", *argv], env=env, capture_output=True, text=True,
        check=True,
    )  # fmt: skip
    long = [line for line in done.stdout.splitlines() if len(line) > 80]
    assert not long, long
