"""The content-addressed feature cache: keys, hits without TensorFlow, atomicity, damage, CLI."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    CATS_DOGS,
    FLOWERS,
    MN_WEIGHTS,
    MNV2_WEIGHTS,
    keras_asks_for,
    need_shared,
    run_cli,
    small_copy,
    write_sweep,
)

import tlsweep.backbones._build
from tlsweep.config._schema import BackboneConfig, DataConfig
from tlsweep.config._sweepfile import load_sweep
from tlsweep.errors import DataError, ServiceError
from tlsweep.features import _entries as E
from tlsweep.features import _extract as X
from tlsweep.features._cache import FeatureCache
from tlsweep.features._entries import cache_key, key_parts
from tlsweep.images._digests import content_digest
from tlsweep.images._find import find_images

PER_CLASS = 10  # per class and split: 60 images, a fast extraction


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Layout A: 10 real photos per class in train/, validation/ and test/ (read-only use)."""
    need_shared()
    dst = tmp_path_factory.mktemp("tiny")
    for split in ("train", "validation", "test"):
        small_copy(CATS_DOGS / split, dst / split, PER_CLASS, None)
    return dst


@pytest.fixture
def tiny_copy(tiny: Path, tmp_path: Path) -> Path:
    """A private copy of ``tiny`` that a test may change."""
    return Path(shutil.copytree(tiny, tmp_path / "data"))


@pytest.fixture(scope="module")
def bb(tmp_path_factory: pytest.TempPathFactory, tiny: Path) -> BackboneConfig:
    """The resolved backbone of ``write_sweep``: MobileNetV2 a0.35, 96 px, avg."""
    d = tmp_path_factory.mktemp("bb")
    return load_sweep(write_sweep(d / "sweep.yaml", tiny)).backbones[0]


@pytest.fixture(scope="module")
def tiny_entry(tmp_path_factory: pytest.TempPathFactory, tiny: Path, bb: BackboneConfig) -> E.Entry:
    """One complete entry for ``tiny``, extracted once for the module."""
    cache = FeatureCache(tmp_path_factory.mktemp("module_cache"))
    entry, cached = cache.ensure(bb, find_images(DataConfig(dir=tiny)))
    assert not cached
    return entry


def _key(data: Path, bb: BackboneConfig, **data_kw: object) -> str:
    images = find_images(DataConfig(dir=data, **data_kw))
    return cache_key(key_parts(bb, content_digest(images)))


def _dirs(cache_dir: Path) -> list[str]:
    return sorted(p.name for p in cache_dir.iterdir() if p.is_dir()) if cache_dir.is_dir() else []


# --- miss, manifest, hit -----------------------------------------------------------------------
def test_miss_extracts_then_hit_does_no_forward_pass(
    tmp_path: Path, tiny: Path, bb: BackboneConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    images = find_images(DataConfig(dir=tiny))
    cache = FeatureCache(tmp_path / "cache")
    seen: list[tuple[int, int]] = []
    entry, cached = cache.ensure(bb, images, progress=lambda d, t: seen.append((d, t)))
    n = len(images.files)
    assert not cached
    assert seen[0] == (0, n) and seen[-1] == (n, n)
    assert entry.path.parent == cache.dir and _dirs(cache.dir) == [entry.path.name]

    m = json.loads((entry.path / "manifest.json").read_text())
    assert m == entry.manifest
    assert m["complete"] is True
    assert m["key"] == cache_key(m["key_parts"]) == entry.key
    assert m["key"] == cache_key(key_parts(bb, content_digest(images)))
    assert m["name"] == entry.path.name == E.entry_name(bb, m["key"])
    assert m["shape"] == [n, 1280] and m["dtype"] == "float32"
    assert m["class_names"] == ["cats", "dogs"]
    assert m["layout"] == "A" and m["data_dir"] == str(tiny)
    assert m["backbone"]["label"] == bb.label and m["backbone"]["input_size"] == 96
    assert m["skipped"] == [] and m["ignored"] == []
    assert {f["path"] for f in m["files"]} == {f.path for f in images.files}
    assert sorted(f["row"] for f in m["files"]) == list(range(n))
    for f in m["files"]:
        split, cls, _ = f["path"].split("/")
        assert f["split"] == split and m["class_names"][f["label"]] == cls
    assert entry.split_sizes() == {
        "train": 2 * PER_CLASS,
        "validation": 2 * PER_CLASS,
        "test": 2 * PER_CLASS,
    }
    t = m["timings"]
    assert 0 < t["build_s"] < t["extract_s"] and t["images_per_s"] > 0

    feats = np.load(entry.path / "features.npy", allow_pickle=False)
    assert feats.shape == (n, 1280) and feats.dtype == np.float32
    assert np.isfinite(feats).all() and (feats.std(axis=0) > 0).any()
    assert len({row.tobytes() for row in feats}) == n  # every row is its own image

    # rows belong to their files: recompute two images on their own
    from tlsweep.images._decode import image_batches

    model = tlsweep.backbones._build.build_extractor(bb)
    probe = [m["files"][0], m["files"][-1]]
    ((_, batch),) = image_batches([str(tiny / f["path"]) for f in probe], 96, 2)
    own = model(batch, training=False).numpy()
    np.testing.assert_allclose(feats[[f["row"] for f in probe]], own, rtol=1e-4, atol=1e-4)

    xt, yt = entry.split("train")
    assert xt.shape == (2 * PER_CLASS, 1280) and sorted(set(yt.tolist())) == [0, 1]

    # the hit: no model, no decoding, the same entry (also from a fresh FeatureCache object)
    def boom(*a: object, **k: object) -> None:
        raise AssertionError("a cache hit must not build the model or decode images")

    monkeypatch.setattr(X.bbs, "build_extractor", boom)  # where extraction looks it up
    monkeypatch.setattr(X, "decoded_chunks", boom)
    for c in (cache, FeatureCache(tmp_path / "cache")):
        again, cached = c.ensure(bb, images)
        assert cached
        assert again.path == entry.path and again.manifest == entry.manifest
    assert _dirs(cache.dir) == [entry.path.name]
    assert [e.path for e in cache.entries()] == [entry.path]


# --- what the key depends on -------------------------------------------------------------------
def _first(data: Path, split: str = "train", cls: str = "cats") -> Path:
    return sorted((data / split / cls).iterdir())[0]


MUTATIONS: dict[str, Callable[[Path], None]] = {
    "one image's bytes": lambda d: _first(d).write_bytes(_first(d).read_bytes() + b"\0"),
    "an image added": lambda d: shutil.copy(_first(d), d / "train" / "cats" / "extra.jpg"),
    "an image removed": lambda d: _first(d, "test", "dogs").unlink(),
    "an image relabelled": lambda d: shutil.move(_first(d), d / "train" / "dogs" / _first(d).name),
    "an image moved to another split": lambda d: shutil.move(
        _first(d), d / "validation" / "cats" / _first(d).name
    ),
    "an image renamed": lambda d: _first(d).rename(_first(d).with_name("renamed.jpg")),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_key_changes_with_the_images(tiny_copy: Path, bb: BackboneConfig, mutation: str) -> None:
    before = _key(tiny_copy, bb)
    assert _key(tiny_copy, bb) == before  # deterministic
    MUTATIONS[mutation](tiny_copy)
    assert _key(tiny_copy, bb) != before


def test_key_ignores_where_the_data_folder_is(
    tiny: Path, tiny_copy: Path, bb: BackboneConfig
) -> None:
    assert _key(tiny, bb) == _key(tiny_copy, bb)
    (tiny_copy / "train" / "cats" / "notes.txt").write_text("not an image")
    (tiny_copy / "train" / "cats" / ".DS_Store").write_text("hidden")
    assert _key(tiny, bb) == _key(tiny_copy, bb)


def test_key_changes_with_the_backbone(
    tiny: Path, bb: BackboneConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `weights: imagenet` is keyed by the file Keras would load: MobileNetV2 a0.35 at 96 px
    home = tmp_path / "keras_home"
    (home / "models").mkdir(parents=True)
    shutil.copy(
        MNV2_WEIGHTS,
        home
        / "models"
        / tlsweep.backbones._build.imagenet_weights_file(replace(bb, weights="imagenet")),
    )
    monkeypatch.setenv("KERAS_HOME", str(home))
    same_file = tmp_path / "same.h5"
    shutil.copy(MNV2_WEIGHTS, same_file)
    edited = tmp_path / "edited.h5"
    data = bytearray(MNV2_WEIGHTS.read_bytes())
    data[-100] ^= 0xFF
    edited.write_bytes(bytes(data))
    ref = _key(tiny, bb)
    assert _key(tiny, replace(bb, weights=str(same_file))) == ref  # weights by content
    variants = {
        "input_size": replace(bb, input_size=128),
        "pooling max": replace(bb, pooling="max"),
        "pooling flatten": replace(bb, pooling="flatten"),
        "args": replace(bb, args={"alpha": 0.5}),
        "more args": replace(bb, args={"alpha": 0.35, "include_preprocessing": False}),
        "weights bytes": replace(bb, weights=str(edited)),
        "weights imagenet": replace(bb, weights="imagenet"),
        "weights none": replace(bb, weights="none"),
        "backbone": replace(bb, name="MobileNet", args={"alpha": 0.25}),
    }
    keys = {name: _key(tiny, v) for name, v in variants.items()}
    assert ref not in keys.values()
    assert len(set(keys.values())) == len(keys)


def test_imagenet_weights_are_keyed_by_the_bytes_keras_loads(
    tiny: Path, bb: BackboneConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file is found under $KERAS_HOME/models by Keras's own name for it (which depends on
    alpha and input size), without TensorFlow; other bytes there make another entry."""
    home = Path(shutil.copytree(MNV2_WEIGHTS.parents[1], tmp_path / "keras_home"))
    home.chmod(0o755)
    (home / "models").chmod(0o755)
    monkeypatch.setenv("KERAS_HOME", str(home))
    mnv2 = replace(bb, weights="imagenet", input_size=224)
    mn = replace(bb, weights="imagenet", input_size=224, name="MobileNet", args={"alpha": 0.25})
    path = tlsweep.backbones._build.imagenet_weights_path(mnv2)
    assert path == home / "models" / MNV2_WEIGHTS.name
    assert tlsweep.backbones._build.imagenet_weights_path(mn) == home / "models" / MN_WEIGHTS.name
    # another size is another Keras file: not downloaded here, so its key is not known yet
    assert key_parts(replace(mn, input_size=160), "x", fetch=False)["weights"] is None

    ref = _key(tiny, mnv2)
    assert key_parts(mnv2, "x")["weights"].startswith(f"imagenet:{MNV2_WEIGHTS.name}:")
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))  # the same name, other bytes: another entry
    edited = _key(tiny, mnv2)
    assert edited != ref
    shutil.copy(MNV2_WEIGHTS, path)
    os.utime(path, ns=(1, 1))  # the digest is remembered per size and mtime; force a re-read
    assert _key(tiny, mnv2) == ref
    other = tmp_path / "other_home"
    (other / "models").mkdir(parents=True)
    shutil.copy(path, other / "models" / path.name)
    monkeypatch.setenv("KERAS_HOME", str(other))  # another Keras home, the same bytes
    assert _key(tiny, mnv2) == ref


@pytest.mark.parametrize(
    "name, size, args",
    [
        ("MobileNet", 150, {"alpha": 0.75}),  # not a checkpoint size: Keras loads the 224 file
        ("MobileNetV2", 96, {"alpha": 1.4}),
        ("MobileNetV3Large", 224, {"minimalistic": True}),
    ],
)
def test_imagenet_file_name_is_the_one_keras_asks_for(
    name: str, size: int, args: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keras is stopped at the moment it asks for the file (every class: test_backbones)."""
    assert tlsweep.backbones._build.imagenet_weights_file(
        BackboneConfig(name, "imagenet", size, args=args)
    ) == keras_asks_for(BackboneConfig(name, "imagenet", size, args=args), monkeypatch)


def test_key_changes_with_the_layout_b_split(tmp_path: Path, bb: BackboneConfig) -> None:
    """The manifest records each file's split, so a new split must not reuse an old entry."""
    need_shared()
    data = small_copy(FLOWERS, tmp_path / "flowers", 10, None)
    ref = _key(data, bb, validation_split=0.2, test_split=0.1, seed=1)
    assert _key(data, bb, validation_split=0.2, test_split=0.1, seed=1) == ref
    assert _key(data, bb, validation_split=0.3, test_split=0.1, seed=1) != ref
    assert _key(data, bb, validation_split=0.2, test_split=0.0, seed=1) != ref
    assert _key(data, bb, validation_split=0.2, test_split=0.1, seed=2) != ref


# --- interrupted and damaged entries -----------------------------------------------------------
def test_interrupted_extraction_leaves_nothing_usable(
    tmp_path: Path, tiny: Path, bb: BackboneConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    images = find_images(DataConfig(dir=tiny))
    cache = FeatureCache(tmp_path / "cache")
    real_chunks = X.decoded_chunks
    delivered: list[int] = []

    def interrupted(*args: object, **kwargs: object):  # noqa: ANN202
        # chunks of one batch of 16 images each
        for i, chunk in enumerate(real_chunks(*args, first_bytes=1, chunk_bytes=1)):
            if i == 2:
                raise KeyboardInterrupt  # Ctrl-C in the middle of the forward passes
            delivered.append(sum(len(idx) for idx, _ in chunk))
            yield chunk

    monkeypatch.setattr(X, "EXTRACT_BATCH", 16)
    monkeypatch.setattr(X, "decoded_chunks", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cache.ensure(bb, images)
    assert delivered == [16, 16]
    assert _dirs(cache.dir) == []  # no entry, no temporary folder
    assert cache.entries() == []
    key = cache_key(key_parts(bb, content_digest(images)))
    assert cache.lookup(bb, key) is None

    # a kill -9 cannot clean up: leave a half-written temporary folder and a manifest-less entry
    name = E.entry_name(bb, key)
    stale = cache.dir / f"{name}.tmp-99999-deadbeef"
    stale.mkdir()
    np.save(stale / "features.npy", np.zeros((3, 1280), np.float32))
    assert cache.entries() == [] and cache.lookup(bb, key) is None

    monkeypatch.setattr(X, "decoded_chunks", real_chunks)
    entry, cached = cache.ensure(bb, images)
    assert not cached
    assert _dirs(cache.dir) == [name]  # the stale temporary folder is gone
    assert entry.manifest["shape"] == [len(images.files), 1280]
    assert len(entry.manifest["files"]) == len(images.files)
    assert np.abs(entry.features()).sum(axis=1).min() > 0  # every row was written


def _truncate_npy(e: Path) -> None:
    p = e / "features.npy"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _edit_manifest(**changes: object) -> Callable[[Path], None]:
    def edit(e: Path) -> None:
        m = json.loads((e / "manifest.json").read_text())
        for k, v in changes.items():
            if callable(v):
                v(m)
            else:
                m[k] = v
        (e / "manifest.json").write_text(json.dumps(m))

    return edit


def _bump_shape(m: dict) -> None:
    m["shape"] = [m["shape"][0] + 1, m["shape"][1]]


def _change_key_parts(m: dict) -> None:
    m["key_parts"]["input_size"] = 128


def _row_out_of_range(m: dict) -> None:
    m["files"][0]["row"] = m["shape"][0]


DAMAGE: dict[str, Callable[[Path], None]] = {
    "features.npy truncated": _truncate_npy,
    "features.npy missing": lambda e: (e / "features.npy").unlink(),
    "features.npy pickled": lambda e: np.save(
        e / "features.npy", np.array([{"a": 1}] * 3, dtype=object), allow_pickle=True
    ),
    "features.npy wrong dtype": lambda e: np.save(
        e / "features.npy", np.load(e / "features.npy").astype(np.float64)
    ),
    "manifest missing": lambda e: (e / "manifest.json").unlink(),
    "manifest cut short": lambda e: (e / "manifest.json").write_text(
        (e / "manifest.json").read_text()[:200]
    ),
    "manifest not complete": _edit_manifest(complete=False),
    "manifest other format": _edit_manifest(format=999),
    "manifest shape": _edit_manifest(shape=_bump_shape),
    "manifest key": _edit_manifest(key="0" * 64),
    "manifest key_parts": _edit_manifest(key_parts=_change_key_parts),
    "manifest row out of range": _edit_manifest(files=_row_out_of_range),
    "manifest files missing": _edit_manifest(files=lambda m: m.pop("files")),
}


def test_an_io_error_while_decoding_fails_the_extraction(
    tiny: Path, bb: BackboneConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A good image the pipeline lost (its read failed) is not a 'skipped image': one error
    naming the file, and no entry, temporary folder or partial file left behind."""
    real = X.decoded_chunks
    lost = sorted(find_images(DataConfig(dir=tiny)).files, key=lambda f: f.path)[3]

    def losing_one(paths, *a, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        target = paths.index(str(tiny / lost.path))
        for chunk in real(paths, *a, **kw):
            out = []
            for idx, x in chunk:
                keep = idx != target
                out.append((idx[keep], x.numpy()[keep]))
            yield out

    monkeypatch.setattr(X, "decoded_chunks", losing_one)
    cache = FeatureCache(tmp_path / "cache")
    with pytest.raises(DataError, match=r"cannot|reads now") as e:
        cache.ensure(bb, find_images(DataConfig(dir=tiny)))
    assert str(tiny / lost.path) in str(e.value) and "I/O error" in str(e.value)
    assert [p.name for p in cache.dir.iterdir() if p.is_dir()] == []


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_entry_is_never_used(
    tmp_path: Path, tiny_entry: E.Entry, bb: BackboneConfig, damage: str
) -> None:
    cache = FeatureCache(tmp_path / "cache")
    copy = Path(shutil.copytree(tiny_entry.path, cache.dir / tiny_entry.path.name))
    assert cache.lookup(bb, tiny_entry.key) is not None  # the undamaged copy is fine
    DAMAGE[damage](copy)
    assert cache.lookup(bb, tiny_entry.key) is None
    assert cache.entries() == []


def test_damaged_entry_is_replaced(
    tmp_path: Path, tiny: Path, tiny_entry: E.Entry, bb: BackboneConfig
) -> None:
    cache = FeatureCache(tmp_path / "cache")
    copy = Path(shutil.copytree(tiny_entry.path, cache.dir / tiny_entry.path.name))
    _truncate_npy(copy)
    entry, cached = cache.ensure(bb, find_images(DataConfig(dir=tiny)))
    assert not cached
    assert entry.path == copy and entry.key == tiny_entry.key
    assert _dirs(cache.dir) == [copy.name]
    np.testing.assert_allclose(entry.features(), tiny_entry.features(), rtol=1e-4, atol=1e-4)


def _cached_copy(tmp_path: Path, entry: E.Entry) -> tuple[FeatureCache, Path]:
    cache = FeatureCache(tmp_path / "cache")
    return cache, Path(shutil.copytree(entry.path, cache.dir / entry.path.name))


def test_an_entry_that_cannot_be_read_is_an_error_and_kept(
    tmp_path: Path,
    tiny: Path,
    tiny_entry: E.Entry,
    bb: BackboneConfig,
    cli: Callable,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An I/O error (EIO, EMFILE, an NFS hiccup) is not damage: hours of extraction stay."""
    cache, copy = _cached_copy(tmp_path, tiny_entry)
    before = sorted(p.name for p in copy.iterdir())
    read_text = Path.read_text

    def failing(self: Path, *a: object, **kw: object) -> str:
        if self.name == "manifest.json":
            raise OSError(errno.EIO, "Input/output error", str(self))
        return read_text(self, *a, **kw)

    monkeypatch.setattr(Path, "read_text", failing)
    with pytest.raises(
        ServiceError, match="manifest.json.*Input/output error.*nothing was deleted"
    ):
        cache.ensure(bb, find_images(DataConfig(dir=tiny)))
    sweep = write_sweep(tmp_path / "sweep.yaml", tiny, cache_dir=cache.dir)
    r = cli("extract", str(sweep), "-q", cwd=tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and lines[-1].startswith("tlsweep: error: "), r.stderr[-2000:]
    assert str(copy / "manifest.json") in lines[-1] and "Traceback" not in r.stderr
    monkeypatch.undo()
    assert sorted(p.name for p in copy.iterdir()) == before  # nothing deleted
    assert _dirs(cache.dir) == [copy.name]
    assert cache.lookup(bb, tiny_entry.key) is not None


def test_a_feature_array_changed_on_disk_is_never_used_silently(
    tmp_path: Path, tiny_entry: E.Entry, bb: BackboneConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache, copy = _cached_copy(tmp_path, tiny_entry)
    record = tiny_entry.manifest[E.FEATURES_FILE]
    assert record["sha256"] == hashlib.sha256((copy / "features.npy").read_bytes()).hexdigest()
    reads: list[Path] = []
    real = E.features_record
    monkeypatch.setattr(E, "features_record", lambda p: reads.append(p) or real(p))
    # a copy has another inode and ctime: its bytes are checked once, its new stat recorded
    assert cache.lookup(bb, tiny_entry.key) is not None and len(reads) == 1
    assert json.loads((copy / "manifest.json").read_text())[E.FEATURES_FILE]["inode"] == (
        (copy / "features.npy").stat().st_ino
    )
    # an unchanged entry: a hit reads no feature array, however many times
    for _ in range(3):
        assert cache.lookup(bb, tiny_entry.key) is not None
    assert len(reads) == 1
    # --verify reads it, and finds a checksum that does not match (stat unchanged)
    m = json.loads((copy / "manifest.json").read_text())
    m[E.FEATURES_FILE]["sha256"] = "0" * 64
    (copy / "manifest.json").write_text(json.dumps(m))
    assert FeatureCache(cache.dir).lookup(bb, tiny_entry.key) is not None  # stat trusted
    assert FeatureCache(cache.dir, verify=True).lookup(bb, tiny_entry.key) is None
    assert len(reads) == 2
    m[E.FEATURES_FILE]["sha256"] = record["sha256"]
    (copy / "manifest.json").write_text(json.dumps(m))
    # one value changed in place, size and mtime put back: the ctime shows, the checksum refuses
    arr = copy / "features.npy"
    st = arr.stat()
    with open(arr, "r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(np.float32(12345.0).tobytes())
    os.utime(arr, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert arr.stat().st_size == st.st_size
    assert cache.lookup(bb, tiny_entry.key) is None and len(reads) == 3
    assert cache.entries() == []


def test_verify_extracts_again_an_entry_whose_checksum_does_not_match(
    tmp_path: Path, tiny: Path, tiny_entry: E.Entry
) -> None:
    """``--verify`` (``data.verify``) reads every feature array, even one whose stat matches."""
    from tlsweep.features._cache import extract_all

    cache, copy = _cached_copy(tmp_path, tiny_entry)
    cfg = load_sweep(write_sweep(tmp_path / "sweep.yaml", tiny, cache_dir=cache.dir))
    assert extract_all(cfg)[0][2]  # a hit: the copy's checksum checked once, its stat recorded
    m = json.loads((copy / "manifest.json").read_text())
    m[E.FEATURES_FILE]["sha256"] = "0" * 64  # as if its bytes had changed, stat unchanged
    (copy / "manifest.json").write_text(json.dumps(m))
    assert extract_all(cfg)[0][2]  # without --verify the stat is trusted: no read
    ((_, entry, cached),) = extract_all(replace(cfg, data=replace(cfg.data, verify=True)))
    assert not cached and entry.path == copy
    assert entry.manifest[E.FEATURES_FILE]["sha256"] != "0" * 64


def test_an_entry_without_a_checksum_gets_one_on_its_first_load(
    tmp_path: Path, tiny_entry: E.Entry, bb: BackboneConfig
) -> None:
    """Entries published before checksums were recorded keep working (trusted as they are)."""
    cache, copy = _cached_copy(tmp_path, tiny_entry)
    m = json.loads((copy / "manifest.json").read_text())
    del m[E.FEATURES_FILE]
    (copy / "manifest.json").write_text(json.dumps(m))
    assert cache.lookup(bb, tiny_entry.key) is not None
    got = json.loads((copy / "manifest.json").read_text())[E.FEATURES_FILE]
    assert got["sha256"] == tiny_entry.manifest[E.FEATURES_FILE]["sha256"]


def test_clear_removes_feature_entries_only_unless_asked(
    tmp_path: Path, tiny_entry: E.Entry, cli: Callable
) -> None:
    """Fine-tuning checkpoints and decoded images are not feature entries; what a running
    process holds (a stage's lock) is never removed, even with --all."""
    cache, copy = _cached_copy(tmp_path, tiny_entry)
    busy, idle = cache.dir / "finetune" / "s-trial1-aaaa", cache.dir / "finetune" / "s-trial2-bbbb"
    images = cache.dir / "images" / "96px-cccc"
    for folder in (busy, idle, images):
        folder.mkdir(parents=True)
        (folder / "ckpt-epoch3.weights.h5").write_bytes(b"\0" * 2_000_000)
    d = str(cache.dir)
    with E.held_lock(busy / "lock", "fine-tuning"):
        r = cli("cache", "clear", "--cache-dir", d, cwd=tmp_path)
        assert r.returncode == 0 and "removed 1 cache entry" in r.stdout, r.stderr
        assert not copy.exists() and all(f.is_dir() for f in (busy, idle, images))
        (copy / "x").mkdir(parents=True)  # an entry whose lock is held: left alone
        with E.entry_lock(cache.dir, copy.name):
            assert cache.clear() == [] and copy.is_dir()
        shutil.rmtree(copy)
        listed = cli("cache", "list", "--cache-dir", d, cwd=tmp_path)
        assert "fine-tuning stages" in listed.stdout and "decoded-image caches" in listed.stdout
        assert f"{busy.name}  2.0 MB  (in use)" in listed.stdout
        assert f"{idle.name}  2.0 MB" in listed.stdout and f"{images.name}  2.0 MB" in listed.stdout
        r = cli("cache", "clear", "--cache-dir", d, "--all", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert busy.is_dir() and not idle.exists()
        assert images.is_dir()  # a running stage reads them
        assert f"finetune/{busy.name}: in use by a running process" in r.stderr
    r = cli("cache", "clear", "--cache-dir", d, "--images", cwd=tmp_path)
    assert r.returncode == 0 and busy.is_dir() and not images.exists()
    r = cli("cache", "clear", "--cache-dir", d, "--finetune", cwd=tmp_path)
    assert r.returncode == 0 and not (cache.dir / "finetune").exists()
    assert "removed 1 fine-tuning stage(s)" in r.stdout


# --- unusable images ---------------------------------------------------------------------------
def test_bad_images_are_skipped_and_listed(
    tiny_copy: Path, bb: BackboneConfig, tmp_path: Path
) -> None:
    cats = tiny_copy / "train" / "cats"
    good = _first(tiny_copy)
    bad = {
        "train/cats/truncated.jpg": good.read_bytes()[: good.stat().st_size // 3],
        "train/cats/zero.jpg": b"",
        "train/cats/text.jpg": b"I am a text file with a .jpg name\n" * 20,
    }
    for rel, content in bad.items():
        (tiny_copy / rel).write_bytes(content)
    (cats / "readme.md").write_text("not an image")
    images = find_images(DataConfig(dir=tiny_copy))
    entry, cached = FeatureCache(tmp_path / "cache").ensure(bb, images)
    assert not cached
    m = entry.manifest
    skipped = {s["path"]: s["reason"] for s in m["skipped"]}
    assert set(skipped) == set(bad)
    assert "empty" in skipped["train/cats/zero.jpg"]
    assert all(r for r in skipped.values())
    assert [i["path"] for i in m["ignored"]] == ["train/cats/readme.md"]
    paths = {f["path"] for f in m["files"]}
    assert len(paths) == 6 * PER_CLASS and not paths & set(bad)
    assert entry.split_sizes()["train"] == 2 * PER_CLASS
    x, y = entry.split("train")
    assert x.shape == (2 * PER_CLASS, 1280) and np.isfinite(x).all()
    assert (np.abs(np.asarray(x)).sum(axis=1) > 0).all()


# --- the CLI -----------------------------------------------------------------------------------
_NO_TF = textwrap.dedent(
    """
    import sys
    from tlsweep.cli import main
    rc = main(["extract", sys.argv[1], "-q"])
    heavy = sorted(m for m in ("tensorflow", "keras", "mlflow", "optuna") if m in sys.modules)
    print("HEAVY:" + ",".join(heavy))
    sys.exit(rc)
    """
)


@pytest.fixture(scope="module")
def two_extracts(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two ``tlsweep extract`` processes started together on one sweep and an empty cache."""
    d = tmp_path_factory.mktemp("cli")
    sweep = write_sweep(d / "sweep.yaml", tiny, cache_dir=d / "cache")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tlsweep", "extract", str(sweep), "-q"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=d,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    return {
        "dir": d,
        "sweep": sweep,
        "cache": d / "cache",
        "codes": [p.returncode for p in procs],
        "stdout": [o for o, _ in outs],
        "stderr": [e for _, e in outs],
        "entries": _dirs(d / "cache"),
    }


@pytest.mark.slow
def test_concurrent_extracts_make_one_entry(two_extracts: dict) -> None:
    assert two_extracts["codes"] == [0, 0], [e[-2000:] for e in two_extracts["stderr"]]
    stdout = two_extracts["stdout"]
    assert sum("extracted" in s for s in stdout) == 1, stdout
    assert sum("cache hit" in s for s in stdout) == 1, stdout
    (entry,) = two_extracts["entries"]  # exactly one entry, no temporary folder left
    assert all(entry in s for s in stdout)
    extracted = next(s for s in stdout if "extracted" in s)
    assert "train 20, validation 20, test 20" in extracted
    waiter = two_extracts["stderr"][stdout.index(next(s for s in stdout if "cache hit" in s))]
    assert "waiting for another process" in waiter or "extracted by another worker" in waiter


@pytest.mark.slow
def test_cli_cache_hit_without_tensorflow_then_list_and_clear(two_extracts: dict) -> None:
    sweep, cache, cwd = str(two_extracts["sweep"]), two_extracts["cache"], two_extracts["dir"]
    (entry,) = two_extracts["entries"]
    hit = subprocess.run(
        [sys.executable, "-c", _NO_TF, sweep],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )
    assert hit.returncode == 0, hit.stderr[-2000:]
    assert "cache hit" in hit.stdout and entry in hit.stdout
    assert "HEAVY:\n" in hit.stdout, hit.stdout  # neither TensorFlow nor Keras was imported
    assert _dirs(cache) == [entry]

    listed = run_cli("cache", "list", sweep, cwd=cwd)
    assert listed.returncode == 0 and entry in listed.stdout
    assert "60 images x 1280 features" in listed.stdout
    none = run_cli("cache", "clear", "--cache-dir", str(cache), "--match", "VGG16", cwd=cwd)
    assert none.returncode == 0 and "removed 0 cache entries" in none.stdout
    assert _dirs(cache) == [entry]
    cleared = run_cli("cache", "clear", sweep, cwd=cwd)
    assert cleared.returncode == 0 and "removed 1 cache entry" in cleared.stdout
    assert _dirs(cache) == []
    assert list(cache.iterdir()) == []  # lock files go too
    empty = run_cli("cache", "list", "--cache-dir", str(cache), cwd=cwd)
    assert empty.returncode == 0 and "no cache entries" in empty.stdout


def test_forward_all_keeps_order_and_every_batch_with_passes_in_flight() -> None:
    import threading

    import tensorflow as tf

    threads: set[int] = set()

    def forward(x):  # noqa: ANN001, ANN202
        threads.add(threading.get_ident())
        return tf.reduce_sum(x, axis=1, keepdims=True)

    batches = [(np.arange(i, i + 3), tf.fill([3, 4], float(i))) for i in range(0, 30, 3)]
    out = list(X._forward_all(forward, iter(batches)))
    assert [idx.tolist() for idx, _ in out] == [b[0].tolist() for b in batches]
    for (_, res), (_, x) in zip(out, batches, strict=True):
        np.testing.assert_array_equal(res, x.numpy().sum(axis=1, keepdims=True))
    assert threading.get_ident() not in threads  # the passes run off the calling thread


def test_forward_all_raises_what_a_pass_raises() -> None:
    import tensorflow as tf

    def forward(x):  # noqa: ANN001, ANN202
        if float(x[0, 0]) == 6.0:
            raise ValueError("boom")
        return x

    batches = [(np.arange(i, i + 3), tf.fill([3, 4], float(i))) for i in range(0, 30, 3)]
    with pytest.raises(ValueError, match="boom"):
        list(X._forward_all(forward, iter(batches)))


@pytest.mark.slow  # two real extractions at 224 px under a private KERAS_HOME
def test_cli_imagenet_entry_follows_the_file_under_keras_home(tiny: Path, tmp_path: Path) -> None:
    """``weights: imagenet`` really extracted from $KERAS_HOME/models; another file there (same
    name, same weights, other bytes) is another entry, and the first is a hit again after."""
    import h5py

    homes = []
    for i in range(2):
        home = tmp_path / f"keras_home{i}"
        (home / "models").mkdir(parents=True)
        shutil.copy(MNV2_WEIGHTS, home / "models" / MNV2_WEIGHTS.name)
        homes.append(home)
    with h5py.File(homes[1] / "models" / MNV2_WEIGHTS.name, "a") as f:
        f.attrs["note"] = "re-saved elsewhere"  # other bytes, the same weights
    bb = {"name": "MobileNetV2", "weights": "imagenet", "input_size": 224, "pooling": "avg"}
    sweep = write_sweep(
        tmp_path / "s.yaml", tiny, backbones=[{**bb, "args": {"alpha": 0.35}}], study="kh"
    )
    cache = tmp_path / "cache"
    outs = []
    for home in (homes[0], homes[1], homes[0]):
        r = subprocess.run(
            [sys.executable, "-m", "tlsweep", "extract", str(sweep), "-q"],
            capture_output=True,
            text=True,
            timeout=900,
            cwd=tmp_path,
            env={
                **os.environ,
                "KERAS_HOME": str(home),
                "TF_CPP_MIN_LOG_LEVEL": "2",
                "HTTP_PROXY": "http://127.0.0.1:9",  # a download attempt fails fast
                "HTTPS_PROXY": "http://127.0.0.1:9",
            },
        )
        assert r.returncode == 0, r.stderr[-3000:]
        outs.append(r.stdout)
    entries = _dirs(cache)
    assert len(entries) == 2, entries
    a, b = (E.read_entry(cache / e) for e in entries)
    assert a.manifest["key_parts"]["weights"] != b.manifest["key_parts"]["weights"]
    assert all(
        e.manifest["key_parts"]["weights"].startswith(f"imagenet:{MNV2_WEIGHTS.name}:")
        for e in (a, b)
    )
    np.testing.assert_allclose(a.features(), b.features(), rtol=1e-5, atol=1e-5)
    assert "extracted" in outs[0] and "extracted" in outs[1] and "cache hit" in outs[2], outs
