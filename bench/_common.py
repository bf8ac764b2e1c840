"""What every bench shares: the real data and weights in ../shared, and their flags."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
DEFAULT_DATA = SHARED / "datasets" / "cats_vs_dogs"
DEFAULT_WEIGHTS = (
    SHARED
    / "keras_home"
    / "models"
    / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5"
)
SIZE = 160  # MobileNetV2 input size of every bench
ALPHA = 0.35  # MobileNetV2 width of the shared ImageNet weights


def sweep_text(
    study: str, data: Path, weights: Path, cache: Path, tmp: Path, extra: str = ""
) -> str:
    """A sweep file on MobileNetV2 a0.35 at ``SIZE`` px (avg pooling, the given weights), its
    stores in ``tmp``; ``extra``: more top-level YAML (e.g. a ``search:`` section)."""
    return (
        f"study: {study}\n"
        f"data:\n  dir: {data}\n"
        "backbones:\n"
        f"  - name: MobileNetV2\n    weights: {weights}\n    input_size: {SIZE}\n"
        f"    pooling: avg\n    args: {{alpha: {ALPHA}}}\n"
        f"cache_dir: {cache}\n"
        f"storage: sqlite:///{tmp}/optuna.db\n"
        f"tracking_uri: sqlite:///{tmp}/mlflow.db\n"
    ) + extra


def add_data_args(p: argparse.ArgumentParser, cache: bool = True) -> None:
    """--data, --weights (and --cache-dir) with the ../shared defaults."""
    p.add_argument(
        "--data",
        type=Path,
        default=DEFAULT_DATA.resolve(),
        help="layout-A data folder (train/validation[/test] with class subfolders)",
    )
    p.add_argument(
        "--weights",
        type=Path,
        default=DEFAULT_WEIGHTS.resolve(),
        help="MobileNetV2 alpha=0.35 no-top weights file (.h5)",
    )
    if cache:
        p.add_argument(
            "--cache-dir",
            type=Path,
            default=Path(".tlsweep/cache"),
            help="tlsweep feature cache (default .tlsweep/cache, reused across runs)",
        )


def setup(args: argparse.Namespace) -> tuple[Path, Path]:
    """Quiet logging; the checked (data folder, weights file) of the flags."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=logging.WARNING)
    data, weights = args.data.resolve(), args.weights.resolve()
    if not data.is_dir():
        sys.exit(f"{data}: no such data folder; pass --data")
    if not weights.is_file():
        sys.exit(f"{weights}: no such weights file; pass --weights")
    return data, weights


def mobilenet_v2(weights: Path, pooling: str = "avg") -> Any:
    """The benches' backbone: MobileNetV2 a0.35 at 160 px with the given weights file."""
    from tlsweep.config._schema import BackboneConfig

    return BackboneConfig(
        name="MobileNetV2",
        weights=str(weights),
        input_size=SIZE,
        pooling=pooling,
        args={"alpha": ALPHA},
    )
