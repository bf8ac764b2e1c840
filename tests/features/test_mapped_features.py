"""Features read through the cache file's memory map: no per-process copy, same training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import FLOWERS, MNV2_WEIGHTS, need_shared, small_copy

from tlsweep.config._backbones import resolve_backbone
from tlsweep.config._schema import BackboneConfig, DataConfig
from tlsweep.features._cache import FeatureCache
from tlsweep.features._entries import Entry
from tlsweep.head._graph import as_tensor
from tlsweep.head._train import HeadParams, train_head
from tlsweep.images._decode import image_batches
from tlsweep.images._find import find_images

SPLIT_OF_ROW = ["train"] * 6 + ["validation"] * 3 + ["test"] * 2


def _entry(tmp_path: Path, rows_by_split: list[str]) -> Entry:
    """An entry folder written by hand: 11 files whose splits are given per row."""
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(len(rows_by_split), 8)).astype(np.float32)
    np.save(tmp_path / "features.npy", feats)
    files = [
        {"path": f"f{r}.jpg", "label": r % 2, "split": s, "row": r}
        for r, s in enumerate(rows_by_split)
    ]
    (tmp_path / "manifest.json").write_text(json.dumps({"files": files}))
    return Entry(path=tmp_path, manifest={"files": files, "class_names": ["a", "b"]})


def test_a_split_in_one_block_is_mapped_not_copied(tmp_path: Path) -> None:
    entry = _entry(tmp_path, SPLIT_OF_ROW)
    on_disk = np.load(tmp_path / "features.npy")
    xv, yv = entry.split("validation")
    assert isinstance(xv, np.memmap) and xv.flags.writeable
    np.testing.assert_array_equal(xv, on_disk[6:9])
    assert yv.tolist() == [0, 1, 0]
    t = as_tensor(xv)
    np.testing.assert_array_equal(t.numpy(), on_disk[6:9])
    xv[0, 0] = 123.0  # the tensor reads the very pages of the map: it sees the write...
    assert float(t[0, 0]) == 123.0
    # ...which stays in this process (copy-on-write): the file is unchanged
    np.testing.assert_array_equal(np.load(tmp_path / "features.npy"), on_disk)


def test_interleaved_rows_are_copied(tmp_path: Path) -> None:
    """An entry whose split rows are not one block (extracted before rows were grouped)."""
    interleaved = ["train", "validation"] * 4 + ["train", "test", "test"]
    entry = _entry(tmp_path, interleaved)
    on_disk = np.load(tmp_path / "features.npy")
    xv, _ = entry.split("validation")
    assert not isinstance(xv, np.memmap)
    t = as_tensor(xv)
    np.testing.assert_array_equal(t.numpy(), on_disk[1:8:2])
    xv[0, 0] = 123.0
    assert float(t[0, 0]) == on_disk[1, 0]


def test_training_on_mapped_features_equals_training_on_a_copy(tmp_path: Path) -> None:
    entry = _entry(tmp_path, SPLIT_OF_ROW)
    xt, yt = entry.split("train")
    xv, yv = entry.split("validation")
    hp = HeadParams(units=4, dropout=0.1, learning_rate=1e-2, batch_size=2, epochs=3, seed=3)
    mapped = train_head(as_tensor(xt), yt, as_tensor(xv), yv, 2, hp)
    copied = train_head(np.array(xt), yt, np.array(xv), yv, 2, hp)
    assert [m.as_dict() for m in mapped.history] == [m.as_dict() for m in copied.history]
    for a, b in zip(mapped.weights, copied.weights, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.fixture
def bb(tmp_path: Path) -> BackboneConfig:

    need_shared()
    return resolve_backbone(
        BackboneConfig(
            name="MobileNetV2",
            weights=str(MNV2_WEIGHTS),
            input_size=96,
            pooling="avg",
            args={"alpha": 0.35},
        )
    )


def test_layout_b_rows_are_grouped_by_split(tmp_path: Path, bb: BackboneConfig) -> None:
    """Layout B lists files by path, splits interleaved; the entry stores each split as one
    block of rows, and every row still holds its own file's features."""
    need_shared()
    data = small_copy(FLOWERS, tmp_path / "flowers", 6, None)
    images = find_images(DataConfig(dir=data, validation_split=0.2, test_split=0.2, seed=1))
    splits_in_file_order = [f.split for f in images.files]
    assert splits_in_file_order != sorted(
        splits_in_file_order, key=["train", "validation", "test"].index
    )
    entry, cached = FeatureCache(tmp_path / "cache").ensure(bb, images)
    assert not cached
    m = entry.manifest
    assert [f["path"] for f in m["files"]] == [f.path for f in images.files]  # file order kept
    start = 0
    for split in ("train", "validation", "test"):
        rows = [f["row"] for f in m["files"] if f["split"] == split]
        assert rows == list(range(start, start + len(rows)))
        start += len(rows)
        x, _ = entry.split(split)
        assert isinstance(x, np.memmap)
    assert start == len(images.files)
    import tlsweep.backbones._build

    model = tlsweep.backbones._build.build_extractor(bb)
    probe = [next(f for f in m["files"] if f["split"] == s) for s in ("validation", "test")]
    ((_, batch),) = image_batches([str(data / f["path"]) for f in probe], 96, 2)
    own = model(batch, training=False).numpy()
    feats = entry.features()
    np.testing.assert_allclose(feats[[f["row"] for f in probe]], own, rtol=1e-4, atol=1e-4)
