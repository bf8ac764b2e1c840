"""Predictions of an exported model (:mod:`tlsweep.winner._export`) on image files and folders.

Images are decoded and resized with the same code as the sweep's (:mod:`tlsweep.images`); the
class names come from the model file's metadata. Files that cannot be read are reported with a
reason, never silently dropped.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

from tlsweep.config import DEFAULT_PREDICT_BATCH
from tlsweep.errors import TlsweepError

from ._export import read_metadata


def find_files(paths: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Image files from files and folders (recursively); and the paths that are not usable."""
    from tlsweep.images import IMAGE_EXTENSIONS

    files: list[str] = []
    bad: list[tuple[str, str]] = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            for root, dirs, names in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for n in sorted(names):
                    if n.startswith("."):
                        continue
                    f = os.path.join(root, n)
                    if n.lower().endswith(IMAGE_EXTENSIONS):
                        files.append(f)
                    else:
                        bad.append((f, "not an image file extension"))
        elif path.is_file():
            files.append(str(path))
        else:
            bad.append((str(path), "no such file or folder"))
    return files, bad


def predict(
    model_path: str | Path, paths: list[str], batch_size: int = DEFAULT_PREDICT_BATCH
) -> tuple[list[dict], list[tuple[str, str]], list[str]]:
    """(rows of file/class/probability, unusable files with reasons, class names)."""
    import keras

    from tlsweep.images import image_batches, why_skipped

    model_path = Path(model_path)
    if not model_path.is_file():
        raise TlsweepError(f"{model_path}: no such model file; create one with 'tlsweep export'")
    try:
        model = keras.models.load_model(model_path, safe_mode=True, compile=False)
    except (ValueError, OSError, KeyError, TypeError, zipfile.BadZipFile) as e:
        raise TlsweepError(
            f"MODEL: {model_path}: not a loadable Keras model ({type(e).__name__}: damaged or "
            "cut short); expected a file from 'tlsweep export' (export it again)"
        ) from None
    meta = read_metadata(model_path)
    n_out = int(model.output_shape[-1])
    names = meta.get("class_names") or [str(i) for i in range(n_out)]
    # Batches are made at the model's (largest) input size; the model resizes them again.
    sizes = [
        int(layer.get_config()["height"])
        for layer in model.layers
        if layer.name == "resize" or layer.name.startswith("resize_")
    ]
    size = max(sizes) if sizes else 224
    files, bad = find_files(paths)
    ok = files
    rows: list[dict] = []
    seen = np.zeros(len(ok), dtype=bool)
    for idx, batch in image_batches(ok, size, batch_size):
        proba = np.asarray(model.predict_on_batch(batch))
        for i, pr in zip(idx, proba, strict=True):
            seen[i] = True
            k = int(pr.argmax())
            rows.append(
                {
                    "file": ok[i],
                    "class": names[k],
                    "probability": float(pr[k]),
                    **{f"p_{n}": float(v) for n, v in zip(names, pr, strict=True)},
                }
            )
    unseen = [ok[i] for i in np.flatnonzero(~seen)]
    bad += list(zip(unseen, why_skipped(unseen), strict=True))
    rows.sort(key=lambda r: r["file"])
    return rows, bad, names
