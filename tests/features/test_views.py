"""Issue 13's views of the images: input size and pooling as choices, fused backbones.

The config tests need no TensorFlow (a dummy weights file); the fused-entry alignment is tested
on small hand-made entries; the fused features and the fused exported model on real photos.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from conftest import TWO_MOBILENETS, run_cli, write_sweep

from tlsweep.config._sweepfile import load_sweep
from tlsweep.errors import ConfigError, TlsweepError
from tlsweep.features._fusion import fuse_entries


@pytest.fixture
def doc(tmp_path: Path) -> dict[str, Any]:
    (tmp_path / "images").mkdir()
    w = tmp_path / "w.h5"
    w.write_bytes(b"dummy weights: only the file's existence counts here")
    bb = {"name": "MobileNetV2", "weights": str(w), "input_size": 96, "args": {"alpha": 0.35}}
    path = write_sweep(tmp_path / "sweep.yaml", tmp_path / "images", backbones=[bb])
    return yaml.safe_load(path.read_text())


def _load(tmp_path: Path, doc: dict[str, Any]):
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(doc))
    return load_sweep(p)


def _error(tmp_path: Path, doc: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as e:
        _load(tmp_path, doc)
    return str(e.value)


# --- input_size and pooling as choices ----------------------------------------------------------
def test_choices_expand_into_one_backbone_per_value(tmp_path: Path, doc: dict) -> None:
    doc["backbones"][0]["input_size"] = {"choices": [96, 160]}
    doc["backbones"][0]["pooling"] = {"choices": ["avg", "max"]}
    cfg = _load(tmp_path, doc)
    assert [(b.input_size, b.pooling) for b in cfg.backbones] == [
        (96, "avg"),
        (96, "max"),
        (160, "avg"),
        (160, "max"),
    ]
    labels = [b.label for b in cfg.backbones]
    assert labels == [
        "MobileNetV2-alpha0.35-96-avg",
        "MobileNetV2-alpha0.35-96-max",
        "MobileNetV2-alpha0.35-160-avg",
        "MobileNetV2-alpha0.35-160-max",
    ]
    # every value is a choice of the study's categorical `backbone` parameter
    import optuna

    from tlsweep.study._search import suggest

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = {suggest(study.ask(), cfg)["backbone"] for _ in range(40)}
    assert seen == set(labels)


def test_choices_change_the_space_fingerprint(tmp_path: Path, doc: dict) -> None:
    one = _load(tmp_path, doc).space_fingerprint()
    doc["backbones"][0]["input_size"] = {"choices": [96, 160]}
    assert _load(tmp_path, doc).space_fingerprint() != one


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ([96, 160], "backbones[0].input_size: got [96, 160]; write a list of options as {choices"),
        ({"choices": []}, "backbones[0].input_size.choices: got []; expected a non-empty list"),
        ({"choices": [96, 96]}, "backbones[0].input_size.choices: got [96, 96]; expected distinct"),
        ({"values": [96]}, "backbones[0].input_size.values: unknown key"),
        ({"choices": [96, "big"]}, "backbones[0].input_size: got 'big'; expected an integer"),
        ({"choices": [16, 96]}, "backbones[0].input_size: got 16; expected an integer from 32"),
    ],
)
def test_bad_choices_name_the_field(tmp_path: Path, doc: dict, value: Any, expected: str) -> None:
    doc["backbones"][0]["input_size"] = value
    assert expected in _error(tmp_path, doc)


def test_a_choice_that_repeats_another_entry_is_refused(tmp_path: Path, doc: dict) -> None:
    again = copy.deepcopy(doc["backbones"][0])
    doc["backbones"][0]["input_size"] = {"choices": [96, 160]}
    doc["backbones"].append(again)  # the 96 px one, a second time
    assert "MobileNetV2-alpha0.35-96-avg: the same backbone is listed twice" in _error(
        tmp_path, doc
    )


# --- fused backbones: config --------------------------------------------------------------------
def test_fuse_entry(tmp_path: Path, doc: dict) -> None:
    one = doc["backbones"][0]
    other = {**one, "input_size": 128, "pooling": "max"}
    doc["backbones"].append({"fuse": [one, other]})
    cfg = _load(tmp_path, doc)
    fused = cfg.backbones[1]
    assert [m.input_size for m in fused.members] == [96, 128]
    assert fused.label == "fuse(MobileNetV2-alpha0.35-96-avg+MobileNetV2-alpha0.35-128-max)"


@pytest.mark.parametrize(
    ("fuse", "expected"),
    [
        ("one", "backbones[1].fuse: got 'one'; expected a list of 2 or more backbones"),
        ("single", "backbones[1].fuse: got [{"),
        ("choices", "backbones[1].fuse[1]: a fused member takes one input_size"),
        ("twice", "backbones[1].fuse: the same backbone is listed twice"),
        ("nested", "backbones[1].fuse[1]: a fused backbone cannot contain another fuse:"),
        ("extra", "backbones[1].name: unknown key"),
    ],
)
def test_bad_fuse_entries(tmp_path: Path, doc: dict, fuse: str, expected: str) -> None:
    one = doc["backbones"][0]
    entry: dict[str, Any] = {
        "one": {"fuse": "one"},
        "single": {"fuse": [one]},
        "choices": {"fuse": [one, {**one, "input_size": {"choices": [96, 128]}}]},
        "twice": {"fuse": [one, one]},
        "nested": {"fuse": [one, {"fuse": [one, one]}]},
        "extra": {"fuse": [one, {**one, "input_size": 128}], "name": "x"},
    }[fuse]
    doc["backbones"].append(entry)
    assert expected in _error(tmp_path, doc)


def test_bad_fuse_through_the_cli_is_one_line_and_leaves_nothing(tmp_path: Path, doc: dict):
    doc["backbones"].append({"fuse": [doc["backbones"][0]]})
    sweep = tmp_path / "bad.yaml"
    sweep.write_text(yaml.safe_dump(doc))
    r = run_cli("run", str(sweep), "-q")
    assert r.returncode == 2, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("tlsweep: error:")]
    assert len(errors) == 1 and "backbones[1].fuse" in errors[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "optuna.db").exists() and not (tmp_path / "cache").exists()


# --- fused entries: alignment of the members' rows ----------------------------------------------
class _FakeEntry:
    """The part of a cache entry fusion reads: a manifest and a features array."""

    def __init__(self, key: str, files: list[tuple[str, int, str]], dim: int, skipped=()):
        rows = list(range(len(files)))[::-1]  # rows in a different order from the file list
        self.feats = np.zeros((len(files), dim), np.float32)
        for (path, _, _), r in zip(files, rows, strict=True):
            self.feats[r] = float(path.strip("f.jpg")) + np.arange(dim) / 100
        self.key = key
        self.path = Path("/nowhere") / key
        self.manifest = {
            "key": key,
            "key_parts": {"images": "digest"},
            "backbone": {"label": key},
            "data_dir": "/data",
            "class_names": ["a", "b"],
            "shape": [len(files), dim],
            "files": [
                {"path": p, "label": lab, "split": s, "row": r}
                for (p, lab, s), r in zip(files, rows, strict=True)
            ],
            "skipped": [{"path": p, "reason": "corrupt"} for p in skipped],
        }

    def features(self) -> np.ndarray:
        return self.feats


FILES = [("f1.jpg", 0, "train"), ("f2.jpg", 1, "train"), ("f3.jpg", 0, "validation")]


def test_fused_rows_are_the_members_rows_side_by_side() -> None:
    from dataclasses import replace

    from tlsweep.config._schema import BackboneConfig

    a = _FakeEntry("a", FILES, 2)
    b = _FakeEntry("b", [FILES[2], FILES[0], FILES[1]], 3)  # another file order too
    bb = replace(BackboneConfig(name="fuse"), members=(BackboneConfig(name="A"),) * 2)
    fused = fuse_entries(bb, [a, b])
    x, y = fused.split("train")
    assert y.tolist() == [0, 1]
    # f1 then f2: each row holds that file's features from a (2 columns) and from b (3)
    assert np.allclose(x[:, 0], [1, 2]) and np.allclose(x[:, 2], [1, 2])
    assert x.shape == (2, 5) and np.allclose(x[0], [1, 1.01, 1, 1.01, 1.02])
    assert fused.split_sizes() == {"train": 2, "validation": 1, "test": 0}


def test_a_file_one_member_skipped_is_left_out() -> None:
    from tlsweep.config._schema import BackboneConfig

    a = _FakeEntry("a", FILES, 2)
    b = _FakeEntry("b", FILES[1:], 2, skipped=["f1.jpg"])
    fused = fuse_entries(BackboneConfig(name="fuse"), [a, b])
    assert [f["path"] for f in fused.manifest["files"]] == ["f2.jpg", "f3.jpg"]
    assert fused.split("train")[0].shape == (1, 4)
    assert [s["path"] for s in fused.manifest["skipped"]] == ["f1.jpg"]


@pytest.mark.parametrize("what", ["label", "split", "class_names"])
def test_members_that_disagree_are_refused(what: str) -> None:
    from tlsweep.config._schema import BackboneConfig

    a = _FakeEntry("a", FILES, 2)
    if what == "class_names":
        b = _FakeEntry("b", FILES, 2)
        b.manifest["class_names"] = ["a", "c"]
    else:
        changed = ("f1.jpg", 1, "train") if what == "label" else ("f1.jpg", 0, "test")
        b = _FakeEntry("b", [changed, *FILES[1:]], 2)
    with pytest.raises(TlsweepError, match="disagree"):
        fuse_entries(BackboneConfig(name="fuse"), [a, b])


# --- fused features and the fused exported model, on real photos -------------------------------
def test_fused_features_from_the_cache_without_new_extraction(
    cats_dogs_small: Path, shared_cache: Path, cd_features: Any, tmp_path: Path
) -> None:
    from tlsweep.features._cache import extract_all

    mnv2, mn = TWO_MOBILENETS
    both = write_sweep(
        tmp_path / "both.yaml", cats_dogs_small, cache_dir=shared_cache, backbones=TWO_MOBILENETS
    )
    singles = {bb.label: e for bb, e, _ in extract_all(load_sweep(both))}
    fused_sweep = write_sweep(
        tmp_path / "fused.yaml",
        cats_dogs_small,
        cache_dir=shared_cache,
        backbones=[{"fuse": [mnv2, mn]}],
    )
    ((bb, fused, cached),) = extract_all(load_sweep(fused_sweep))
    assert cached, "every member was cached: the fused backbone extracts nothing"
    a, b = (singles[m.label] for m in bb.members)
    for split in ("train", "validation", "test"):
        x, y = fused.split(split)
        xa, ya = a.split(split)
        xb, _ = b.split(split)
        assert np.array_equal(y, ya)
        assert np.array_equal(x, np.concatenate([xa, xb], axis=1))
    assert fused.manifest["shape"] == [len(fused.manifest["files"]), 1280 + 256]


@pytest.mark.slow
def test_fused_export_computes_what_was_scored(
    cats_dogs_small: Path, shared_cache: Path, tmp_path: Path
) -> None:
    """The exported fused model, on raw images, gives the probabilities the head gave on the
    fused cached features."""
    from tlsweep.features._cache import extract_all
    from tlsweep.head._train import HeadParams, train_head
    from tlsweep.winner._export import build_export_model
    from tlsweep.winner._rebuild import Winner

    sweep = write_sweep(
        tmp_path / "fused.yaml",
        cats_dogs_small,
        cache_dir=shared_cache,
        backbones=[
            {
                "fuse": [
                    dict(m, input_size=s) for m, s in zip(TWO_MOBILENETS, (96, 128), strict=True)
                ]
            }
        ],
    )
    ((bb, entry, _),) = extract_all(load_sweep(sweep))
    xt, yt = entry.split("train")
    xv, yv = entry.split("validation")
    head = train_head(
        xt,
        yt,
        xv,
        yv,
        2,
        HeadParams(units=32, dropout=0.0, learning_rate=1e-3, batch_size=32, epochs=3, seed=1),
    )
    model = build_export_model(Winner(0, 0.0, {}, bb, entry, head, None))
    assert [layer.name for layer in model.layers if layer.name.startswith("resize")] == [
        "resize_0",
        "resize_1",
    ]
    files = [f for f in entry.manifest["files"] if f["split"] == "validation"][:6]
    paths = [str(Path(entry.manifest["data_dir"]) / f["path"]) for f in files]
    xs, _ = entry.split("validation")
    want = head.predict_proba(xs[:6])
    # each image at its own size, as a user would feed it (decoded by TensorFlow, as tlsweep
    # decodes; Pillow's JPEG decoder differs by a grey level here and there)
    import tensorflow as tf

    def raw(p: str) -> np.ndarray:
        img = tf.io.decode_image(tf.io.read_file(p), channels=3, expand_animations=False)
        return np.asarray(img, "float32")[None]

    got = np.concatenate([np.asarray(model(raw(p))) for p in paths])
    assert np.allclose(got, want, atol=2e-3), (got, want)
