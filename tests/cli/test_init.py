"""`tlsweep init DATA_DIR`: a first sweep file for any folder of real photos, with a Keras cache
that holds only the two shared ImageNet weight files (so what it picks runs offline here)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import FLOWERS, MODELS, CliInProcess, need_shared, run_cli, small_copy

from tlsweep.config import load_sweep


@pytest.fixture
def keras_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A Keras cache holding only the two shared weight files, as KERAS_HOME."""
    need_shared()
    home = tmp_path_factory.mktemp("keras_home")
    shutil.copytree(MODELS, home / "models")
    monkeypatch.setenv("KERAS_HOME", str(home))
    return home


def imbalanced_flowers(dst: Path) -> Path:
    """Layout B: daisy 48, rose 12, tulip 16 real photos (4x), and one text file named .jpg."""
    for name, n in (("daisy", 48), ("rose", 12), ("tulip", 16)):
        (dst / name).mkdir(parents=True)
        for f in sorted((FLOWERS / name).iterdir())[:n]:
            shutil.copy(f, dst / name / f.name)
    (dst / "rose" / "notes.jpg").write_text("not a photo")
    return dst


def only_error_line(r: object) -> str:
    assert r.returncode == 2, (r.stdout, r.stderr)  # type: ignore[attr-defined]
    err = r.stderr  # type: ignore[attr-defined]
    assert err.startswith("tlsweep: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


def test_init_imbalanced_layout_b_weights_classes_and_runs_offline(
    tmp_path: Path, keras_home: Path, cli: CliInProcess
) -> None:
    data = imbalanced_flowers(tmp_path / "photos")
    out = tmp_path / "sweep.yaml"
    r = cli("init", str(data), "-o", str(out))
    assert r.returncode == 0, r.stderr
    # what it found, said on the console
    split = re.search(r"layout B \(one folder per class\), split by tlsweep: (.*)\n", r.stdout)
    assert split, r.stdout
    counts = dict(x.split(" ") for x in split.group(1).split(", "))
    assert list(counts) == ["train", "validation", "test"]
    assert sum(map(int, counts.values())) == 48 + 12 + 16  # the readable photos
    assert "3 classes: daisy 48, rose 12, tulip 16" in r.stdout
    assert "typical image 128x128 px" in r.stdout  # the flowers are all 128x128
    assert "1 unreadable file(s), skipped: rose/notes.jpg" in r.stdout
    assert "imbalanced classes (largest 4.0x the smallest)" in r.stdout
    assert "measured here on 32 images: extraction about" in r.stdout
    # the file: short, commented, and what the folder needs
    text = out.read_text()
    assert text.startswith("# Written by `tlsweep init`")
    doc = yaml.safe_load(text)
    assert doc["data"] == {"dir": "photos"}  # relative to the sweep file
    assert doc["search"]["class_weight"] == "balanced"
    assert doc["search"]["metric"] == "val_balanced_accuracy"
    assert doc["search"]["cv_folds"] == 5  # 53 training images
    assert 10 <= doc["search"]["n_trials"] <= 50
    # both cached backbones, at a size suited to 128 px images, from the files in the cache
    names = [(b["name"], b["args"]["alpha"], b["input_size"]) for b in doc["backbones"]]
    assert sorted(names) == [("MobileNet", 0.25, 128), ("MobileNetV2", 0.35, 128)]
    # the Keras cache is the machine's, not the project's: its files by absolute path
    assert all(Path(b["weights"]).is_absolute() for b in doc["backbones"])
    cfg = load_sweep(out)  # valid as written, its paths resolved beside it
    assert cfg.data.dir == data.resolve()
    files = {Path(b.weights).name for b in cfg.backbones}
    assert files == {p.name for p in (keras_home / "models").iterdir()}
    assert cfg.search.class_weight == "balanced" and cfg.search.cv_folds == 5


def test_init_layout_a_at_224_uses_imagenet_by_name(
    tmp_path: Path, keras_home: Path, cats_dogs_small: Path, cli: CliInProcess
) -> None:
    out = tmp_path / "first.yaml"
    r = cli("init", str(cats_dogs_small), "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert "layout A (train/validation folders): train 80, validation 40, test 40" in r.stdout
    assert "2 classes: cats 80, dogs 80" in r.stdout  # every split
    doc = yaml.safe_load(out.read_text())
    assert "class_weight" not in doc["search"]  # balanced classes
    assert doc["search"]["metric"] == "val_accuracy"
    assert doc["search"]["cv_folds"] == 5  # 80 training images
    # the photos are large: 224 px, the size the cached files are named for, so `imagenet`
    assert {(b["name"], b["weights"], b["input_size"]) for b in doc["backbones"]} == {
        ("MobileNet", "imagenet", 224),
        ("MobileNetV2", "imagenet", 224),
    }
    cfg = load_sweep(out)
    assert cfg.data.dir == cats_dogs_small.resolve()


def test_init_without_cached_weights_picks_a_small_default_list(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cli: CliInProcess
) -> None:
    need_shared()
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "empty_keras_home"))
    data = small_copy(FLOWERS, tmp_path / "flowers", 12, None)
    out = tmp_path / "sweep.yaml"
    r = cli("init", str(data), "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert "the first run downloads them once" in r.stdout
    doc = yaml.safe_load(out.read_text())
    assert [b["name"] for b in doc["backbones"]] == ["MobileNetV2", "EfficientNetB0"]
    assert {b["weights"] for b in doc["backbones"]} == {"imagenet"}
    load_sweep(out)


def test_init_empty_folder_is_one_error_line_and_writes_nothing(
    tmp_path: Path, cli: CliInProcess
) -> None:
    (tmp_path / "empty").mkdir()
    r = cli("init", str(tmp_path / "empty"), "-o", str(tmp_path / "sweep.yaml"))
    err = only_error_line(r)
    assert "no class folders" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_init_single_class_is_one_error_line_and_writes_nothing(
    tmp_path: Path, cli: CliInProcess
) -> None:
    need_shared()
    one = tmp_path / "one" / "daisy"
    one.mkdir(parents=True)
    for f in sorted((FLOWERS / "daisy").iterdir())[:5]:
        shutil.copy(f, one / f.name)
    r = cli("init", str(tmp_path / "one"), "-o", str(tmp_path / "sweep.yaml"))
    err = only_error_line(r)
    assert "only one class (daisy)" in err and "at least two" in err
    assert not (tmp_path / "sweep.yaml").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["one"]


def test_init_missing_folder_and_bad_flag_are_one_error_line(
    tmp_path: Path, cli: CliInProcess
) -> None:
    err = only_error_line(cli("init", str(tmp_path / "nope"), "-o", str(tmp_path / "s.yaml")))
    assert "nope: no such folder" in err
    err = only_error_line(cli("init", str(tmp_path), "--bogus"))
    assert "unrecognized arguments: --bogus" in err
    err = only_error_line(cli("init"))
    assert "DATA_DIR" in err
    err = only_error_line(cli("init", str(tmp_path), "-o", str(tmp_path / "no" / "s.yaml")))
    assert f"no folder {tmp_path / 'no'}; create it first" in err
    err = only_error_line(cli("init", str(tmp_path), "-o", str(tmp_path)))
    assert "is a folder; give a file name" in err
    assert list(tmp_path.iterdir()) == []


def test_init_refuses_an_existing_file_and_replaces_it_with_force(
    tmp_path: Path, keras_home: Path, cli: CliInProcess
) -> None:
    data = imbalanced_flowers(tmp_path / "photos")
    out = tmp_path / "sweep.yaml"
    out.write_text("study: mine\n")
    r = cli("init", str(data), "-o", str(out))
    err = only_error_line(r)
    assert "the file exists; pass --force to replace it" in err
    assert out.read_text() == "study: mine\n"  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos", "sweep.yaml"]  # no temp file
    r = cli("init", str(data), "-o", str(out), "--force")
    assert r.returncode == 0, r.stderr
    assert load_sweep(out).study == "photos"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos", "sweep.yaml"]


@pytest.mark.slow
def test_init_then_run_as_written(tmp_path: Path, keras_home: Path) -> None:
    """The written file runs as written, from another working directory: imbalanced classes,
    balanced weights, five folds, both cached backbones."""
    data = imbalanced_flowers(tmp_path / "project" / "photos")
    r = run_cli("init", "photos", cwd=tmp_path / "project")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "project" / "sweep.yaml").is_file()
    work = tmp_path / "elsewhere"
    work.mkdir()
    r = run_cli("run", "../project/sweep.yaml", "--n-trials", "2", "-q", cwd=work)
    assert r.returncode == 0, r.stderr
    assert "val_balanced_accuracy" in r.stdout, r.stdout
    assert data.is_dir()


def test_init_names_with_line_breaks_still_give_a_valid_file(
    tmp_path: Path, keras_home: Path, cli: CliInProcess
) -> None:
    """A folder or class name may hold a line break: the comments stay comments, and the file
    still parses and loads."""
    data = tmp_path / "ph\nstudy: injected\n#"
    for name in ("daisy", "rose\nx: 1"):
        (data / name).mkdir(parents=True)
        for f in sorted((FLOWERS / name.partition("\n")[0]).iterdir())[:12]:
            shutil.copy(f, data / name / f.name)
    out = tmp_path / "sweep.yaml"
    r = cli("init", str(data), "-o", str(out))
    assert r.returncode == 0, r.stderr
    doc = yaml.safe_load(out.read_text())
    assert doc["study"] != "injected"
    assert load_sweep(out).data.dir == data.resolve()
