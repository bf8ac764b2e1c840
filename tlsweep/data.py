"""Images: finding them, labelling them, splitting them, and decoding them with ``tf.data``.

Two layouts are understood:

* **A**: ``dir/train``, ``dir/validation`` and optionally ``dir/test``, each with one subfolder
  per class (the classic Keras recipe).
* **B**: one subfolder per class directly under ``dir``; the tool makes a stratified,
  seed-deterministic validation and test split.

Finding images is pure Python and cheap (no TensorFlow import), so a cache hit never pays for
TensorFlow. Decoding and resizing run in a ``tf.data`` pipeline (:func:`image_batches`).
Files that cannot be used are skipped and reported, never fatal once work has started.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import os
import struct
import threading
import time
import uuid
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tlsweep.config import DataConfig
from tlsweep.errors import DataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
SPLITS = ("train", "validation", "test")
# The largest image accepted (pixels); larger ones are skipped as possible decompression bombs.
MAX_PIXELS = 64_000_000
_PIL_FORMATS = {"JPEG", "PNG", "BMP", "GIF", "MPO"}
# How many decoded images image_batches may hold ready ahead of its consumer.
_PREFETCH_IMAGES = 512
# Bytes of decoded, resized float32 images per chunk of decoded_chunks: the first chunk (decoded
# while the consumer builds its model: about 1700 images at 160 px, what one core decodes in
# the second or so that takes) and every later one (about 100 images, small enough to still be
# in the CPU's cache when the forward pass reads them).
FIRST_CHUNK_BYTES = 512 << 20
CHUNK_BYTES = 32 << 20


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


# --- content identity --------------------------------------------------------------------------
def file_digest(path: str) -> str:
    """The SHA-256 of a file's bytes: tlsweep's one file hasher (images and weights files)."""
    # SHA-256 runs on the CPU's SHA instructions where it has them (OpenSSL): on this project's
    # machine 1.5 GB/s against 0.85 for BLAKE2b; with file_digest's reusable buffer and one
    # thread per core, hashing the 4000 cats-vs-dogs photos (180 MB) took 0.27 s instead of 0.4.
    try:
        with open(path, "rb") as f:
            if hasattr(hashlib, "file_digest"):  # Python >= 3.11
                return hashlib.file_digest(f, "sha256").hexdigest()
            h = hashlib.sha256()
            while chunk := f.read(1 << 20):
                h.update(chunk)
            return h.hexdigest()
    except OSError as e:
        return f"unreadable:{e.errno}"


# The stat index: (size, mtime_ns, ctime_ns, inode, device) of a file -> its digest, trusted on a
# later run without reading the file. A file whose last change (mtime or ctime) is less than this
# long before the hashing started is not trusted: a later edit within the same timestamp tick
# (a coarse filesystem clock, FAT's 2 s mtimes, a little clock skew on NFS) could leave every
# stat field unchanged ("racy git"). Such files are read again next time; by then they are old.
RACY_NS = 5_000_000_000
STAT_INDEX_FORMAT = 1
StatKey = tuple[int, int, int, int, int]


def _stat_key(path: str) -> StatKey | None:
    """What must not change for a file's stored digest to stay valid; None if it cannot be
    stat'ed. ctime is set by the kernel on every write, rename or ``utime`` and cannot be
    set back, so a same-size rewrite that restores the mtime (or ``mv`` over the file) shows."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)


def _read_stat_index(index: Path, root: str) -> dict[str, list]:
    """The index's entries for ``root``; empty (everything is hashed) if it is missing, damaged,
    of another format or of another folder. Never raises."""
    try:
        with open(index, "rb") as f:
            raw = json.load(f)
        if (
            raw.get("format") != STAT_INDEX_FORMAT
            or raw.get("algorithm") != "sha256"
            or raw.get("root") != root
            or not isinstance(raw.get("files"), dict)
        ):
            log.debug("%s: stat index of another format or folder; hashing every file", index)
            return {}
        files = raw["files"]
        for v in files.values():
            if not (isinstance(v, list) and len(v) == 6 and isinstance(v[5], str)):
                log.debug("%s: malformed stat index; hashing every file", index)
                return {}
        return files
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, AttributeError) as e:
        log.debug("%s: unreadable stat index (%s); hashing every file", index, e)
        return {}


def _write_stat_index(index: Path, root: str, files: dict[str, list]) -> None:
    """Replace the index atomically (temporary file, fsync, rename); a failure only logs: the
    index saves time, it is never needed."""
    tmp = index.with_name(f".{index.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.part")
    try:
        index.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w") as f:
            json.dump(
                {"format": STAT_INDEX_FORMAT, "algorithm": "sha256", "root": root, "files": files},
                f,
            )
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, index)
    except OSError as e:
        log.warning("%s: cannot write the image stat index (%s); next run hashes again", index, e)
        with contextlib.suppress(OSError):
            tmp.unlink()


def file_digests(
    images: ImageSet,
    index: Path | None = None,
    verify: bool = False,
    workers: int | None = None,
) -> list[str]:
    """The SHA-256 of every file of ``images``, in order.

    With an ``index`` file, a file whose stat (size, mtime, ctime, inode, device) is the one
    recorded there is not read: its recorded digest is used. The others are read and hashed,
    and the index is rewritten if anything changed. ``verify`` reads every file and ignores
    (then rewrites) the index.
    """
    root = os.path.abspath(images.root)
    base = root.rstrip("/") + "/"
    rels = [f.path for f in images.files]
    known = {} if (index is None or verify) else _read_stat_index(index, root)
    started = time.time_ns()
    # Stat before reading: an edit between the two leaves a stat that no longer matches.
    stats = [_stat_key(base + r) for r in rels]
    digests: list[str | None] = []
    todo: list[int] = []
    for i, (rel, st) in enumerate(zip(rels, stats, strict=True)):
        rec = known.get(rel)
        if st is not None and rec is not None and tuple(rec[:5]) == st:
            digests.append(rec[5])
        else:
            digests.append(None)
            todo.append(i)
    if todo:
        log.debug("hashing %d of %d image files", len(todo), len(rels))
        with ThreadPoolExecutor(max_workers=workers or _cores()) as pool:
            paths = [base + rels[i] for i in todo]
            for i, d in zip(todo, pool.map(file_digest, paths, chunksize=64), strict=True):
                digests[i] = d
    elif len(known) == len(rels):
        return digests  # type: ignore[return-value] # every file, and only they, in the index
    if index is not None:
        trusted_before = started - RACY_NS
        files = {
            rel: [*st, d]
            for rel, st, d in zip(rels, stats, digests, strict=True)
            if st is not None
            and not d.startswith("unreadable:")
            and max(st[1], st[2]) < trusted_before
        }
        if files != known:
            _write_stat_index(index, root, files)
    return digests  # type: ignore[return-value]


def content_digest(
    images: ImageSet,
    workers: int | None = None,
    index: Path | None = None,
    verify: bool = False,
) -> str:
    """One hash of every file's bytes, path, label and split: changes when any image does.

    ``index`` and ``verify``: see :func:`file_digests`.
    """
    digests = file_digests(images, index=index, verify=verify, workers=workers)
    h = hashlib.sha256()
    h.update("\x00".join(images.class_names).encode())
    h.update(
        "".join(
            f"{f.path}\x00{f.label}\x00{f.split}\x00{d}\n"
            for f, d in zip(images.files, digests, strict=True)
        ).encode()
    )
    return h.hexdigest()


# --- checking headers before decoding ----------------------------------------------------------
def check_header(path: str) -> str | None:
    """Why ``path`` cannot be used as an image, or None if its header looks fine.

    Reads the header only (Pillow's lazy open): catches empty files, text named ``.jpg``,
    unsupported formats and decompression bombs before TensorFlow allocates anything.
    """
    from PIL import Image

    try:
        if os.path.getsize(path) == 0:
            return "empty file"
        with Image.open(path) as im:
            fmt = im.format
            w, h = im.size
    except Image.DecompressionBombError:
        return "image too large (possible decompression bomb)"
    except OSError as e:
        return (
            f"not a readable image ({e.strerror or type(e).__name__})"
            if e.errno
            else ("not a decodable image")
        )
    except (ValueError, TypeError, SyntaxError, EOFError, struct.error) as e:  # Pillow's own
        return f"not a decodable image ({type(e).__name__})"
    if fmt not in _PIL_FORMATS:
        return f"unsupported format {fmt}"
    if w * h > MAX_PIXELS:
        return f"image too large ({w}x{h} pixels; the limit is {MAX_PIXELS})"
    if w < 1 or h < 1:
        return "image has no pixels"
    return None


def check_headers(paths: Sequence[str], workers: int = 8) -> list[str | None]:
    """:func:`check_header` on many files in parallel."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    with warnings.catch_warnings(), ThreadPoolExecutor(max_workers=workers) as pool:
        # check_header reports images over MAX_PIXELS itself; Pillow's warning adds nothing
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return list(pool.map(check_header, paths, chunksize=64))


# --- decoding with tf.data ---------------------------------------------------------------------
def _header_guard(contents: Any) -> Any:
    """``contents`` unchanged if its header is a JPEG, PNG, GIF or BMP of 1..MAX_PIXELS pixels.

    Otherwise an error, which the pipeline's ``ignore_errors`` turns into a skipped file. The
    same check as :func:`check_header`, but as TensorFlow ops inside the ``tf.data`` pipeline:
    it runs on the decoding threads without the GIL and never reads a file twice, so it adds
    nothing to the time before the first forward pass. Reasons are worked out afterwards, only
    for the files that were skipped (:func:`why_skipped`).
    """
    import tensorflow as tf

    # The first 32 bytes, zero-padded: a short file reads as 0 x 0 pixels instead of failing
    # inside substr (whose error would carry the file's bytes).
    head = tf.strings.join([tf.strings.substr(contents, 0, 32), b"\0" * 32])

    def ints(offset: int, n: int) -> Any:
        raw = tf.io.decode_raw(tf.strings.substr(head, offset, n), tf.uint8)
        return tf.cast(tf.ensure_shape(raw, [n]), tf.int64)

    def le(offset: int, n: int) -> Any:
        return tf.reduce_sum(ints(offset, n) * (256 ** tf.range(n, dtype=tf.int64)))

    def be32(offset: int) -> Any:
        return tf.reduce_sum(ints(offset, 4) * (256 ** tf.range(3, -1, -1, dtype=tf.int64)))

    def signed_abs32(v: Any) -> Any:
        return tf.where(v >= 2**31, 2**32 - v, v)

    def jpeg() -> Any:
        hw = tf.cast(tf.image.extract_jpeg_shape(contents), tf.int64)
        return hw[0] * hw[1]

    branches = [
        jpeg,
        lambda: be32(16) * be32(20),  # PNG: IHDR width, height
        lambda: le(6, 2) * le(8, 2),  # GIF: logical screen width, height
        lambda: signed_abs32(le(18, 4)) * signed_abs32(le(22, 4)),  # BMP: DIB width, height
        lambda: tf.constant(-1, tf.int64),  # anything else
    ]
    head2 = tf.strings.substr(head, 0, 2)
    head4 = tf.strings.substr(head, 0, 4)
    kind = tf.where(
        tf.equal(head2, b"\xff\xd8"),
        0,
        tf.where(
            tf.equal(head4, b"\x89PNG"),
            1,
            tf.where(tf.equal(head4, b"GIF8"), 2, tf.where(tf.equal(head2, b"BM"), 3, 4)),
        ),
    )
    pixels = tf.switch_case(kind, branches)
    ok = tf.logical_and(pixels > 0, pixels <= MAX_PIXELS)
    with tf.control_dependencies([tf.debugging.Assert(ok, ["unusable image header"])]):
        return tf.identity(contents)


def _cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def decode_and_resize(contents: Any, size: int) -> Any:
    """Decode JPEG/PNG/BMP/GIF bytes to RGB and resize to ``size`` x ``size`` (float32 0..255).

    Grayscale and RGBA become RGB; a GIF gives its first frame. The resize is bilinear and
    ignores the aspect ratio, exactly what the exported model's ``Resizing`` layer does.
    """
    return _resize(_decode(contents), size)


def _decode(contents: Any) -> Any:
    import tensorflow as tf

    img = tf.io.decode_image(contents, channels=3, expand_animations=False, dtype=tf.uint8)
    img.set_shape([None, None, 3])
    return img


def _resize(img: Any, size: int) -> Any:
    import tensorflow as tf

    return tf.image.resize(img, [size, size], method="bilinear")


# An augmented variant of the decoded image: (size, views, flip, crop, seed); its batches are
# [batch, views - 1, size, size, 3]: views 1 .. views - 1 (view 0 is the plain image).
ViewsVariant = tuple[int, int, bool, float, int]
Variant = int | ViewsVariant


def path_seeds(paths: Sequence[str]) -> np.ndarray:
    """A seed per image from its path (relative to the data folder): its views do not change
    when other images are added or removed."""
    return np.array(
        [
            int.from_bytes(hashlib.sha256(p.encode()).digest()[:4], "little") & 0x7FFFFFFF
            for p in paths
        ],
        dtype=np.int64,
    )


def augmented_views(img: Any, file_seed: Any, variant: ViewsVariant) -> Any:
    """Views 1 .. views - 1 of a decoded uint8 image, ``[views - 1, size, size, 3]`` float32.

    Each view is a crop keeping a random ``1 - crop`` .. 1 of each side at a random place,
    mirrored left-right with probability 1/2 when ``flip``, then resized as the plain image
    is. The randomness is stateless, from (``seed``, the file's seed, the view's number): the
    same image and settings give bit-identical views in any process.
    """
    import tensorflow as tf

    size, views, flip, crop, seed = variant
    h, w = tf.shape(img)[0], tf.shape(img)[1]
    out = []
    for v in range(1, views):
        s = tf.stack([file_seed, tf.constant((seed % 2**40) * 64 + v, tf.int64)])
        u = tf.random.stateless_uniform([5], seed=s)
        x = img
        if crop > 0:

            def keep(n: Any, r: Any) -> Any:
                kept = tf.round(tf.cast(n, tf.float32) * (1.0 - crop * r))
                return tf.clip_by_value(tf.cast(kept, tf.int32), 1, n)

            hk, wk = keep(h, u[0]), keep(w, u[1])
            oy = tf.minimum(tf.cast(u[2] * tf.cast(h - hk + 1, tf.float32), tf.int32), h - hk)
            ox = tf.minimum(tf.cast(u[3] * tf.cast(w - wk + 1, tf.float32), tf.int32), w - wk)
            x = tf.slice(x, tf.stack([oy, ox, 0]), tf.stack([hk, wk, 3]))
        if flip:
            x = tf.cond(u[4] < 0.5, lambda x=x: tf.reverse(x, [1]), lambda x=x: x)
        out.append(_resize(x, size))
    return tf.stack(out)


def variant_pixels(v: Variant) -> int:
    """Pixels per image of a variant's batch (every view counted)."""
    return v * v if isinstance(v, int) else (v[1] - 1) * v[0] * v[0]


def image_batches(
    paths: Sequence[str],
    size: int | Sequence[Variant],
    batch_size: int,
    parallel: int | None = None,
    prefetch: bool = True,
    seeds: np.ndarray | None = None,
) -> Iterator[tuple[np.ndarray, Any]]:
    """Yield ``(indices, images)`` batches, decoding in parallel with whatever consumes them.

    With several sizes (a sequence), each image is decoded once and resized to each of them:
    ``images`` is then a tuple of batches, one per size, in the order given. A size may be an
    augmented variant (:data:`ViewsVariant`; its batch holds the views, see
    :func:`augmented_views`), which needs ``seeds`` (:func:`path_seeds`), one per path.

    With ``prefetch=False`` decoding runs only while the consumer asks for batches (give or
    take one image per core), so it does not compete with the consumer's own work.

    Files that are not usable images (bad header, too large, corrupt or truncated data) are
    dropped; the caller sees which from the indices that never arrive, and asks
    :func:`why_skipped` for the reasons.
    """
    if not paths:
        return
    import tensorflow as tf

    idx = np.arange(len(paths), dtype=np.int64)
    sizes = (size,) if isinstance(size, int) else tuple(size)
    if seeds is None:
        if any(not isinstance(s, int) for s in sizes):
            raise ValueError("augmented views need a seed per path")
        seeds = np.zeros(len(paths), dtype=np.int64)
    ds = tf.data.Dataset.from_tensor_slices((idx, list(paths), np.asarray(seeds, np.int64)))

    def load(i: Any, p: Any, fs: Any) -> Any:
        img = _decode(_header_guard(tf.io.read_file(p)))
        resized = tuple(
            _resize(img, s) if isinstance(s, int) else augmented_views(img, fs, s) for s in sizes
        )
        return i, resized[0] if isinstance(size, int) else resized

    ds = ds.map(load, num_parallel_calls=parallel or _cores(), deterministic=True)
    ds = ds.ignore_errors(log_warning=False)
    ds = ds.batch(batch_size)
    if prefetch:
        ds = ds.prefetch(max(2, _PREFETCH_IMAGES // batch_size))
    # No autotuning: measured on 2 cores, it made decoding take 1.5 s or 2.5 s for the same
    # 4000 photos from one run to the next, and deleting an autotuned iterator at the end
    # sometimes stalled for 1 to 10 s with every core idle. Fixed parallelism does neither.
    options = tf.data.Options()
    options.autotune.enabled = False
    ds = ds.with_options(options)
    for i, x in ds:
        yield i.numpy(), x


def decoded_chunks(
    paths: Sequence[str],
    size: int | Sequence[int],
    batch_size: int,
    first_bytes: int | None = None,
    chunk_bytes: int | None = None,
    first_until: threading.Event | None = None,
    seeds: np.ndarray | None = None,
) -> Iterator[list[tuple[np.ndarray, Any]]]:
    """:func:`image_batches` in chunks: each chunk is decoded whole, on every core, then handed
    over, and nothing is decoded while the consumer works on it. Several sizes: see
    :func:`image_batches` (the chunk's bytes count every size).

    For a consumer that needs every core itself (a forward pass): decoding and the forward
    pass take turns on all cores instead of competing for them, which on 2 cores is faster
    than overlapping them. Memory stays bounded whatever the number of files. The first chunk
    ends early, after the batch being decoded, once ``first_until`` is set: the consumer is
    ready and should not wait for the rest of it.
    """
    first_bytes = FIRST_CHUNK_BYTES if first_bytes is None else first_bytes
    chunk_bytes = CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    pixels = size * size if isinstance(size, int) else sum(variant_pixels(s) for s in size)
    per_batch = batch_size * pixels * 3 * 4
    batches = image_batches(paths, size, batch_size, prefetch=False, seeds=seeds)
    first: list[tuple[np.ndarray, Any]] = []
    for item in batches:
        first.append(item)
        if len(first) * per_batch >= first_bytes or (first_until and first_until.is_set()):
            break
    if first:
        yield first
    del first
    n = max(1, chunk_bytes // per_batch)
    while chunk := list(itertools.islice(batches, n)):
        yield chunk


def read_failure(path: str, size: int) -> str | None:
    """Why the decoding pipeline lost ``path`` if it was not the image's fault, else None.

    The pipeline drops any file whose reading or decoding fails; this tells an I/O error (the
    file cannot be read now for another reason than its permissions, or it reads and decodes
    now, so the earlier read failed) from a file that is not a usable image (None). A file
    without read permission is the data's own property: it is skipped, with its reason.
    """
    import errno

    import tensorflow as tf

    try:
        with open(path, "rb") as f:
            while f.read(1 << 20):
                pass
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EPERM):
            return None
        return f"cannot be read ({e.strerror or type(e).__name__})"
    try:
        decode_and_resize(_header_guard(tf.io.read_file(path)), size)
    except (tf.errors.InvalidArgumentError, tf.errors.OutOfRangeError):
        return None  # a bad image: the pipeline was right to drop it
    return "could not be read while features were extracted, but reads now"


def why_skipped(paths: Sequence[str]) -> list[str]:
    """The reason each of ``paths`` (files the pipeline dropped) is not a usable image."""
    return [r or "not a decodable image (corrupt or truncated)" for r in check_headers(paths)]
