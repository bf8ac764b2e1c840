"""``tlsweep audit`` on real photos: planted exact copies, re-encoded and resized copies across
splits and flipped labels are found; a folder without problems reports none; bad flags are
refused with nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import CATS_DOGS, MNV2_WEIGHTS, need_shared, run_cli, write_sweep

MNV2_160 = {
    "name": "MobileNetV2",
    "weights": str(MNV2_WEIGHTS),
    "input_size": 160,
    "pooling": "avg",
    "args": {"alpha": 0.35},
}


def _variant(src: Path, dst: Path, quality: int, scale: float = 1.0) -> None:
    from PIL import Image

    im = Image.open(src).convert("RGB")
    if scale != 1.0:
        im = im.resize((round(im.width * scale), round(im.height * scale)), Image.BILINEAR)
    im.save(dst, "JPEG", quality=quality)


def _plant(src: Path, dst: Path) -> dict[str, Any]:
    """A copy of ``src`` (layout A, cats and dogs) with exact copies, near copies and flipped
    labels planted; what was planted where."""
    shutil.copytree(src, dst)
    cats = sorted(p.name for p in (dst / "train" / "cats").iterdir())
    dogs = sorted(p.name for p in (dst / "train" / "dogs").iterdir())
    exact = [  # (training image, its copy elsewhere)
        (f"train/cats/{cats[0]}", "test/cats/copy-a.jpg"),
        (f"train/dogs/{dogs[0]}", "test/dogs/copy-b.jpg"),
        (f"train/cats/{cats[1]}", "validation/dogs/copy-c.jpg"),  # and filed in another class
    ]
    near = [  # (training image, its re-encoded or resized copy, quality, scale)
        (f"train/cats/{cats[2]}", "test/cats/reenc-a.jpg", 70, 1.0),
        (f"train/dogs/{dogs[2]}", "test/dogs/reenc-b.jpg", 60, 1.0),
        (f"train/cats/{cats[3]}", "test/cats/small-a.jpg", 90, 0.75),
        (f"train/dogs/{dogs[3]}", "validation/dogs/small-b.jpg", 85, 0.6),
    ]
    for a, b in exact:
        shutil.copy(dst / a, dst / b)
    for a, b, q, s in near:
        _variant(dst / a, dst / b, q, s)
    flips = []  # (where it is now, its true class)
    for name in cats[10:13]:
        (dst / "train" / "cats" / name).rename(dst / "train" / "dogs" / name)
        flips.append((f"train/dogs/{name}", "cats"))
    for name in dogs[10:13]:
        (dst / "train" / "dogs" / name).rename(dst / "train" / "cats" / name)
        flips.append((f"train/cats/{name}", "dogs"))
    return {"exact": exact, "near": [(a, b) for a, b, _, _ in near], "flips": flips}


@pytest.fixture(scope="module")
def planted_audit(
    cats_dogs_small: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[dict[str, Any], dict[str, Any], str]:
    """The audit of a planted copy of cats_dogs_small, through the real command line."""
    tmp = tmp_path_factory.mktemp("planted")
    planted = _plant(cats_dogs_small, tmp / "data")
    # 160 px: on 120 labelled photos the heads score about 0.9 there (0.8 at 96 px)
    sweep = write_sweep(tmp / "sweep.yaml", tmp / "data", backbones=[{**MNV2_160}])
    out = run_cli("audit", str(sweep), "--json", str(tmp / "audit.json"), "-q")
    assert out.returncode == 0, out.stderr
    return planted, json.loads((tmp / "audit.json").read_text()), out.stdout


def test_planted_exact_copies_are_found_across_splits_and_classes(planted_audit: Any) -> None:
    planted, report, _ = planted_audit
    groups = report["exact_duplicates"]
    for a, b in planted["exact"]:
        (g,) = [g for g in groups if a in g["files"]]
        assert b in g["files"]
        assert {"train", b.split("/")[0]} <= set(g["splits"])
    (cross,) = [g for g in groups if "validation/dogs/copy-c.jpg" in g["files"]]
    assert cross["classes"] == ["cats", "dogs"]
    # byte-identical pairs are exact duplicates, not reported again as near ones
    exact_pairs = {(a, b) for a, b in planted["exact"]}
    assert not exact_pairs & {(p["a"], p["b"]) for p in report["near_duplicates"]}


def test_planted_reencoded_and_resized_copies_are_near_duplicates(planted_audit: Any) -> None:
    planted, report, _ = planted_audit
    found = {(p["a"], p["b"]): p["similarity"] for p in report["near_duplicates"]}
    for a, b in planted["near"]:
        assert (a, b) in found, f"{b} (a copy of {a}) not found"
        assert report["near_threshold"] <= found[(a, b)] <= 1.0
    # every copy of a training image in the test split is counted as one
    test_copies = set(report["copies_of_train"]["test"])
    planted_test = {b for a, b in planted["exact"] + planted["near"] if b.startswith("test/")}
    assert planted_test <= test_copies


def test_planted_label_flips_rank_near_the_top(planted_audit: Any) -> None:
    planted, report, _ = planted_audit
    issues = {i["file"]: i for i in report["label_issues"]}
    found = [issues[p] for p, _ in planted["flips"] if p in issues]
    # the photos are real: a flipped photo that looks like the other class may pass unnoticed
    assert len(found) >= 2 * len(planted["flips"]) // 3, sorted(issues)
    for path, true_class in planted["flips"]:
        if path in issues:
            assert issues[path]["suggested"] == true_class
            assert issues[path]["given"] != true_class
            assert issues[path]["rank"] <= 2 * len(planted["flips"])
    ranks = [i["rank"] for i in report["label_issues"]]
    scores = [i["score"] for i in report["label_issues"]]
    assert ranks == list(range(1, len(ranks) + 1)) and scores == sorted(scores)


def test_the_console_shows_a_short_summary(planted_audit: Any) -> None:
    planted, report, stdout = planted_audit
    c = report["counts"]
    assert f"exact duplicates: {c['exact_groups']} groups" in stdout
    n_test = len(report["copies_of_train"]["test"])
    assert f"{n_test} test images are copies of training images" in stdout
    assert f"likely label errors: {c['label_issues']}" in stdout
    assert f"#1 {report['label_issues'][0]['file']}" in stdout
    assert len(stdout.splitlines()) < 30


def test_a_folder_without_problems_reports_none(
    cats_dogs_small: Path, flowers_small: Path, tmp_path: Path, cli: Any
) -> None:
    """Cats against dandelions (two sources, no shared photo, labels beyond doubt; the first
    daisies of the shared flowers hold a near copy)."""
    data = tmp_path / "data"
    shutil.copytree(cats_dogs_small / "train" / "cats", data / "cat")
    shutil.copytree(flowers_small / "dandelion", data / "flower")
    sweep = write_sweep(tmp_path / "sweep.yaml", data)
    out = cli("audit", str(sweep), "--json", str(tmp_path / "a.json"), "-q")
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "a.json").read_text())
    assert report["counts"]["images"] == 70
    assert report["exact_duplicates"] == []
    assert report["near_duplicates"] == []
    assert report["label_issues"] == []
    assert report["copies_of_train"] == {"validation": [], "test": []}
    assert "copies of training images" not in out.stdout


def test_bad_flags_are_refused_with_nothing_written(tmp_path: Path, cli: Any) -> None:
    need_shared()
    sweep = write_sweep(tmp_path / "sweep.yaml", CATS_DOGS)
    before = '{"kept": true}'
    (tmp_path / "old.json").write_text(before)
    cases = [
        (["--backbone", "NoSuchNet", "--json", str(tmp_path / "old.json")], "--backbone"),
        (["--json", str(tmp_path)], "--json"),
        (["--json", ""], "--json"),
        (["--json", str(tmp_path / "old.json" / "x.json")], "--json"),
    ]
    for flags, named in cases:
        out = cli("audit", str(sweep), *flags)
        assert out.returncode == 2, (flags, out.stderr)
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("tlsweep: error: "), out.stderr
        assert named in lines[0] and "Traceback" not in out.stderr
    assert (tmp_path / "old.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.json", "sweep.yaml"]


def test_similar_pairs_blockwise_equal_the_full_product() -> None:
    """Small blocks give exactly the pairs of one full product of normalised rows."""
    from tlsweep.audit import similar_pairs

    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 8)).astype(np.float32)
    x[40:45] = x[0:5] * 3 + rng.normal(scale=0.05, size=(5, 8))  # scaled near copies
    a, b = np.arange(0, 30), np.arange(30, 50)
    n = x / np.linalg.norm(x, axis=1, keepdims=True)
    full = n[a] @ n[b].T
    want = {(int(i), int(j)) for i, j in zip(*np.nonzero(full >= 0.9), strict=True)}
    for block in (3, 7, 4096):
        got = similar_pairs(x, a, b, 0.9, block=block)
        assert {(i, j) for i, j, _ in got} == want
        for i, j, s in got:
            assert s == pytest.approx(full[i, j], abs=1e-5)
    assert {(k, 10 + k) for k in range(5)} <= want


def test_the_grid_draws_file_names_with_dollar_signs_as_text(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """matplotlib reads text between two '$' as mathematics: a file named so must not stop the
    grid (and with it `run`)."""
    from types import SimpleNamespace

    from PIL import Image

    from tlsweep.audit import _grid

    for name in ("price$_$a.jpg", "price$_$b.jpg"):
        (tmp_path / "train").mkdir(exist_ok=True)
        Image.new("RGB", (8, 8), "red").save(tmp_path / "train" / name)
    table = {
        "a": ["train/price$_$a.jpg"],
        "b": ["train/price$_$b.jpg"],
        "splits": ["train/test"],
        "classes": ["c$x$/c"],
        "similarity": [0.99],
        "kind": ["near"],
    }
    monkeypatch.setattr(_grid, "copies_table", lambda report: table)
    out = tmp_path / "grid.png"
    assert _grid.copies_grid(SimpleNamespace(data_dir=str(tmp_path)), out)
    assert out.stat().st_size > 0


def test_a_report_that_cannot_be_written_is_one_line_after_the_summary(
    cats_dogs_small: Path, cli: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The audit is done when --json fails to write: the summary is shown, then one line."""
    from tlsweep.audit import AuditReport

    def refuse(self: Any, path: Any) -> None:
        raise FileNotFoundError(2, "No such file or directory", str(path))

    monkeypatch.setattr(AuditReport, "write_json", refuse)
    sweep = write_sweep(tmp_path / "sweep.yaml", cats_dogs_small)
    out = cli("audit", str(sweep), "--json", str(tmp_path / "a.json"), "-q")
    assert out.returncode == 1, out.stderr
    assert "exact duplicates" in out.stdout
    errors = [x for x in out.stderr.splitlines() if x.startswith("tlsweep: error: ")]
    assert len(errors) == 1 and errors[0].startswith("tlsweep: error: --json "), out.stderr
    assert "Traceback" not in out.stderr
