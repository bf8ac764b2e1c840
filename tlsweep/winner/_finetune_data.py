"""What the fine-tuning stage trains on: images decoded once, batches.

Speed: every usable image is decoded and resized once, at the model's input size, into a
``uint8`` memory-mapped array in the cache folder (:func:`image_cache`); epochs read batches
from it (:func:`dataset`) and never decode a JPEG again. The configured augmentation is Keras
preprocessing layers applied to the training batches (:func:`augmentation`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tlsweep.config import FinetuneConfig
from tlsweep.errors import TlsweepError
from tlsweep.files import held_lock

if TYPE_CHECKING:
    from tlsweep.features import CachedEntry

log = logging.getLogger(__name__)

IMAGE_FORMAT = 1


def image_size(bb: Any) -> int:
    """The size images are decoded at: the input size (a fused backbone's largest)."""
    return max(m.input_size for m in bb.members) if bb.members else bb.input_size


def _images_digest(entry: CachedEntry) -> str:
    members = getattr(entry, "members", None) or [entry]
    return members[0].manifest["key_parts"]["images"]


def _read_images(folder: Path, key: str, shape: tuple[int, ...]) -> np.ndarray | None:
    """The finished image array in ``folder`` if it is the one for ``key``, else None."""
    with contextlib.suppress(OSError, ValueError):
        if json.loads((folder / "manifest.json").read_text()).get("key") == key:
            arr = np.load(folder / "images.npy", mmap_mode="r", allow_pickle=False)
            if arr.shape == shape:
                return arr
    return None


def image_cache(cache_dir: Path, entry: CachedEntry, size: int) -> tuple[np.ndarray, list[dict]]:
    """Every usable file of ``entry`` decoded and resized to ``size`` once, uint8, memory-mapped.

    Returns (images [files, size, size, 3], the entry's file records, in the same order).
    The key holds TensorFlow's version (it decodes and resizes). One process at a time makes a
    folder (a ``flock``; another waits, then reads it); it is written under a temporary name
    and renamed, and a folder that verifies is never deleted or replaced.
    """
    import tensorflow as tf

    from tlsweep.images import image_batches

    files = entry.manifest["files"]
    root = Path(entry.manifest["data_dir"])
    parts = {
        "format": IMAGE_FORMAT,
        "images": _images_digest(entry),
        "files": [(f["path"], f["label"], f["split"]) for f in files],
        "size": size,
        "resize": "bilinear-squash",
        "tensorflow": tf.__version__,
    }
    key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    folder = Path(cache_dir) / "images" / f"{size}px-{key[:16]}"
    shape = (len(files), size, size, 3)
    arr = _read_images(folder, key, shape)
    if arr is not None:
        return arr, files
    folder.parent.mkdir(parents=True, exist_ok=True)
    with held_lock(folder.with_name(folder.name + ".lock"), f"decoding images into {folder}"):
        arr = _read_images(folder, key, shape)  # made by the process we waited for
        if arr is not None:
            return arr, files
        for stale in folder.parent.glob(f"{folder.name}.tmp-*"):  # left by a killed process
            shutil.rmtree(stale, ignore_errors=True)
        _decode_into(folder, key, size, [str(root / f["path"]) for f in files], image_batches)
    log.info("decoded %d images once at %d px into %s", len(files), size, folder)
    arr = _read_images(folder, key, shape)
    if arr is None:
        raise TlsweepError(f"{folder}: the decoded images do not read back; run again")
    return arr, files


def _decode_into(folder: Path, key: str, size: int, paths: list[str], batches: Any) -> None:
    """Decode ``paths`` into a temporary folder, then rename it to ``folder`` (a folder there,
    which did not verify, is moved aside first and deleted only after)."""
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        t0 = time.perf_counter()
        arr = np.lib.format.open_memmap(
            tmp / "images.npy", mode="w+", dtype=np.uint8, shape=(len(paths), size, size, 3)
        )
        got = np.zeros(len(paths), dtype=bool)
        for idx, batch in batches(paths, size, 64):
            arr[idx] = np.clip(np.rint(batch.numpy()), 0, 255).astype(np.uint8)
            got[idx] = True
        if not got.all():
            bad = paths[int(np.flatnonzero(~got)[0])]
            raise TlsweepError(f"{bad}: no longer decodable; it was usable when features were made")
        arr.flush()
        del arr
        (tmp / "manifest.json").write_text(
            json.dumps(
                {"key": key, "size": size, "n": len(paths), "seconds": time.perf_counter() - t0}
            )
        )
        aside = None
        if folder.exists():
            aside = folder.with_name(f"{folder.name}.tmp-old-{uuid.uuid4().hex[:8]}")
            os.rename(folder, aside)
        os.rename(tmp, folder)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def augmentation(ft: FinetuneConfig, seed: int) -> Any | None:
    """The configured Keras preprocessing layers, or None when there are none."""
    import keras

    a = ft.augment
    layers = []
    if a.flip:
        layers.append(keras.layers.RandomFlip("horizontal", seed=seed))
    if a.rotation:
        layers.append(keras.layers.RandomRotation(a.rotation, seed=seed + 1))
    if a.zoom:
        layers.append(keras.layers.RandomZoom(a.zoom, seed=seed + 2))
    if a.contrast:
        layers.append(keras.layers.RandomContrast(a.contrast, value_range=(0, 255), seed=seed + 3))
    return keras.Sequential(layers, name="augment") if layers else None


def dataset(
    images: np.ndarray,
    labels: np.ndarray,
    rows: np.ndarray,
    batch_size: int,
    *,
    shuffle_seed: int | None = None,
    augment: Any | None = None,
    onehot: int | None = None,
) -> Any:
    """Batches read from the memory-mapped uint8 images (shuffled per epoch by a seed);
    ``onehot``: labels as one-hot vectors of that many classes (for a smoothed loss)."""
    import tensorflow as tf

    order = rows.copy()
    if shuffle_seed is not None:
        np.random.default_rng(shuffle_seed).shuffle(order)
    starts = np.arange(0, len(order), batch_size, dtype=np.int64)
    size = images.shape[1]

    def gather(start: np.int64) -> tuple[np.ndarray, np.ndarray]:
        idx = order[int(start) : int(start) + batch_size]
        sort = np.argsort(idx)  # memory-map reads in file order, then back to batch order
        x = np.empty((len(idx), size, size, 3), np.uint8)
        x[sort] = images[idx[sort]]
        return x, labels[idx]

    ds = tf.data.Dataset.from_tensor_slices(starts)
    ds = ds.map(
        lambda s: tf.numpy_function(gather, [s], (tf.uint8, tf.int64)),
        num_parallel_calls=2,
        deterministic=True,
    )

    def cast(x: Any, y: Any) -> tuple[Any, Any]:
        x = tf.cast(tf.ensure_shape(x, [None, size, size, 3]), tf.float32)
        if augment is not None:
            x = augment(x, training=True)
        y = tf.ensure_shape(y, [None])
        return x, (y if onehot is None else tf.one_hot(y, onehot))

    return ds.map(cast).prefetch(2)
