"""`tlsweep`, `tlsweep --help`: the commands in the order a user meets them, with examples."""

from __future__ import annotations

import re

import pytest
from conftest import CliInProcess, run_cli

from tlsweep.cli import _help
from tlsweep.cli import _main as cli_main


def listed(help_text: str) -> list[str]:
    """The commands argparse lists under COMMAND, in order."""
    block = help_text.split("COMMAND\n", 2)[-1].split("\n\n")[0]
    return re.findall(r"^    (\w+)", block, re.M)


def examples(help_text: str) -> list[str]:
    block = help_text.split("examples, in the order you meet the commands:\n")[1].split("\n\n")[0]
    return [line.split()[0] for line in block.splitlines()]


def test_help_lists_the_commands_in_the_order_a_user_meets_them(cli: CliInProcess) -> None:
    r = cli("--help")
    assert r.returncode == 0, r.stderr
    registered = sorted(cli_main.build_parser()._subparsers._group_actions[0].choices)
    expected = [n for n in _help.COMMAND_ORDER if n in registered]
    assert expected[:7] == ["init", "run", "ui", "status", "best", "export", "predict"]
    assert expected[-3:] == ["cache", "extract", "backbones"]
    assert listed(r.stdout) == expected
    assert examples(r.stdout) == expected  # one example each, same order
    for name in expected:
        line = next(x for x in r.stdout.splitlines() if x.startswith(f"  {name} "))
        assert f"tlsweep {name}" in line
    assert "tlsweep init ./photos && tlsweep run sweep.yaml && tlsweep ui sweep.yaml" in r.stdout


def test_a_command_not_in_the_declared_order_comes_last(monkeypatch: pytest.MonkeyPatch) -> None:
    def register(sub: object) -> None:
        sub.add_parser("zzznew", help="a command added later")  # type: ignore[attr-defined]

    monkeypatch.setattr(cli_main, "_EXTRA_COMMANDS", [*cli_main._EXTRA_COMMANDS, register])
    text = cli_main.build_parser().format_help()
    assert listed(text)[0] == "init" and listed(text)[-1] == "zzznew"
    assert "zzznew" not in examples(text)


def test_no_arguments_prints_the_help_and_exits_2() -> None:
    r = run_cli()
    assert r.returncode == 2
    assert r.stdout == ""
    assert r.stderr.startswith("usage: tlsweep")
    assert listed(r.stderr)[:3] == ["init", "run", "ui"]
    assert "Traceback" not in r.stderr
    errors = [x for x in r.stderr.splitlines() if x.startswith("tlsweep: error:")]
    assert errors == ["tlsweep: error: no COMMAND given; pick one of those above"]
    assert r.stderr.endswith(errors[0] + "\n")
