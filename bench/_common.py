"""What every bench shares: the real data and weights in ../shared, and their flags."""

from __future__ import annotations

import argparse
from pathlib import Path

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
