"""Issue 13, item 2: augmented feature views (``augment:`` on a backbone entry) and TTA.

The config tests need no TensorFlow; the views are extracted from real photos through the
TinyConvNet stand-in (seconds); the head tests use small synthetic feature arrays; one sweep
through the real CLI checks that the exported model computes the test score it reports.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from conftest import CATS_DOGS, need_shared, run_cli, small_copy, write_sweep

from tlsweep.config._resolved import resolved
from tlsweep.config._sweepfile import load_sweep
from tlsweep.errors import ConfigError

TINY = {"name": "TinyConvNet", "weights": "none", "input_size": 48, "pooling": "avg"}
SEARCH = {
    "n_trials": 2,
    "sampler": "random",
    "pruner": "none",
    "space": {"units": 16, "learning_rate": 3e-3, "batch_size": 16, "epochs": 3},
}


def _sweep(tmp_path: Path, data: Path, *backbones: dict, name: str = "sweep.yaml", **kw) -> Path:
    return write_sweep(
        tmp_path / name,
        data,
        backbones=list(backbones),
        search=SEARCH,
        cache_dir=kw.pop("cache_dir", tmp_path / "cache"),
        **kw,
    )


def _with(**augment: Any) -> dict:
    return {**TINY, "augment": augment}


# --- the schema ----------------------------------------------------------------------------------
def test_defaults_label_and_resolved_round_trip(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    cfg = load_sweep(
        _sweep(tmp_path, tmp_path / "images", TINY, _with(), _with(views=2, tta=True, train="all"))
    )
    plain, default, other = cfg.backbones
    assert plain.augment is None
    from tlsweep.config._schema import DEFAULT_VIEWS

    assert {k: getattr(default.augment, k) for k in DEFAULT_VIEWS} == DEFAULT_VIEWS
    assert [b.label for b in cfg.backbones] == [
        "TinyConvNet-48-avg-random",
        f"TinyConvNet-48-avg-random-views{DEFAULT_VIEWS['views']}",
        "TinyConvNet-48-avg-random-views2-tta-all",
    ]
    doc = resolved(cfg)
    assert "augment" not in doc["backbones"][0]  # a plain entry resolves as it always did
    (tmp_path / "again.yaml").write_text(yaml.safe_dump(doc))
    assert load_sweep(tmp_path / "again.yaml").backbones == cfg.backbones


@pytest.mark.parametrize(
    ("augment", "expected"),
    [
        ({"views": 1}, "backbones[0].augment.views: got 1; expected an integer from 2 to 64"),
        ({"views": "4"}, "backbones[0].augment.views: got '4'; expected an integer from 2 to"),
        ({"crop": 0.7}, "backbones[0].augment.crop: got 0.7; expected a number from 0 to 0.5"),
        ({"crop": -0.1}, "backbones[0].augment.crop: got -0.1; expected a number from 0 to 0.5"),
        ({"flip": "yes"}, "backbones[0].augment.flip: got 'yes'; expected true or false"),
        ({"tta": 1}, "backbones[0].augment.tta: got 1; expected true or false"),
        ({"train": "some"}, "backbones[0].augment.train: got 'some'; allowed: one | all"),
        ({"seed": -1}, "backbones[0].augment.seed: got -1; expected an integer >= 0"),
        ({"view": 4}, "backbones[0].augment.view: unknown key; did you mean 'views'?"),
        ({"flip": False, "crop": 0}, "backbones[0].augment: flip: false and crop: 0 make every"),
    ],
)
def test_bad_values_are_one_line_naming_the_key(
    tmp_path: Path, augment: dict, expected: str
) -> None:
    (tmp_path / "images").mkdir()
    with pytest.raises(ConfigError) as e:
        load_sweep(_sweep(tmp_path, tmp_path / "images", _with(**augment)))
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_fused_members_and_indistinguishable_entries_are_refused(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    other = {**TINY, "input_size": 64}
    with pytest.raises(ConfigError, match=r"backbones\[0\]\.fuse\[1\]\.augment: a fused member"):
        load_sweep(
            _sweep(tmp_path, tmp_path / "images", {"fuse": [TINY, {**other, "augment": {}}]})
        )
    with pytest.raises(ConfigError, match="another entry has the same label"):
        load_sweep(_sweep(tmp_path, tmp_path / "images", _with(crop=0.1), _with(crop=0.2)))


def test_cli_refuses_a_bad_augment_before_any_work(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    path = _sweep(tmp_path, tmp_path / "images", _with(views=0))
    r = run_cli("run", str(path), cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("tlsweep: error: ")
    assert "augment.views: got 0" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "sweep.yaml"]


# --- the views in the cache ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    need_shared()
    d = tmp_path_factory.mktemp("aug_photos")
    for split, n in (("train", 8), ("validation", 4), ("test", 4)):
        small_copy(CATS_DOGS / split, d / split, n, None)
    return d


def _extract(tmp_path: Path, photos: Path, *backbones: dict, cache: Path) -> list:
    from tlsweep.features._cache import extract_all

    return extract_all(load_sweep(_sweep(tmp_path, photos, *backbones, cache_dir=cache)))


def test_views_are_seeded_keyed_and_beside_the_plain_entry(tmp_path: Path, photos: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    (_, plain, _), (bb, views, cached) = _extract(tmp_path, photos, TINY, _with(views=3), cache=a)
    assert not cached and bb.augment is not None
    assert views.key != plain.key and views.path != plain.path
    assert views.manifest["views"] == {"count": 3, "base": 32, "rows": 16, "splits": ["train"]}
    assert views.manifest["shape"][0] == 32 + 2 * 16  # K x on the training images only
    assert views.manifest["timings"]["forward_passes"] == 64
    x, y = views.views("train")
    assert x.shape == (3, 16, plain.manifest["shape"][1]) and len(y) == 16
    p, py = plain.split("train")
    np.testing.assert_array_equal(x[0], p)  # view 0 is the plain image
    np.testing.assert_array_equal(y, py)
    assert all(np.abs(x[v] - x[0]).mean() > 1e-4 for v in (1, 2))  # the views differ from it
    assert np.abs(x[1] - x[2]).mean() > 1e-4
    xv, _ = views.views("validation")  # no tta: validation holds the plain view only
    np.testing.assert_array_equal(xv, plain.split("validation")[0])

    # the same images and settings give bit-identical views in another cache, another time
    ((_, again, _),) = _extract(tmp_path, photos, _with(views=3), cache=b)
    assert again.key == views.key
    np.testing.assert_array_equal(again.views("train")[0], x)

    # another crop is another entry, beside the others: the plain entry is reused
    out = _extract(tmp_path, photos, TINY, _with(views=3, crop=0.3), cache=a)
    assert [c for _, _, c in out] == [True, False]
    other = out[1][1]
    assert other.key != views.key and other.manifest["key_parts"]["augment"]["crop"] == 0.3
    np.testing.assert_array_equal(other.views("train")[0][0], p)
    out = _extract(tmp_path, photos, TINY, _with(views=3), cache=a)
    assert [c for _, _, c in out] == [True, True]
    assert np.abs(other.views("train")[0][1] - x[1]).mean() > 1e-4


def test_tta_gives_validation_and_test_their_views(tmp_path: Path, photos: Path) -> None:
    ((_, e, _),) = _extract(tmp_path, photos, _with(views=2, tta=True), cache=tmp_path / "c")
    assert e.manifest["views"]["rows"] == 32 and e.manifest["shape"][0] == 64
    for split, n in (("train", 16), ("validation", 8), ("test", 8)):
        x, y = e.views(split)
        assert x.shape[:2] == (2, n) and len(y) == n
        np.testing.assert_array_equal(x[0], e.split(split)[0])


def test_a_files_views_do_not_depend_on_the_other_files(tmp_path: Path, photos: Path) -> None:
    import shutil

    fewer = tmp_path / "fewer"
    shutil.copytree(photos, fewer)
    dropped = sorted((fewer / "train" / "cats").iterdir())[0]
    dropped.unlink()
    ((_, all_, _),) = _extract(tmp_path, photos, _with(views=2), cache=tmp_path / "c1")
    ((_, few, _),) = _extract(tmp_path, fewer, _with(views=2), cache=tmp_path / "c2")
    x_all, _ = all_.views("train")
    x_few, _ = few.views("train")
    paths = [f["path"] for f in all_.manifest["files"] if f["split"] == "train"]
    keep = [i for i, p in enumerate(paths) if not p.endswith(dropped.name)]
    np.testing.assert_array_equal(x_few[1], x_all[1][keep])


# --- the head on views ---------------------------------------------------------------------------
def _data(seed: int = 0, n: int = 64, d: int = 8) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    x = rng.normal(size=(n, d)).astype(np.float32) + y[:, None].astype(np.float32)
    return x, y


def _hp(**kw: Any) -> Any:
    from tlsweep.head._train import HeadParams

    base = {"units": 8, "dropout": 0.0, "learning_rate": 1e-2, "batch_size": 16, "epochs": 4}
    return HeadParams(**{**base, **kw})


def test_training_on_views_picks_one_seeded_view_per_image_per_epoch() -> None:
    from tlsweep.head._train import train_head

    x, y = _data()
    xv, yv = _data(1, 32)
    same = train_head(np.stack([x, x, x]), y, xv, yv, 2, _hp())
    plain = train_head(x, y, xv, yv, 2, _hp())
    for a, b in zip(same.weights, plain.weights, strict=True):
        np.testing.assert_array_equal(a, b)  # identical views: exactly the plain training
    noisy = np.stack([x, x + 1.0, x - 1.0])
    one = train_head(noisy, y, xv, yv, 2, _hp())
    again = train_head(noisy, y, xv, yv, 2, _hp())
    for a, b in zip(one.weights, again.weights, strict=True):
        np.testing.assert_array_equal(a, b)  # seeded: the same choices every time
    assert not np.array_equal(one.weights[0], plain.weights[0])  # the other views were used
    reseeded = train_head(noisy, y, xv, yv, 2, _hp(seed=7))
    plain7 = train_head(x, y, xv, yv, 2, _hp(seed=7))
    assert not np.array_equal(reseeded.weights[0], plain7.weights[0])


def test_training_on_all_views_is_training_on_every_view_as_an_example() -> None:
    from tlsweep.head._train import train_head

    x, y = _data()
    xv, yv = _data(1, 32)
    views = np.stack([x, x + 0.5])
    every = train_head(views, y, xv, yv, 2, _hp(), train_views="all")
    flat = train_head(np.concatenate([x, x + 0.5]), np.concatenate([y, y]), xv, yv, 2, _hp())
    for a, b in zip(every.weights, flat.weights, strict=True):
        np.testing.assert_array_equal(a, b)


def test_tta_scores_the_mean_of_the_views_probabilities() -> None:
    from tlsweep.head._train import train_head

    x, y = _data()
    xv, yv = _data(1, 41)
    views = np.stack([xv, xv + 0.7, xv - 0.9])
    head = train_head(x, y, views, yv, 2, _hp(), extra_metrics=("balanced_accuracy",))
    mean = np.mean([head.predict_proba(v) for v in views], axis=0)
    np.testing.assert_allclose(head.predict_proba(views), mean, rtol=1e-6)
    last = head.history[-1]
    assert last.val_accuracy == pytest.approx(float((mean.argmax(1) == yv).mean()))
    expected_loss = -np.mean(np.log(mean[np.arange(len(yv)), yv]))
    assert last.val_loss == pytest.approx(expected_loss, rel=1e-5)
    single = float((head.predict_proba(xv).argmax(1) == yv).mean())
    assert single != last.val_accuracy  # the views changed the score: not view 0 alone


# --- end to end: the exported model computes what is reported for it -----------------------------
def _ok(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    r = run_cli(*args, cwd=cwd)
    assert r.returncode == 0, f"{args}: exit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.mark.slow  # an export and a Keras-only process (~25 s): CI runs it
def test_export_of_a_tta_winner_computes_its_reported_test_score(
    tmp_path: Path, photos: Path
) -> None:
    from tlsweep.winner._export import read_metadata
    from tlsweep.winner._predict import predict

    path = _sweep(tmp_path, photos, _with(views=3, tta=True), study="aug")
    run = _ok("run", str(path), "-q", cwd=tmp_path)
    assert "views3-tta" in run.stdout
    assert "with test-time augmentation over 3 cached views: test accuracy" in run.stdout
    model_path = tmp_path / "m.keras"
    out = _ok("export", str(path), "-o", str(model_path), cwd=tmp_path).stdout
    test_accuracy = float(out.split("test accuracy ")[1].split()[0].rstrip(","))
    assert "which the exported model computes (no test-time augmentation)" in out
    assert "with test-time augmentation (mean of 3 cached views; not in the exported model)" in out
    meta = read_metadata(model_path)
    assert meta["test_time_augmentation"] is False
    assert meta["test"]["accuracy"] == pytest.approx(test_accuracy, abs=1e-4)
    assert "tta_accuracy" in meta["test"]
    # the registry ranks the model on the plain view's validation score, which it computes;
    # the trial's value (the views' mean) is kept beside it
    single = float(out.split("its validation val_accuracy ")[1].split()[0])
    trial_value = float(out.split("winner: trial ")[1].split("val_accuracy ")[1].split()[0])
    assert meta["validation_val_accuracy"] == pytest.approx(single, abs=1e-4)
    assert meta["validation_val_accuracy_tta"] == pytest.approx(trial_value, abs=1e-4)
    rows, bad, _ = predict(model_path, [str(photos / "test")])  # loads it in safe mode
    right = [Path(r["file"]).parent.name == r["class"] for r in rows]
    assert len(rows) == 8 and not bad
    assert sum(right) / len(rows) == pytest.approx(test_accuracy, abs=1e-4)

    # a study resumed with other augment settings is refused like other data changes (the
    # check `run` makes before extracting anything)
    import optuna

    from tlsweep.errors import StudyError
    from tlsweep.sweep import check_study_data

    doc = yaml.safe_load(path.read_text())
    doc["backbones"][0]["augment"]["crop"] = 0.25
    path.write_text(yaml.safe_dump(doc))
    cfg = load_sweep(path)
    study = optuna.load_study(study_name="aug", storage=cfg.storage)
    with pytest.raises(StudyError) as e:
        check_study_data(cfg, study)
    msg = str(e.value)
    assert msg.startswith("study 'aug'") and "was scored on other features" in msg
    assert "augment" in msg and "'crop': 0.1" in msg and "'crop': 0.25" in msg


@pytest.mark.slow
def test_real_backbone_export_computes_the_plain_view_not_the_views_mean(
    cats_dogs_small: Path, shared_cache: Path, tmp_path: Path
) -> None:
    """MobileNetV2 with real weights: the head trained on augmented views, exported, gives on
    raw images the probabilities the head gives on the plain view (view 0), not the TTA mean."""
    import tensorflow as tf
    from conftest import TWO_MOBILENETS

    from tlsweep.features._cache import extract_all
    from tlsweep.head._train import HeadParams, train_head
    from tlsweep.winner._export import build_export_model
    from tlsweep.winner._rebuild import Winner

    bb = {**TWO_MOBILENETS[0], "augment": {"views": 3, "crop": 0.2, "tta": True}}
    sweep = write_sweep(
        tmp_path / "s.yaml", cats_dogs_small, cache_dir=shared_cache, backbones=[bb]
    )
    ((backbone, entry, _),) = extract_all(load_sweep(sweep))
    xt, yt = entry.views("train")
    xv, yv = entry.views("validation")
    assert xt.ndim == 3 and xv.ndim == 3
    hp = HeadParams(units=32, dropout=0.0, learning_rate=1e-3, batch_size=32, epochs=3, seed=1)
    head = train_head(xt, yt, xv, yv, 2, hp)
    model = build_export_model(Winner(0, 0.0, {}, backbone, entry, head, None))
    files = [f for f in entry.manifest["files"] if f["split"] == "test"][:6]
    paths = [str(Path(entry.manifest["data_dir"]) / f["path"]) for f in files]
    xs_views, _ = entry.views("test")

    def raw(p: str) -> np.ndarray:
        img = tf.io.decode_image(tf.io.read_file(p), channels=3, expand_animations=False)
        return np.asarray(img, "float32")[None]

    got = np.concatenate([np.asarray(model(raw(p))) for p in paths])
    plain = head.predict_proba(xs_views[0][:6])
    mean = head.predict_proba(xs_views[:, :6])
    assert np.allclose(got, plain, atol=2e-3), (got, plain)
    assert np.abs(mean - plain).max() > 1e-2  # the views' mean is another computation


def test_readme_shows_every_augment_default() -> None:
    from conftest import readme_sweep as _readme_sweep

    from tlsweep.config._schema import DEFAULT_VIEWS

    assert _readme_sweep()["backbones"][0]["augment"] == DEFAULT_VIEWS
