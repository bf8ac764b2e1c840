"""Images: finding them, labelling them and splitting them.

Two layouts are understood:

* **A**: ``dir/train``, ``dir/validation`` and optionally ``dir/test``, each with one subfolder
  per class (the classic Keras recipe).
* **B**: one subfolder per class directly under ``dir``; the tool makes a stratified,
  seed-deterministic validation and test split.

Finding images is pure Python and cheap (no TensorFlow import), so a cache hit never pays for
TensorFlow. Their content identity (the digests behind a cache key) is
:mod:`tlsweep.images._digests`; decoding and resizing them with ``tf.data`` is
:mod:`tlsweep.images._decode`.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tlsweep.config import DataConfig
from tlsweep.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class ImageFile:
    """One image: its path relative to the data folder, its class and its split."""

    path: str  # relative to the data folder, with forward slashes
    label: int
    split: str


@dataclass
class ImageSet:
    """Every candidate image of a data folder, labelled and split."""

    root: Path
    layout: str  # "A" or "B"
    class_names: list[str]
    files: list[ImageFile]
    ignored: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): not images

    def split_counts(self) -> dict[str, int]:
        return {s: sum(f.split == s for f in self.files) for s in SPLITS}

    def abspath(self, f: ImageFile) -> str:
        return os.path.join(self.root, f.path)  # not Path's /: called for every file, twice


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name.startswith("__MACOSX")


def _list_class_folder(root: Path, folder: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """Image files under ``folder`` (recursively), relative to ``root``, sorted; and the rest."""
    images: list[str] = []
    ignored: list[tuple[str, str]] = []
    seen_dirs: set[tuple[int, int]] = set()

    def walk(d: Path) -> None:
        try:
            st = d.stat()
        except OSError as e:
            ignored.append((d.relative_to(root).as_posix(), f"unreadable folder ({e.strerror})"))
            return
        key = (st.st_dev, st.st_ino)
        if key in seen_dirs:  # a symlink loop
            ignored.append((d.relative_to(root).as_posix(), "symlink loop"))
            return
        seen_dirs.add(key)
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError as e:
            ignored.append((d.relative_to(root).as_posix(), f"unreadable folder ({e.strerror})"))
            return
        prefix = d.relative_to(root).as_posix() + "/"  # once per folder: pathlib is slow
        for e in entries:
            if _is_hidden(e.name):
                continue
            rel = prefix + e.name
            try:
                is_dir = e.is_dir()
                is_file = e.is_file()
            except OSError as err:
                ignored.append((rel, f"cannot stat ({err.strerror})"))
                continue
            if is_dir:
                walk(d / e.name)
            elif is_file:
                if e.name.lower().endswith(IMAGE_EXTENSIONS):
                    images.append(rel)
                else:
                    ignored.append((rel, "not an image file extension"))
            else:
                reason = "broken symlink or symlink loop" if e.is_symlink() else "not a file"
                ignored.append((rel, reason))

    walk(folder)
    return images, ignored


def _class_folders(where: Path) -> list[Path]:
    try:
        return sorted(p for p in where.iterdir() if not _is_hidden(p.name) and p.is_dir())
    except OSError as e:
        raise DataError(f"{where}: cannot read the folder ({e.strerror})") from None


def find_images(cfg: DataConfig) -> ImageSet:
    """Find, label and split every image under ``cfg.dir``; refuse unusable folders."""
    root = Path(cfg.dir)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder; fix data.dir in the sweep file or pass --data")
    has_splits = [s for s in SPLITS if (root / s).is_dir()]
    if has_splits:
        return _layout_a(root, has_splits)
    return _layout_b(root, cfg)


def _collect(root: Path, folder: Path, what: str) -> dict[str, tuple[list[str], list]]:
    classes = _class_folders(folder)
    if not classes:
        raise DataError(
            f"{folder}: no class folders in {what}; put each class's images in its own subfolder"
        )
    out = {}
    for c in classes:
        images, ignored = _list_class_folder(root, c)
        out[c.name] = (images, ignored)
    return out


def _check_classes(found: dict[str, tuple[list[str], list]], folder: Path) -> None:
    for name, (images, _) in found.items():
        if not images:
            raise DataError(
                f"{folder / name}: empty class folder (no .jpg/.jpeg/.png/.bmp/.gif files); "
                "add images or remove the folder"
            )
    if len(found) < 2:
        raise DataError(
            f"{folder}: only one class ({', '.join(found)}); a classifier needs at least two "
            "class subfolders"
        )


def _layout_a(root: Path, present: list[str]) -> ImageSet:
    for needed in ("train", "validation"):
        if needed not in present:
            raise DataError(
                f"{root}: has {'/'.join(present)} but no '{needed}' folder; layout A needs "
                "train/ and validation/ (test/ optional), or use one folder per class (layout B)"
            )
    per_split = {s: _collect(root, root / s, f"{s}/") for s in present}
    class_names = sorted(per_split["train"])
    _check_classes(per_split["train"], root / "train")
    for s in present:
        if s == "train":
            continue
        extra = sorted(set(per_split[s]) - set(class_names))
        if extra:
            raise DataError(
                f"{root / s}: class folder(s) {', '.join(extra)} not in train/; "
                f"the classes are {', '.join(class_names)}"
            )
        for name, (images, _) in per_split[s].items():
            if not images:
                raise DataError(f"{root / s / name}: empty class folder; add images or remove it")
    files: list[ImageFile] = []
    ignored: list[tuple[str, str]] = []
    for s in present:
        for name, (images, ign) in per_split[s].items():
            label = class_names.index(name)
            files.extend(ImageFile(p, label, s) for p in images)
            ignored.extend(ign)
    return ImageSet(root=root, layout="A", class_names=class_names, files=files, ignored=ignored)


def _layout_b(root: Path, cfg: DataConfig) -> ImageSet:
    found = _collect(root, root, "the data folder")
    _check_classes(found, root)
    class_names = sorted(found)
    files: list[ImageFile] = []
    ignored: list[tuple[str, str]] = []
    for label, name in enumerate(class_names):
        images, ign = found[name]
        ignored.extend(ign)
        # One generator per class, from the seed and the class name: adding or removing an image
        # in one class never reshuffles another (a shared generator would shift for every later
        # class).
        class_seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
        order = np.random.default_rng([cfg.seed, class_seed]).permutation(len(images))
        n = len(images)
        n_test = int(round(n * cfg.test_split))
        n_val = int(round(n * cfg.validation_split))
        if n - n_test - n_val < 1 or (cfg.validation_split > 0 and n_val < 1):
            raise DataError(
                f"{root / name}: {n} image(s) are too few to split into train/validation/test "
                f"({cfg.validation_split:g}/{cfg.test_split:g}); add images or lower the splits"
            )
        for rank, i in enumerate(order):
            split = "test" if rank < n_test else "validation" if rank < n_test + n_val else "train"
            files.append(ImageFile(images[i], label, split))
    files.sort(key=lambda f: f.path)
    return ImageSet(root=root, layout="B", class_names=class_names, files=files, ignored=ignored)


def cores() -> int:
    """The cores this process may run on (its affinity), for its thread pools."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
