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

from tlsweep.features import FINETUNE_DIR, IMAGES_DIR
from tlsweep.files import atomic_write, replaced_atomically

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
    with atomic_write(folder / STATE) as f:
        json.dump(state, f, indent=1, default=str)


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
    with replaced_atomically(folder / name, suffix=".npz") as tmp:  # savez adds .npz otherwise
        np.savez(tmp, *model.get_weights())
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


# --- what fine-tuning keeps in the cache folder, for `tlsweep cache list / clear` --------------


def folder_bytes(folder: Path) -> int:
    """The size of every file under ``folder``."""
    total = 0
    for root, _, files in os.walk(folder):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, f)).st_size
    return total


def _writer_alive(folder: Path) -> bool:
    """Whether the process writing a temporary image folder (``<name>.tmp-<pid>-<id>``) runs."""
    pid = folder.name.rpartition(".tmp-")[2].split("-")[0]
    if ".tmp-" not in folder.name or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # someone else's process
    return True


def side_folders(cache_dir: Path) -> dict[str, list[tuple[Path, bool]]]:
    """kind (FINETUNE_DIR, IMAGES_DIR) -> (folder, in use) of each: a stage whose lock a live
    process holds; decoded images being written, or while any stage runs (it reads them)."""
    from tlsweep.files import lock_held

    out: dict[str, list[tuple[Path, bool]]] = {}
    for kind in (FINETUNE_DIR, IMAGES_DIR):
        base = Path(cache_dir) / kind
        found = sorted(p for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
        out[kind] = [
            (p, lock_held(p / LOCK) if kind == FINETUNE_DIR else _writer_alive(p)) for p in found
        ]
    if any(used for _, used in out[FINETUNE_DIR]):
        out[IMAGES_DIR] = [(p, True) for p, _ in out[IMAGES_DIR]]
    return out


def clear_side(cache_dir: Path, kinds: list[str], match: str | None = None) -> list[str]:
    """Remove the fine-tuning stages and/or decoded images (``kinds``) whose name contains
    ``match``, except what a live process holds (logged); the removed ``kind/name``s."""
    import logging
    import shutil

    log = logging.getLogger(__name__)
    removed = []
    for kind, items in side_folders(cache_dir).items():
        for p, used in items if kind in kinds else []:
            if match and match not in p.name:
                continue
            if used:
                log.warning("%s/%s: in use by a running process; left alone", kind, p.name)
                continue
            shutil.rmtree(p, ignore_errors=True)
            removed.append(f"{kind}/{p.name}")
        with contextlib.suppress(OSError):
            (Path(cache_dir) / kind).rmdir()  # when empty
    return removed
