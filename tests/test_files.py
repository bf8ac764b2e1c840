"""The one atomic write: a file is the old one whole or the new one whole, and a failed or
interrupted write leaves no temporary file beside it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tlsweep.files import atomic_write, replaced_atomically


class _Unprintable:
    def __str__(self) -> str:
        raise KeyboardInterrupt  # Ctrl-C in the middle of the write


def test_atomic_write_replaces_whole_or_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_write(target) as f:
        f.write("half of the new")
        raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]

    with atomic_write(target) as f:
        f.write("new")
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_replaced_atomically_gives_a_path_with_the_suffix_beside_the_target(
    tmp_path: Path,
) -> None:
    target = tmp_path / "best-3.npz"
    with replaced_atomically(target, suffix=".npz") as tmp:
        assert tmp.parent == tmp_path and tmp.name.endswith(".npz") and ".tmp-" in tmp.name
        np.savez(tmp, np.arange(3))
    with np.load(target) as z:
        assert z["arr_0"].tolist() == [0, 1, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["best-3.npz"]


def test_an_interrupted_finetune_state_write_keeps_the_old_state_and_no_temporary(
    tmp_path: Path,
) -> None:
    from tlsweep.winner._finetune_files import STATE, read_state, write_state

    write_state(tmp_path, {"key": "k", "epochs_done": 1, "best_file": "best-1.npz"})
    with pytest.raises(KeyboardInterrupt):
        write_state(tmp_path, {"key": "k", "epochs_done": 2, "bad": _Unprintable()})
    assert read_state(tmp_path, "k")["epochs_done"] == 1
    assert [p.name for p in tmp_path.iterdir()] == [STATE]
