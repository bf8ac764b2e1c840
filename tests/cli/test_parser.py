"""The command line's shared flags: ``--study``, ``--storage`` and ``--tracking-uri`` mean the
same in every command that takes them, and say so in the same words."""

from __future__ import annotations

import argparse

from tlsweep.cli._main import build_parser

SHARED = ("--study", "--storage", "--tracking-uri")


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def test_the_study_storage_and_tracking_flags_are_the_same_in_every_command() -> None:
    seen: dict[str, set[tuple[str | None, str | None, str | None]]] = {f: set() for f in SHARED}
    users: dict[str, list[str]] = {f: [] for f in SHARED}
    for name, command in _commands().items():
        for action in command._actions:
            for flag in set(action.option_strings) & set(SHARED):
                seen[flag].add((action.dest, action.metavar, action.help))
                users[flag].append(name)
    assert {"run", "status", "best", "export", "ui"} <= set(users["--study"])
    assert {"run", "status", "best", "export"} <= set(users["--storage"])
    assert {"run", "best", "export", "ui"} <= set(users["--tracking-uri"])
    for flag, forms in seen.items():
        assert len(forms) == 1, f"{flag} differs between commands: {forms}"
        ((_, metavar, text),) = forms
        assert metavar and text and "overrides" in text, (flag, metavar, text)
