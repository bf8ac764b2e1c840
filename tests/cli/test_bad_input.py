"""Hostile inputs: a corpus of broken and odd image files, bad folders, broken sweep files."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import (
    CATS_DOGS,
    TINY,
    CliInProcess,
    need_shared,
    run_cli,
    without_root_powers,
    write_sweep,
)


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
        backbones=TINY,  # the files are the point, not the backbone
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


def test_empty_class_folder_is_an_error(tmp_path: Path, cli: CliInProcess):
    need_shared()
    data = tmp_path / "data"
    (data / "dogs").mkdir(parents=True)
    (data / "cats").mkdir()
    for f in sorted((CATS_DOGS / "train" / "cats").iterdir())[:8]:
        shutil.copy(f, data / "cats" / f.name)
    sweep = write_sweep(tmp_path / "sweep.yaml", data)
    r = cli("extract", str(sweep), "-q")
    assert r.returncode == 2, r.stderr[-3000:]
    _one_error_line(r.stderr)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


@pytest.mark.parametrize("split", ["train", "validation"])
def test_a_split_left_without_usable_images_is_an_error(
    tmp_path: Path, split: str, cli: CliInProcess
):
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
        r = cli(command, str(sweep), "-q")
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


def test_single_class_is_an_error(tmp_path: Path, cli: CliInProcess):
    need_shared()
    data = tmp_path / "data"
    (data / "cats").mkdir(parents=True)
    for f in sorted((CATS_DOGS / "train" / "cats").iterdir())[:8]:
        shutil.copy(f, data / "cats" / f.name)
    sweep = write_sweep(tmp_path / "sweep.yaml", data)
    r = cli("extract", str(sweep), "-q")
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
    "search-grid-float-range": ("search.sampler", "grid"),  # dropout: a range without step
    "search-grid-fewer-points-than-trials": (
        "search",
        {
            "n_trials": 3,
            "sampler": "grid",
            "space": {
                "units": {"choices": [16, 32]},
                "dropout": 0.1,
                "learning_rate": 1e-3,
                "batch_size": 32,
                "epochs": 2,
            },
        },
    ),
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
def test_bad_sweep_extract(tmp_path: Path, tiny_data: Path, case: str, cli: CliInProcess):
    sweep = _sweep_variants(tmp_path, tiny_data, case)
    r = cli("extract", str(sweep), "-q", cwd=tmp_path)
    assert r.returncode == 2, (r.returncode, r.stdout[-1000:], r.stderr[-3000:])
    _one_error_line(r.stderr)
    _nothing_created(tmp_path)


@pytest.mark.parametrize("case", ["search-n-trials-zero", "invalid-yaml", "backbone-unknown-name"])
def test_bad_sweep_run(tmp_path: Path, tiny_data: Path, case: str):
    sweep = _sweep_variants(tmp_path, tiny_data, case)
    r = run_cli("run", str(sweep), "-q", cwd=tmp_path)  # a real process: no traceback there
    assert r.returncode == 2, (r.returncode, r.stdout[-1000:], r.stderr[-3000:])
    _one_error_line(r.stderr)
    _nothing_created(tmp_path)


# --- every command x every flag: a wrong value, a missing path, an unwritable path, "" ---------
# Each case runs the command line in a fresh folder holding a valid sweep file (weights: none,
# so no TensorFlow is needed to refuse it) and asserts: the exit code (2 usage, 1 runtime), one
# `tlsweep: error:` line naming the flag, no traceback, and no file or folder created anywhere in
# that folder. Most cases call the CLI in this process (a traceback there is an exception that
# fails the test); those in REAL_PROCESS run `python -m tlsweep` as a user would. {sweep},
# {data}, {file} (a plain file), {dir} (an empty folder), {ro} (a folder this process may not
# write), {lockedfile} and {lockeddir} (mode 000; run without root's powers),
# {model} (a zip named .keras), {missing}, {port} (a closed TCP port), {newline} and {tab} (names
# with a control character) are filled in per case.
FLAG_CASES: dict[str, tuple[str, int, str]] = {
    # id: (arguments, exit code, text the error line must contain)
    "no-command": ("", 2, "COMMAND"),
    "unknown-command": ("frobnicate", 2, "frobnicate"),
    "unknown-flag": ("run {sweep} --frobnicate", 2, "--frobnicate"),
    "extract-no-sweep": ("extract", 2, "sweep"),
    "extract-missing-sweep": ("extract {missing}.yaml", 2, "no such sweep file"),
    "extract-empty-sweep-path": ("extract ''", 2, "no such sweep file"),
    "extract-sweep-is-folder": ("extract {dir}", 2, "no such sweep file"),
    "extract-sweep-unreadable": ("extract {lockedfile}", 1, "permission denied"),
    "extract-data-unreadable": ("extract {sweep} --data {lockeddir}", 1, "permission denied"),
    "extract-data-missing": ("extract {sweep} --data {missing}", 2, "data.dir"),
    "extract-data-empty": ("extract {sweep} --data ''", 2, "--data"),
    "extract-data-is-file": ("extract {sweep} --data {file}", 2, "data.dir"),
    "extract-cache-empty": ("extract {sweep} --cache-dir ''", 2, "--cache-dir"),
    "extract-cache-is-file": ("extract {sweep} --cache-dir {file}", 2, "cache_dir"),
    "extract-cache-through-file": ("extract {sweep} --cache-dir {file}/c", 2, "cache_dir"),
    "extract-cache-unwritable": ("extract {sweep} --cache-dir {ro}/c", 1, "permission denied"),
    "run-n-trials-zero": ("run {sweep} --n-trials 0", 2, "--n-trials"),
    "run-n-trials-negative": ("run {sweep} --n-trials -3", 2, "--n-trials"),
    "run-n-trials-text": ("run {sweep} --n-trials many", 2, "--n-trials"),
    "run-n-trials-empty": ("run {sweep} --n-trials ''", 2, "--n-trials"),
    "run-workers-zero": ("run {sweep} --workers 0", 2, "--workers"),
    "run-workers-text": ("run {sweep} --workers two", 2, "--workers"),
    "run-workers-huge": ("run {sweep} --workers 100000", 2, "--workers"),
    "run-workers-empty": ("run {sweep} --workers ''", 2, "--workers"),
    "run-study-empty": ("run {sweep} --study ''", 2, "--study"),
    "run-study-blank": ("run {sweep} --study '   '", 2, "--study"),
    "run-study-newline": ("run {sweep} --study {newline}", 2, "--study"),
    "run-study-tab": ("run {sweep} --study {tab}", 2, "--study"),
    "run-study-too-long": ("run {sweep} --study " + "x" * 201, 2, "--study"),
    "run-storage-empty": ("run {sweep} --storage ''", 2, "--storage"),
    "run-storage-scheme": ("run {sweep} --storage bogus://x", 2, "--storage"),
    "run-storage-memory": ("run {sweep} --storage sqlite:///:memory:", 2, "--storage"),
    "run-storage-through-file": ("run {sweep} --storage sqlite:///{file}/o.db", 2, "storage"),
    "run-storage-is-folder": ("run {sweep} --storage sqlite:///{dir}", 2, "storage"),
    "run-storage-unwritable": ("run {sweep} --storage sqlite:///{ro}/o.db", 1, "permission"),
    "run-storage-journal-unwritable": ("run {sweep} --storage journal:{ro}/j.log", 1, "permission"),
    "run-storage-pg-down": (
        "run {sweep} --storage postgresql://me:s3cret-pw@127.0.0.1:{port}/db",
        1,
        "cannot connect",
    ),
    "run-storage-mysql-no-driver": ("run {sweep} --storage mysql://me:s3cret-pw@h/db", 2, "driver"),
    "run-tracking-empty": ("run {sweep} --tracking-uri ''", 2, "--tracking-uri"),
    "run-tracking-scheme": ("run {sweep} --tracking-uri bogus://x", 2, "--tracking-uri"),
    "run-tracking-no-host": ("run {sweep} --tracking-uri http://", 2, "--tracking-uri"),
    "run-tracking-bad-port": ("run {sweep} --tracking-uri http://h:port", 2, "--tracking-uri"),
    "run-tracking-memory": ("run {sweep} --tracking-uri sqlite://", 2, "--tracking-uri"),
    "run-tracking-sqlite-unwritable": (
        "run {sweep} --tracking-uri sqlite:///{ro}/m.db",
        1,
        "permission",
    ),
    "run-tracking-folder-unwritable": ("run {sweep} --tracking-uri {ro}/mlruns", 1, "permission"),
    "run-tracking-pg-down": (
        "run {sweep} --tracking-uri postgresql://me:s3cret-pw@127.0.0.1:{port}/mlflow",
        1,
        "cannot connect",
    ),
    "run-tracking-server-down": (
        "run {sweep} --tracking-uri http://me:s3cret-pw@127.0.0.1:{port}",
        1,
        "not reachable",
    ),
    "run-data-missing": ("run {sweep} --data {missing}", 2, "data.dir"),
    "run-cache-unwritable": ("run {sweep} --cache-dir {ro}/c", 1, "permission denied"),
    "status-no-study": ("status {sweep}", 2, "no study"),
    "status-storage-scheme": ("status {sweep} --storage bogus://x", 2, "--storage"),
    "status-storage-pg-down": (
        "status {sweep} --storage postgresql://me:s3cret-pw@127.0.0.1:{port}/db",
        1,
        "cannot connect",
    ),
    "status-study-empty": ("status {sweep} --study ''", 2, "--study"),
    "best-no-study": ("best {sweep}", 2, "no study"),
    "best-tracking-scheme": ("best {sweep} --tracking-uri bogus://x", 2, "--tracking-uri"),
    "best-storage-empty": ("best {sweep} --storage ''", 2, "--storage"),
    "best-data-missing": ("best {sweep} --data {missing}", 2, "data.dir"),
    "best-tracking-unwritable": ("best {sweep} --tracking-uri sqlite:///{ro}/m", 1, "permission"),
    "status-storage-through-file": ("status {sweep} --storage sqlite:///{file}/o", 2, "no study"),
    "export-study-newline": ("export {sweep} -o m.keras --study {newline}", 2, "--study"),
    "export-no-output": ("export {sweep}", 2, "--output"),
    "export-output-empty": ("export {sweep} -o ''", 2, "--output"),
    "export-output-not-keras": ("export {sweep} -o model.h5", 2, ".keras"),
    "export-output-is-folder": ("export {sweep} -o {dir}", 2, ".keras"),
    "export-output-through-file": ("export {sweep} -o {file}/m.keras", 2, "--output"),
    "export-output-unwritable": ("export {sweep} -o {ro}/m.keras", 1, "permission denied"),
    "export-no-study": ("export {sweep} -o out/m.keras", 2, "no study"),
    "predict-no-paths": ("predict {model}", 2, "paths"),
    "predict-model-missing": ("predict {missing}.keras {data}", 2, "MODEL"),
    "predict-model-empty": ("predict '' {data}", 2, "MODEL"),
    "predict-model-folder": ("predict {dir} {data}", 2, "MODEL"),
    "predict-model-not-zip": ("predict {file} {data}", 2, "MODEL"),
    "predict-path-missing": ("predict {model} {missing}", 2, "no such file or folder"),
    "predict-path-no-images": ("predict {model} {dir}", 2, "no image file"),
    "predict-batch-zero": ("predict {model} {data} --batch-size 0", 2, "--batch-size"),
    "predict-batch-negative": ("predict {model} {data} --batch-size -1", 2, "--batch-size"),
    "predict-batch-text": ("predict {model} {data} --batch-size big", 2, "--batch-size"),
    "predict-csv-empty": ("predict {model} {data} --csv ''", 2, "--csv"),
    "predict-csv-is-folder": ("predict {model} {data} --csv {dir}", 2, "--csv"),
    "predict-csv-through-file": ("predict {model} {data} --csv {file}/x.csv", 2, "--csv"),
    "predict-csv-unwritable": ("predict {model} {data} --csv {ro}/x.csv", 1, "permission"),
    "backbones-extra-argument": ("backbones ResNet50", 2, "ResNet50"),
    "cache-no-action": ("cache", 2, "action"),
    "cache-bad-action": ("cache purge", 2, "purge"),
    "cache-missing-sweep": ("cache list {missing}.yaml", 2, "no such sweep file"),
    "cache-dir-empty": ("cache list --cache-dir ''", 2, "--cache-dir"),
    "cache-dir-is-file": ("cache list --cache-dir {file}", 2, "--cache-dir"),
    "cache-match-empty": ("cache clear --match ''", 2, "--match"),
    "cache-clear-unwritable": ("cache clear --cache-dir {ro}", 1, "permission denied"),
}


# A real process for the files this process may not read or write (as root, only a process
# started without root's powers meets them as a user would: these cover every command), and for
# argparse's refusal, a tracking server that is down and a file that is not a model.
_LOCKED = ("{ro}", "{lockedfile}", "{lockeddir}")
REAL_PROCESS = {c for c, (args, _, _) in FLAG_CASES.items() if any(k in args for k in _LOCKED)}
REAL_PROCESS |= {"no-command", "run-tracking-server-down", "predict-model-not-zip"}


def _closed_port() -> int:
    import socket

    with socket.socket() as s:  # bound, never listening: connecting is refused at once
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("case", sorted(FLAG_CASES))
def test_bad_flag(tmp_path: Path, case: str, cli: CliInProcess):
    import shlex
    import zipfile

    args, code, needle = FLAG_CASES[case]
    (tmp_path / "data" / "cats").mkdir(parents=True)
    (tmp_path / "data" / "dogs").mkdir()
    (tmp_path / "a-file").write_text("not a folder\n")
    (tmp_path / "a-folder").mkdir()
    ro = tmp_path / "read-only"
    (ro / "entry").mkdir(parents=True)  # something for `cache clear` to (fail to) remove
    locked_dir = tmp_path / "locked-folder"
    (locked_dir / "cats").mkdir(parents=True)
    (locked_dir / "dogs").mkdir()
    with zipfile.ZipFile(tmp_path / "model.keras", "w") as z:
        z.writestr("config.json", "{}")
    sweep = write_sweep(
        tmp_path / "sweep.yaml",
        tmp_path / "data",
        backbones=[{"name": "MobileNetV2", "weights": "none", "input_size": 96}],
    )
    fill = {
        "sweep": sweep,
        "data": tmp_path / "data",
        "file": tmp_path / "a-file",
        "dir": tmp_path / "a-folder",
        "ro": ro,
        "lockedfile": tmp_path / "locked.yaml",
        "lockeddir": locked_dir,
        "model": tmp_path / "model.keras",
        "missing": tmp_path / "missing",
        "port": _closed_port(),
        "newline": "a\nb",
        "tab": "a\tb",
    }
    argv = shlex.split(args.format(**{k: shlex.quote(str(v)) for k, v in fill.items()}))
    locked_file = tmp_path / "locked.yaml"
    locked_file.write_text(sweep.read_text())
    before = _tree(tmp_path)
    ro.chmod(0o555)
    locked_file.chmod(0)
    locked_dir.chmod(0)
    try:
        if case in REAL_PROCESS:
            r = run_cli(*argv, cwd=tmp_path, timeout=120, wrap=without_root_powers())
        else:
            r = cli(*argv, cwd=tmp_path)
    finally:
        ro.chmod(0o755)
        locked_file.chmod(0o644)
        locked_dir.chmod(0o755)
    assert r.returncode == code, (r.returncode, r.stdout[-1000:], r.stderr[-3000:])
    _one_error_line(r.stderr)
    error = next(x for x in r.stderr.splitlines() if x.startswith("tlsweep: error:"))
    assert needle.lower() in error.lower(), error
    assert "s3cret-pw" not in r.stderr + r.stdout  # a password is never printed
    assert _tree(tmp_path) == before, sorted(_tree(tmp_path) ^ before)


# --- names in any script, end to end ------------------------------------------------------------
UNICODE_CLASSES = ("chats été", "כלבים dogs", "犬 いぬ")
UNICODE_FILES = ("photo été {i}.jpg", "صورة {i}.jpg", "\u202eevil {i}.jpg", "emoji 🐱 {i}.jpg")


def test_unicode_class_and_file_names_end_to_end(tmp_path: Path, cli: CliInProcess):
    """Class folders and files named in any script (accents, RTL, an RTL override, CJK, emoji,
    spaces): extract, run, export and predict keep every name as it is."""
    import csv

    from tlsweep.winner._export import read_metadata

    need_shared()
    data = tmp_path / "données ☃"
    photos = sorted((CATS_DOGS / "train" / "cats").iterdir())
    k = 0
    for split, n in (("train", 8), ("validation", 4), ("test", 4)):
        for cls in UNICODE_CLASSES:
            d = data / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                shutil.copy(photos[k], d / UNICODE_FILES[i % len(UNICODE_FILES)].format(i=i))
                k += 1
    search = {
        "n_trials": 2,
        "sampler": "random",
        "pruner": "none",
        "space": {
            "units": {"low": 8, "high": 16},
            "dropout": {"low": 0.0, "high": 0.1},
            "learning_rate": {"low": 1e-3, "high": 1e-2, "log": True},
            "batch_size": {"choices": [16]},
            "epochs": 2,
        },
    }
    sweep = write_sweep(
        tmp_path / "sweep.yaml", data, study="étude ⚗", backbones=TINY, search=search
    )
    r = cli("run", str(sweep), "-q")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "skipped" not in r.stderr.replace("0 skipped", "")
    r = cli("status", str(sweep))
    assert r.returncode == 0 and "étude ⚗" in r.stdout + r.stderr, r.stdout + r.stderr
    model = tmp_path / "modèle ✓" / "m.keras"
    r = cli("export", str(sweep), "-o", str(model))
    assert r.returncode == 0, r.stderr[-3000:]
    assert set(read_metadata(model)["class_names"]) == set(UNICODE_CLASSES)
    for cls in UNICODE_CLASSES:
        assert cls in r.stdout  # the test report names each class
    rows_csv = tmp_path / "prédictions.csv"
    r = cli("predict", str(model), str(data / "test"), "--csv", str(rows_csv))
    assert r.returncode == 0, r.stderr[-3000:]
    with open(rows_csv, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    expected = sorted(str(p) for p in (data / "test").rglob("*.jpg"))
    assert sorted(row["file"] for row in rows) == expected
    assert {row["class"] for row in rows} <= set(UNICODE_CLASSES)
    r = run_cli("predict", str(model), str(data / "test" / UNICODE_CLASSES[1]))  # printed too
    assert r.returncode == 0, r.stderr[-3000:]
    for name in sorted((data / "test" / UNICODE_CLASSES[1]).iterdir()):
        assert name.name in r.stdout
