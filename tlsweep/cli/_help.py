"""``tlsweep --help``: the commands in the order a user meets them, each with a one-line
example. The order is declared here; whatever commands are registered are listed in it (one
not named here comes last), so a command added elsewhere needs no change to this module.
"""

from __future__ import annotations

import argparse
from typing import Any

# The order a user meets the commands: write a sweep file, run it, look at it, use the winner,
# then the maintenance commands.
COMMAND_ORDER = (
    "init",
    "run",
    "ui",
    "status",
    "best",
    "export",
    "predict",
    "audit",
    "cache",
    "extract",
    "backbones",
)
EXAMPLES = {
    "init": "tlsweep init ./photos -o sweep.yaml",
    "run": "tlsweep run sweep.yaml",
    "ui": "tlsweep ui sweep.yaml",
    "status": "tlsweep status sweep.yaml",
    "best": "tlsweep best sweep.yaml",
    "export": "tlsweep export sweep.yaml -o model.keras",
    "predict": "tlsweep predict model.keras ./new_photos --csv predictions.csv",
    "audit": "tlsweep audit sweep.yaml",
    "cache": "tlsweep cache list sweep.yaml",
    "extract": "tlsweep extract sweep.yaml",
    "backbones": "tlsweep backbones",
}


def _rank(name: str) -> tuple[int, str]:
    return (COMMAND_ORDER.index(name) if name in COMMAND_ORDER else len(COMMAND_ORDER), name)


def order_commands(parser: argparse.ArgumentParser, sub: Any) -> None:
    """List ``sub``'s registered commands in :data:`COMMAND_ORDER` and add an example of each
    to ``parser``'s help, in the same order."""
    # argparse lists the commands in the order they were added and has no public way to change
    # it: its listing is the subparsers action's _choices_actions, sorted here in place.
    sub._choices_actions.sort(key=lambda a: _rank(a.dest))
    names = sorted(sub.choices, key=_rank)
    width = max(len(n) for n in names)
    lines = [f"  {n:<{width}}  {EXAMPLES[n]}" for n in names if n in EXAMPLES]
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "a first sweep on your own photos, then its trials in the MLflow UI:\n"
        "  tlsweep init ./photos && tlsweep run sweep.yaml && tlsweep ui sweep.yaml\n\n"
        "examples, in the order you meet the commands:\n" + "\n".join(lines) + "\n\n"
        "tlsweep COMMAND --help shows a command's flags."
    )
