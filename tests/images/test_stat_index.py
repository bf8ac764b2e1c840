"""The stat index behind the cache key: a hit reads no image, every change still changes the key.

The files are small random bytes named ``.jpg``: computing the key never decodes an image.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tlsweep.cli._main import build_parser
from tlsweep.config._schema import DEFAULT_VERIFY, DataConfig
from tlsweep.config._sweepfile import load_sweep
from tlsweep.errors import ConfigError
from tlsweep.features._cache import FeatureCache
from tlsweep.images import _digests as D
from tlsweep.images._find import find_images

N_PER_CLASS = 6
HOUR_NS = 3600 * 10**9


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Layout A, two classes, random bytes of 200..400 bytes per file, mtimes an hour old."""
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    old = _now_ns() - HOUR_NS
    for split in ("train", "validation"):
        for cls in ("cats", "dogs"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(N_PER_CLASS):
                p = d / f"{cls}.{i}.jpg"
                p.write_bytes(rng.bytes(int(rng.integers(200, 400))))
                os.utime(p, ns=(old, old))
    return root


def _now_ns() -> int:
    import time

    return time.time_ns()


class Counter:
    """Counts the files whose bytes are read for their digest (and which)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.paths: list[str] = []
        real = D.file_digest

        def counting(path: str) -> str:
            self.paths.append(path)
            return real(path)

        monkeypatch.setattr(D, "file_digest", counting)

    def take(self) -> list[str]:
        out, self.paths = sorted(self.paths), []
        return out


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> Counter:
    # utime sets ctime to now, so every file of the fixture changed "just now": without this,
    # the racy-entry rule would (rightly) keep them all out of the index for 5 s.
    monkeypatch.setattr(D, "RACY_NS", 0)
    return Counter(monkeypatch)


def _digest(root: Path, index: Path | None, verify: bool = False) -> str:
    return D.content_digest(find_images(DataConfig(dir=root)), index=index, verify=verify)


def _first(root: Path) -> Path:
    return root / "train" / "cats" / "cats.0.jpg"


def test_unchanged_folder_reads_no_image(folder: Path, tmp_path: Path, reads: Counter) -> None:
    index = tmp_path / "cache" / "index.json"
    full = _digest(folder, None)
    assert len(reads.take()) == 4 * N_PER_CLASS
    assert _digest(folder, index) == full  # the first run through the index hashes everything
    assert len(reads.take()) == 4 * N_PER_CLASS
    written = index.stat().st_mtime_ns
    for _ in range(2):
        assert _digest(folder, index) == full
        assert reads.take() == []  # not one image opened
    assert index.stat().st_mtime_ns == written  # a hit does not rewrite the index
    assert [p.name for p in index.parent.iterdir()] == [index.name]  # no temporary file left


def _same_size_edit(p: Path) -> None:
    """New bytes, same size, and the mtime put back to the very nanosecond: only ctime shows."""
    st = p.stat()
    raw = bytearray(p.read_bytes())
    raw[0] ^= 0xFF
    p.write_bytes(bytes(raw))
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert p.stat().st_size == st.st_size and p.stat().st_mtime_ns == st.st_mtime_ns


def _replace_by_mv(p: Path) -> None:
    """``mv new old``: a file of the same size and mtime takes the old one's name."""
    st = p.stat()
    new = p.with_name("incoming.tmp")
    new.write_bytes(bytes(b ^ 0x55 for b in p.read_bytes()))
    os.utime(new, ns=(st.st_atime_ns, st.st_mtime_ns))
    shutil.move(new, p)
    assert p.stat().st_size == st.st_size and p.stat().st_mtime_ns == st.st_mtime_ns


def _append(p: Path) -> None:
    p.write_bytes(p.read_bytes() + b"\0")


CHANGES: dict[str, tuple[Callable[[Path], None], int]] = {
    # name: (the change, how many files the next digest must read)
    "edit": (lambda r: _append(_first(r)), 1),
    "same-size edit, mtime restored": (lambda r: _same_size_edit(_first(r)), 1),
    "replaced by mv": (lambda r: _replace_by_mv(_first(r)), 1),
    "add": (lambda r: shutil.copy(_first(r), r / "train" / "dogs" / "extra.jpg"), 1),
    "remove": (lambda r: _first(r).unlink(), 0),
    "rename": (lambda r: _first(r).rename(_first(r).with_name("renamed.jpg")), 1),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_every_change_changes_the_key_and_reads_only_what_changed(
    folder: Path, tmp_path: Path, reads: Counter, change: str
) -> None:
    index = tmp_path / "cache" / "index.json"
    before = _digest(folder, index)
    assert _digest(folder, index) == before
    reads.take()
    apply, n_read = CHANGES[change]
    apply(folder)
    after = _digest(folder, index)
    assert after != before
    assert len(reads.take()) == n_read
    assert after == _digest(folder, None)  # what reading every byte gives
    reads.take()
    assert _digest(folder, index) == after and reads.take() == []  # and the index learnt it


def _coarse_stat(path: str) -> D.StatKey | None:
    """A filesystem with one-second mtimes and nothing else: no ctime, no inode numbers."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns // 10**9 * 10**9, 0, 0, 0)


def test_same_size_edit_in_the_same_second_on_a_coarse_filesystem(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Racy git: a file changed just before it was hashed is not trusted on the next run.

    The stat says nothing here (same size, same second, no ctime); only the rule that keeps
    recently changed files out of the index catches the edit.
    """
    monkeypatch.setattr(D, "_stat_key", _coarse_stat)
    reads = Counter(monkeypatch)
    index = tmp_path / "cache" / "index.json"
    p = _first(folder)
    second = (_now_ns() // 10**9) * 10**9
    os.utime(p, ns=(second, second))
    before = _digest(folder, index)
    _same_size_edit(p)  # the same mtime: as if in the same second as the hashing
    reads.take()
    assert _digest(folder, index) != before
    assert [Path(x).name for x in reads.take()] == [p.name]  # the racy file, and only it
    # once it is old, it is trusted: no file is read
    old = _now_ns() - HOUR_NS
    os.utime(p, ns=(old, old))
    _digest(folder, index)
    reads.take()
    _digest(folder, index)
    assert reads.take() == []


def test_verify_reads_everything_and_repairs_a_lying_index(
    folder: Path, tmp_path: Path, reads: Counter
) -> None:
    index = tmp_path / "cache" / "index.json"
    truth = _digest(folder, index)
    raw = json.loads(index.read_text())
    rel = _first(folder).relative_to(folder).as_posix()
    raw["files"][rel][5] = "0" * 64  # a wrong digest under a matching stat
    index.write_text(json.dumps(raw))
    assert _digest(folder, index) != truth  # the index is trusted when the stat matches...
    reads.take()
    assert _digest(folder, index, verify=True) == truth  # ...unless verify says otherwise
    assert len(reads.take()) == 4 * N_PER_CLASS
    assert _digest(folder, index) == truth and reads.take() == []  # and it was rewritten


@pytest.mark.parametrize(
    "damage",
    [
        lambda raw: "{not json",
        lambda raw: json.dumps({**raw, "format": 999}),
        lambda raw: json.dumps({**raw, "root": "/elsewhere"}),
        lambda raw: json.dumps({**raw, "files": {k: v[:3] for k, v in raw["files"].items()}}),
        lambda raw: json.dumps([1, 2]),
    ],
    ids=["not json", "other format", "other folder", "short records", "not an object"],
)
def test_damaged_index_is_ignored(
    folder: Path, tmp_path: Path, reads: Counter, damage: Callable[[dict], str]
) -> None:
    index = tmp_path / "cache" / "index.json"
    truth = _digest(folder, index)
    raw = json.loads(index.read_text())
    for k in raw["files"]:
        raw["files"][k][5] = "0" * 64  # if any of it were used, the digest would be wrong
    index.write_text(damage(raw))
    reads.take()
    assert _digest(folder, index) == truth
    assert len(reads.take()) == 4 * N_PER_CLASS


def _ctime_is_mtime(path: str) -> D.StatKey | None:
    """The real stat, with ctime replaced by mtime: the fixture's old mtimes count as old."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns, st.st_mtime_ns, st.st_ino, st.st_dev)


def test_recent_and_vanished_files_stay_out_of_the_index(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(D, "_stat_key", _ctime_is_mtime)
    index = tmp_path / "cache" / "index.json"
    fresh = folder / "train" / "dogs" / "fresh.jpg"
    fresh.write_bytes(b"just written")
    gone = folder / "train" / "dogs" / "gone.jpg"
    gone.write_bytes(b"x")
    images = find_images(DataConfig(dir=folder))
    gone.unlink()  # listed, then gone before it could be hashed
    D.content_digest(images, index=index)
    files = json.loads(index.read_text())["files"]
    assert len(files) == 4 * N_PER_CLASS  # the hour-old files are trusted...
    assert "train/dogs/fresh.jpg" not in files  # ...the one written just now is not
    assert "train/dogs/gone.jpg" not in files
    assert D.RACY_NS >= 2 * 10**9  # covers FAT's two-second mtimes


def test_cache_stores_one_index_per_folder_and_clear_removes_it(
    folder: Path, tmp_path: Path, reads: Counter
) -> None:
    cache = FeatureCache(tmp_path / "cache")
    images = find_images(DataConfig(dir=folder))
    first = cache.images_digest(images)
    assert cache.images_digest(images) == first and len(reads.take()) == 4 * N_PER_CLASS
    other = shutil.copytree(folder, tmp_path / "copy")
    assert cache.stat_index(other) != cache.stat_index(folder)
    assert cache.images_digest(find_images(DataConfig(dir=other))) == first  # same content
    assert len(reads.take()) == 4 * N_PER_CLASS  # a new folder: its own index, read once
    assert sorted(p.name for p in cache.dir.iterdir()) == sorted(
        [cache.stat_index(folder).name, cache.stat_index(other).name]
    )
    assert cache.clear("MobileNet") == [] and len(list(cache.dir.iterdir())) == 2
    cache.clear()
    assert list(cache.dir.iterdir()) == []


def test_verify_from_the_sweep_file_and_the_command_line(tmp_path: Path, folder: Path) -> None:
    sweep = tmp_path / "sweep.yaml"
    body = "study: s\ndata: {{dir: {d}{extra}}}\nbackbones: [{{name: MobileNetV2}}]\n"
    sweep.write_text(body.format(d=folder, extra=""))
    assert load_sweep(sweep).data.verify is DEFAULT_VERIFY is False
    assert load_sweep(sweep, verify=True).data.verify is True
    sweep.write_text(body.format(d=folder, extra=", verify: true"))
    assert load_sweep(sweep).data.verify is True
    sweep.write_text(body.format(d=folder, extra=", verify: 'yes'"))
    with pytest.raises(ConfigError, match=r"data\.verify: got 'yes'; expected true or false"):
        load_sweep(sweep)
    parser = build_parser()
    for command in ("extract", "run"):
        assert parser.parse_args([command, str(sweep), "--verify"]).verify is True
        assert parser.parse_args([command, str(sweep)]).verify is None  # the sweep file decides
