"""Hostile inputs: a corpus of broken and odd image files, bad folders, broken sweep files."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import CATS_DOGS, need_shared, run_cli, without_root_powers, write_sweep


def _one_error_line(stderr: str) -> None:
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("tlsweep: error:")]
    assert len(errors) == 1, stderr[-3000:]
    assert len(errors[0]) > len("tlsweep: error: ")


# --- a corpus of odd files next to good photos --------------------------------------------------
BAD = ("truncated.jpg", "zero.jpg", "text.jpg", "bomb.png")
ODD = (
    "rgba.png",
    "deep16.png",
    "gray.png",
    "gray.jpg",
    "cmyk.jpg",
    "with space.jpg",
    "chat été 1.jpg",
)
HIDDEN = (".DS_Store", "._x.jpg")


def _make_corpus(root: Path) -> Path:
    import numpy as np
    from PIL import Image

    need_shared()
    for cls in ("cats", "dogs"):
        d = root / cls
        d.mkdir(parents=True)
        for f in sorted((CATS_DOGS / "train" / cls).iterdir())[:10]:
            shutil.copy(f, d / f.name)
    d = root / "cats"
    src = sorted(d.iterdir())[0]
    photo = Image.open(src).convert("RGB")
    data = src.read_bytes()
    (d / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (d / "zero.jpg").write_bytes(b"")
    (d / "text.jpg").write_text("hello, I am not a JPEG\n")
    photo.convert("RGBA").save(d / "rgba.png")
    arr16 = np.asarray(photo.convert("L"), dtype=np.uint16) * 257
    Image.fromarray(arr16).save(d / "deep16.png")
    photo.convert("L").save(d / "gray.png")
    photo.convert("L").save(d / "gray.jpg")
    photo.convert("CMYK").save(d / "cmyk.jpg")
    photo.save(d / "with space.jpg")
    photo.save(d / "chat été 1.jpg")
    Image.new("1", (12000, 12000)).save(d / "bomb.png")  # 144 Mpx, a few kB on disk
    assert (d / "bomb.png").stat().st_size < 1_000_000
    os.symlink("loop", d / "loop")
    (d / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (d / "._x.jpg").write_bytes(b"\x00\x05\x16\x07")
    return root


def test_extract_odd_corpus(tmp_path: Path):
    data = _make_corpus(tmp_path / "data")
    unreadable = data / "dogs" / "locked.jpg"
    shutil.copy(sorted((data / "dogs").iterdir())[0], unreadable)
    locked_dir = data / "dogs" / "locked"
    locked_dir.mkdir()
    shutil.copy(sorted((data / "dogs").iterdir())[0], locked_dir / "inside.jpg")
    sweep = write_sweep(
        tmp_path / "sweep.yaml",
        data,
        study="odd",
        data={"dir": str(data), "validation_split": 0.2, "test_split": 0.2},
    )
    unreadable.chmod(0)
    locked_dir.chmod(0)
    try:
        r = run_cli("extract", str(sweep), "-q", wrap=without_root_powers())
    finally:
        unreadable.chmod(0o644)
        locked_dir.chmod(0o755)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    # TensorFlow's start-up lines about oneDNN and CUDA are not the user's business
    assert "cuInit" not in r.stderr and "absl::InitializeLog" not in r.stderr, r.stderr[:2000]
    (entry,) = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    m = json.loads((entry / "manifest.json").read_text())
    files = {Path(f["path"]).name for f in m["files"]}
    skipped = {Path(s["path"]).name: s["reason"] for s in m["skipped"]}
    ignored = {Path(s["path"]).name: s["reason"] for s in m["ignored"]}
    n_skipped = len(m["skipped"])
    assert n_skipped >= len(BAD)
    assert f"{n_skipped} " in r.stderr and "skipped" in r.stderr, r.stderr[-2000:]
    for name in BAD:
        assert name in skipped, (name, skipped)
        assert skipped[name]
        assert name not in files
    for name in ODD:
        assert (name in files) != (name in skipped), (name, files, skipped)
        if name in skipped:
            assert skipped[name], name
    for name in HIDDEN:
        assert name not in files and name not in skipped and name not in ignored
    assert "loop" in ignored and "loop" not in files
    assert "Permission denied" in skipped[unreadable.name], skipped
    assert "Permission denied" in ignored["locked"], ignored
    assert "inside.jpg" not in files
    # the good photos: all of them used
    assert sum(1 for n in files if n.startswith(("cat.", "dog."))) == 20


def test_empty_class_folder_is_an_error(tmp_path: Path):
    need_shared()
    data = tmp_path / "data"
    (data / "dogs").mkdir(parents=True)
    (data / "cats").mkdir()
    for f in sorted((CATS_DOGS / "train" / "cats").iterdir())[:8]:
        shutil.copy(f, data / "cats" / f.name)
    sweep = write_sweep(tmp_path / "sweep.yaml", data)
    r = run_cli("extract", str(sweep), "-q")
    assert r.returncode == 2, r.stderr[-3000:]
    _one_error_line(r.stderr)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


@pytest.mark.parametrize("split", ["train", "validation"])
def test_a_split_left_without_usable_images_is_an_error(tmp_path: Path, split: str):
    need_shared()
    data = tmp_path / "data"
    for s in ("train", "validation"):
        for cls in ("cats", "dogs"):
            (data / s / cls).mkdir(parents=True)
            for f in sorted((CATS_DOGS / s / cls).iterdir())[:4]:
                shutil.copy(f, data / s / cls / f.name)
    broken = ["dogs"] if split == "train" else ["cats", "dogs"]
    for cls in broken:  # every file of them unusable: text named .jpg, an empty file
        for f in (data / split / cls).iterdir():
            f.unlink()
        (data / split / cls / "a.jpg").write_text("not a JPEG\n")
        (data / split / cls / "b.jpg").write_bytes(b"")
    sweep = write_sweep(tmp_path / "sweep.yaml", data)
    written = []
    for command in ("extract", "run"):
        r = run_cli(command, str(sweep), "-q")
        assert r.returncode == 2, r.stderr[-3000:]
        _one_error_line(r.stderr)
        error = next(x for x in r.stderr.splitlines() if x.startswith("tlsweep: error:"))
        expect = "class 'dogs' has no usable training image" if split == "train" else "validation"
        assert expect in error and "manifest.json" in error, error
        # the features were kept, and `run` reused them: fixing the files is all that is left
        (entry,) = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
        written.append((entry.name, (entry / "manifest.json").stat().st_mtime_ns))
    assert written[0] == written[1]
    assert not (tmp_path / "optuna.db").exists()


def test_single_class_is_an_error(tmp_path: Path):
    need_shared()
    data = tmp_path / "data"
    (data / "cats").mkdir(parents=True)
    for f in sorted((CATS_DOGS / "train" / "cats").iterdir())[:8]:
        shutil.copy(f, data / "cats" / f.name)
    sweep = write_sweep(tmp_path / "sweep.yaml", data)
    r = run_cli("extract", str(sweep), "-q")
    assert r.returncode == 2, r.stderr[-3000:]
    _one_error_line(r.stderr)


# --- broken sweep files ---------------------------------------------------------------------------
def _set(doc: dict, dotted: str, value) -> dict:
    *path, last = dotted.split(".")
    d = doc
    for k in path:
        d = d[int(k)] if isinstance(d, list) else d[k]
    if isinstance(d, list):
        d[int(last)] = value
    else:
        d[last] = value
    return doc


_MISSING = object()

CASES = {
    "unknown-top-key": ("studdy", "x"),
    "study-wrong-type": ("study", ["a", "b"]),
    "data-not-mapping": ("data", "somewhere"),
    "data-unknown-key": ("data.folder", "x"),
    "data-split-out-of-range": ("data.validation_split", 1.5),
    "data-seed-negative": ("data.seed", -3),
    "backbones-empty": ("backbones", []),
    "backbone-unknown-name": ("backbones.0.name", "NoSuchNet"),
    "backbone-size-wrong-type": ("backbones.0.input_size", "big"),
    "backbone-size-too-small": ("backbones.0.input_size", 8),
    "backbone-pooling-bad": ("backbones.0.pooling", "median"),
    "backbone-unknown-key": ("backbones.0.weigths", "imagenet"),
    "search-n-trials-zero": ("search.n_trials", 0),
    "search-n-trials-bool": ("search.n_trials", True),
    "search-sampler-bad": ("search.sampler", "genetic-magic"),
    "search-space-low-gt-high": ("search.space.units", {"low": 128, "high": 16}),
    "search-space-unknown-key": ("search.space.units", {"low": 16, "hi": 64}),
    "search-grace-not-longer": ("search.grace_period", 2),
}
RAW = {
    "invalid-yaml": "study: [unclosed\ndata: {dir: x\n",
    "empty-file": "",
    "only-comment": "# nothing here\n",
    "top-level-list": "- a\n- b\n",
    "binary-garbage": None,
}


def _sweep_variants(tmp_path: Path, data_dir: Path, case: str) -> Path:
    path = tmp_path / "sweep.yaml"
    if case in RAW:
        if RAW[case] is None:
            path.write_bytes(bytes(range(256)) * 4)
        else:
            path.write_text(RAW[case])
        return path
    write_sweep(path, data_dir)
    doc = yaml.safe_load(path.read_text())
    key, value = CASES[case]
    if case == "search-grace-not-longer":
        doc["search"]["heartbeat_interval"] = 5
    path.write_text(yaml.safe_dump(_set(doc, key, value), sort_keys=False))
    return path


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    need_shared()
    root = tmp_path_factory.mktemp("tiny")
    for cls in ("cats", "dogs"):
        (root / cls).mkdir()
        for f in sorted((CATS_DOGS / "train" / cls).iterdir())[:8]:
            shutil.copy(f, root / cls / f.name)
    return root


def _nothing_created(tmp_path: Path) -> None:
    for name in ("cache", "optuna.db", "mlflow.db", "mlruns"):
        assert not (tmp_path / name).exists(), name


@pytest.mark.parametrize("case", sorted(CASES) + sorted(RAW))
def test_bad_sweep_extract(tmp_path: Path, tiny_data: Path, case: str):
    sweep = _sweep_variants(tmp_path, tiny_data, case)
    r = run_cli("extract", str(sweep), "-q", cwd=tmp_path)
    assert r.returncode == 2, (r.returncode, r.stdout[-1000:], r.stderr[-3000:])
    _one_error_line(r.stderr)
    _nothing_created(tmp_path)


@pytest.mark.parametrize("case", ["search-n-trials-zero", "invalid-yaml", "backbone-unknown-name"])
def test_bad_sweep_run(tmp_path: Path, tiny_data: Path, case: str):
    sweep = _sweep_variants(tmp_path, tiny_data, case)
    r = run_cli("run", str(sweep), "-q", cwd=tmp_path)
    assert r.returncode == 2, (r.returncode, r.stdout[-1000:], r.stderr[-3000:])
    _one_error_line(r.stderr)
    _nothing_created(tmp_path)
