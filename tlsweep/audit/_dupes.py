"""Exact duplicates (same bytes: the SHA-256 digests behind the cache key) and near-duplicates
across splits (cosine similarity of cached features, computed block by block)."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# Measured by bench/audit_threshold.py (MobileNetV2 a0.35, 96 px, avg; 150 photos of each shared
# dataset, each copied six ways -- JPEG quality 60/75/90, resized 0.5x/0.75x/1.5x -- among 450):
# at 0.92 a copy is found 98.1% (flowers) and 95.8% (cats_vs_dogs) of the time, and no copy has
# a different photo that close (the closest different photo: at most 0.920 on flowers, whose
# photos are small and alike, p99 0.893; at most 0.808 on cats_vs_dogs). Halving a photo's size
# is the copy most often missed (cats_vs_dogs at 0.5x: 5th percentile 0.866).
NEAR_THRESHOLD = 0.92
BLOCK_ROWS = 4096  # rows per block of the similarity products: 4096 x 4096 float32 = 64 MB


def exact_duplicates(
    files: Sequence[Any], digests: Sequence[str], class_names: Sequence[str]
) -> list[dict[str, Any]]:
    """Groups of two or more files with the same bytes: ``{files, splits, classes}`` each,
    files in path order, groups by their first file."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, d in enumerate(digests):
        if not d.startswith("unreadable:"):
            groups[d].append(i)
    out = []
    for idx in groups.values():
        if len(idx) < 2:
            continue
        members = sorted((files[i] for i in idx), key=lambda f: f.path)
        out.append(
            {
                "files": [f.path for f in members],
                "splits": sorted({f.split for f in members}),
                "classes": sorted({class_names[f.label] for f in members}),
            }
        )
    return sorted(out, key=lambda g: g["files"][0])


def _normalized(feats: Any, rows: np.ndarray) -> np.ndarray:
    x = np.asarray(feats[rows], np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def similar_pairs(
    feats: Any,
    rows_a: np.ndarray,
    rows_b: np.ndarray,
    threshold: float,
    block: int = BLOCK_ROWS,
) -> list[tuple[int, int, float]]:
    """(i, j, cosine) for every ``rows_a[i]``, ``rows_b[j]`` of ``feats`` at least
    ``threshold`` alike, from ``block`` x ``block`` products of L2-normalised float32 rows (so
    memory stays at two blocks whatever the number of rows)."""
    out: list[tuple[int, int, float]] = []
    for a0 in range(0, len(rows_a), block):
        xa = _normalized(feats, rows_a[a0 : a0 + block])
        for b0 in range(0, len(rows_b), block):
            xb = _normalized(feats, rows_b[b0 : b0 + block])
            sims = xa @ xb.T
            ii, jj = np.nonzero(sims >= threshold)
            out += [
                (a0 + int(i), b0 + int(j), float(sims[i, j])) for i, j in zip(ii, jj, strict=True)
            ]
    return out


def near_duplicates(
    feats: Any,
    files: Sequence[dict[str, Any]],
    digest_of: dict[str, str],
    threshold: float = NEAR_THRESHOLD,
    block: int = BLOCK_ROWS,
) -> list[dict[str, Any]]:
    """Pairs of images of two different splits whose features are at least ``threshold``
    alike (cosine), byte-identical pairs left out (they are exact duplicates):
    ``{a, b, similarity}`` each, ``a`` of the earlier split (train, validation, test), most
    alike first. ``files``: the cache entry's manifest files (path, split, row)."""
    by_split: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for f in files:
        by_split[f["split"]].append(f)
    splits = [s for s in ("train", "validation", "test") if by_split.get(s)]
    out = []
    for n, s1 in enumerate(splits):
        for s2 in splits[n + 1 :]:
            fa, fb = by_split[s1], by_split[s2]
            rows_a = np.array([f["row"] for f in fa], np.int64)
            rows_b = np.array([f["row"] for f in fb], np.int64)
            for i, j, sim in similar_pairs(feats, rows_a, rows_b, threshold, block):
                a, b = fa[i]["path"], fb[j]["path"]
                if digest_of.get(a) is not None and digest_of.get(a) == digest_of.get(b):
                    continue
                out.append({"a": a, "b": b, "similarity": round(sim, 4)})
    log.debug("%d near-duplicate pairs across splits at cosine >= %g", len(out), threshold)
    return sorted(out, key=lambda p: (-p["similarity"], p["a"], p["b"]))
