"""Decoding images with ``tf.data``: header checks, decoding, resizing, augmented views.

Decoding and resizing run in a ``tf.data`` pipeline (:func:`image_batches`), or in chunks that
take turns with the forward pass (:func:`decoded_chunks`). Files that cannot be used are
skipped and reported (:func:`why_skipped`), never fatal once work has started; an image lost
to an I/O error is told apart (:func:`read_failure`). TensorFlow is imported inside the
functions, so importing this module stays cheap.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import struct
import threading
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from ._find import cores

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

    ds = ds.map(load, num_parallel_calls=parallel or cores(), deterministic=True)
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
