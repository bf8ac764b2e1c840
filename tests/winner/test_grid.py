"""The winner's misclassified test images as a grid: the most confident mistakes first."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from tlsweep.winner._rebuild import misclassified_grid


def _images(root: Path, n: int) -> list[str]:
    (root / "test").mkdir(parents=True)
    paths = []
    for i in range(n):
        name = f"test/img${i}$.png"  # matplotlib's mathematics markers: drawn as text
        Image.new("RGB", (16, 16), (i * 40 % 256, 0, 0)).save(root / name)
        paths.append(name)
    return paths


def test_a_grid_of_the_mistakes_only_and_none_without_mistakes(tmp_path: Path) -> None:
    paths = _images(tmp_path, 5)
    labels = np.array([0, 1, 2, 0, 1])
    proba = np.array(
        [
            [0.9, 0.05, 0.05],  # right
            [0.7, 0.2, 0.1],  # wrong, 0.7 sure
            [0.05, 0.9, 0.05],  # wrong, 0.9 sure
            [0.8, 0.1, 0.1],  # right
            [0.1, 0.8, 0.1],  # right
        ]
    )
    out = tmp_path / "grid.png"
    assert misclassified_grid(tmp_path, paths, labels, proba, ["a", "b", "c"], out)
    with Image.open(out) as im:
        w, h = im.size
    assert w > h  # two mistakes side by side in one row
    assert not misclassified_grid(
        tmp_path, paths, labels, np.eye(3)[labels], ["a", "b", "c"], tmp_path / "none.png"
    )
    assert not (tmp_path / "none.png").exists()


def test_two_classes_as_one_sigmoid_output(tmp_path: Path) -> None:
    paths = _images(tmp_path, 3)
    out = tmp_path / "grid.png"
    assert misclassified_grid(
        tmp_path, paths, np.array([0, 1, 1]), np.array([0.2, 0.1, 0.9]), ["x", "y"], out
    )
