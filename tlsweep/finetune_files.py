"""The fine-tuning stage's folder on disk (``<cache_dir>/finetune/<study>-trial<N>-<key>/``).

What a resumed stage reads back after a kill: ``state.json``, which names the current
checkpoint and best weights; the checkpoints and best weights themselves, each with its epoch
in its name; ``final.keras`` once the stage is complete; and ``lock``, held by the one process
working in the folder. Every file is written under a temporary name and renamed, and
``state.json`` is replaced last, so the files of an epoch cut short are never the ones it names.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

STATE = "state.json"
LOCK = "lock"  # held by the one process working in the stage's folder
FINAL = "final.keras"  # the best fine-tuned model, written when the stage is complete
LEGACY_BEST = "best-weights.npz"  # the best weights' name before it carried its epoch


def read_state(folder: Path, key: str) -> dict[str, Any]:
    """The stage's state, or ``{}`` when there is none for this ``key`` (new or other settings)."""
    state: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        state = json.loads((folder / STATE).read_text())
    if state.get("key") != key:
        return {}
    if state.get("epochs_done"):
        state.setdefault("best_file", LEGACY_BEST)  # a state written before it had the name
    return state


def write_state(folder: Path, state: dict[str, Any]) -> None:
    """Replace ``state.json`` atomically (written, synced, renamed)."""
    path = folder / STATE
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(state, f, indent=1, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def add_seconds(folder: Path, key: str, seconds: float) -> None:
    """Add the time an interrupted process spent to the state on disk, not to the one in its
    memory, which an epoch cut short may have half changed (a best score its checkpoint lacks)."""
    state = read_state(folder, key)
    if state and not state.get("complete"):
        state["seconds"] = float(state.get("seconds", 0.0)) + seconds
        write_state(folder, state)


def save_best(model: Any, folder: Path, epoch: int) -> str:
    """The model's weights (no optimizer state) at its best validation score so far, named
    after the epoch; returns the name, for ``state.json``."""
    name = f"best-{epoch}.npz"
    tmp = folder / f"best-{epoch}.tmp-{os.getpid()}.npz"
    np.savez(tmp, *model.get_weights())
    os.replace(tmp, folder / name)
    return name


def load_weights(model: Any, path: Path) -> None:
    with np.load(path, allow_pickle=False) as z:
        model.set_weights([z[f"arr_{i}"] for i in range(len(z.files))])


def tidy(folder: Path, keep: set[str]) -> None:
    """Remove the checkpoints, weights and temporary files not in ``keep``: what epochs cut
    short by a kill left (the caller holds the folder's lock)."""
    for f in folder.iterdir():
        if f.name not in keep and (f.suffix in (".npz", ".keras") or ".tmp-" in f.name):
            with contextlib.suppress(OSError):
                f.unlink()
