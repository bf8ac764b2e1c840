"""What an image folder holds, for ``tlsweep init``: its layout, classes and their counts, the
typical image size and the files that are not readable images (counted, not fatal).

Reads file headers only (Pillow's lazy open), never decodes a whole image, and never imports
TensorFlow: a survey of a few thousand photos takes about a second.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

from tlsweep.config import DataConfig
from tlsweep.errors import DataError

from ._decode import check_headers
from ._find import find_images

SIZE_SAMPLE = 200  # readable images whose size is read to find the typical one


@dataclass
class Survey:
    """What a data folder holds."""

    root: Path
    layout: str  # "A" (train/validation[/test]) or "B" (one folder per class)
    class_names: list[str]
    counts: dict[str, int]  # readable images per class, all splits
    split_counts: dict[str, int]  # readable images per split (layout B: as tlsweep splits it)
    typical_size: tuple[int, int]  # median (width, height) of a sample
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (relative path, reason)
    image_paths: list[Path] = field(default_factory=list)  # the readable images

    @property
    def imbalance(self) -> float:
        """How many times the largest class outnumbers the smallest."""
        return max(self.counts.values()) / max(1, min(self.counts.values()))


def survey(data_dir: str | Path) -> Survey:
    """Look at ``data_dir``: layout, classes, counts, typical size, unreadable files.

    Raises :class:`~tlsweep.errors.DataError` (one line, naming the fix) for a missing or empty
    folder, a single class, or a folder without one readable image.
    """
    from PIL import Image

    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder; give the folder that holds your images")
    images = find_images(DataConfig(dir=root))  # layout B: split as a sweep file's defaults
    paths = [images.abspath(f) for f in images.files]
    reasons = check_headers(paths)
    good = [(f, p) for f, p, why in zip(images.files, paths, reasons, strict=True) if why is None]
    unreadable = [
        (f.path, why) for f, why in zip(images.files, reasons, strict=True) if why is not None
    ]
    if not good:
        raise DataError(
            f"{root}: none of its {len(paths)} image file(s) is a readable image; "
            "add .jpg/.png photos, one folder per class"
        )
    counts = {c: 0 for c in images.class_names}
    splits: dict[str, int] = {}
    for f, _ in good:
        counts[images.class_names[f.label]] += 1
        splits[f.split] = splits.get(f.split, 0) + 1
    empty = [c for c, n in counts.items() if n == 0]
    if empty:
        raise DataError(
            f"{root}: class folder(s) {', '.join(empty)} hold no readable image; "
            "add photos there or remove the folder"
        )
    sizes: list[tuple[int, int]] = []
    step = max(1, len(good) // SIZE_SAMPLE)
    for _, p in good[::step]:
        with Image.open(p) as im:  # the header only
            sizes.append(im.size)
    return Survey(
        root=root,
        layout=images.layout,
        class_names=list(images.class_names),
        counts=counts,
        split_counts={s: splits.get(s, 0) for s in ("train", "validation", "test")},
        typical_size=(
            int(statistics.median(s[0] for s in sizes)),
            int(statistics.median(s[1] for s in sizes)),
        ),
        unreadable=unreadable,
        image_paths=[Path(p) for _, p in good],
    )
