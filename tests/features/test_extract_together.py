"""Several missing entries extracted together: one decode per image, the same features."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import CATS_DOGS, need_shared, small_copy

from tlsweep.config._backbones import resolve_backbone
from tlsweep.config._schema import BackboneConfig, DataConfig
from tlsweep.features import _extract as X
from tlsweep.features._cache import FeatureCache
from tlsweep.images._find import find_images


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    need_shared()
    dst = tmp_path_factory.mktemp("together")
    for split in ("train", "validation"):
        small_copy(CATS_DOGS / split, dst / split, 4, None)
    return dst


def _bb(size: int, pooling: str = "avg") -> BackboneConfig:
    # TinyConvNet: what is tested (one decode, the same bytes as extraction alone) is the
    # cache's, whatever the backbone; it builds in milliseconds, where MobileNetV2 with its
    # weights takes about a second of CPU for each of the six builds below
    return resolve_backbone(
        BackboneConfig(name="TinyConvNet", weights="none", input_size=size, pooling=pooling)
    )


def test_missing_entries_share_one_decode_and_match_separate_extraction(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    images = find_images(DataConfig(dir=tiny))
    wanted = [_bb(96), _bb(128)]
    calls: list[object] = []
    real = X.decoded_chunks

    def counting(paths, size, *a, **k):  # noqa: ANN001, ANN202
        calls.append(size)
        return real(paths, size, *a, **k)

    monkeypatch.setattr(X, "decoded_chunks", counting)
    together = FeatureCache(tmp_path / "together")
    done = together.ensure_many(wanted, images)
    assert [cached for _, cached in done] == [False, False]
    assert calls == [[96, 128]]  # one pass over the images, resized to both sizes
    for (entry, _), bb in zip(done, wanted, strict=True):
        assert entry.manifest["backbone"]["label"] == bb.label
        assert entry.manifest["timings"]["extracted_with"] == 2

    calls.clear()
    alone = FeatureCache(tmp_path / "alone")
    for (entry, _), bb in zip(done, wanted, strict=True):
        single, cached = alone.ensure(bb, images)
        assert not cached and single.path.name == entry.path.name  # the same key
        assert single.manifest["files"] == entry.manifest["files"]
        np.testing.assert_array_equal(single.features(), entry.features())  # bit-identical
    assert calls == [96, 128]

    # a second call: every entry is a hit; one more backbone is extracted alone
    calls.clear()
    more = together.ensure_many([*wanted, replace(_bb(96), pooling="max")], images)
    assert [cached for _, cached in more] == [True, True, False]
    assert calls == [96]
    calls.clear()
    twice = FeatureCache(tmp_path / "twice").ensure_many([wanted[0], wanted[0]], images)
    assert calls == [96] and twice[0] == twice[1] and not twice[0][1]  # one entry, asked twice
