"""Assembling a feature cache entry: its written shards joined into ``features.npy``, the
manifest written, the entry published.

:func:`assemble` runs under the entry's lock once every shard is written
(:mod:`tlsweep.features._extract`); another worker may have published the entry first, then it is
returned as cached. The result is bit-identical to one worker's extraction.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from tlsweep.errors import TlsweepError
from tlsweep.images import features_record, why_skipped

from ._entries import (
    CACHE_FORMAT,
    FEATURES_FILE,
    Entry,
    entry_lock,
    entry_name,
    publish,
    read_entry,
    tmp_name,
)
from ._extract import Job, RowPlan

log = logging.getLogger(__name__)


def assemble(cache_dir: Path, job: Job, plan: RowPlan) -> tuple[Entry, bool] | None:
    """Under the entry's lock, join the written shards into the entry and publish it;
    (entry, False), or (entry, True) when another worker published it first; None if a
    shard is missing after all (its folder was cleared meanwhile)."""
    n = len(plan.order)
    with entry_lock(cache_dir, job.name):
        hit = read_entry(cache_dir / entry_name(job.bb, job.key), job.key)
        if hit is not None:
            log.info("cache hit: %s (extracted by another worker)", job.name)
            return hit, True
        if not all(job.shards.is_done(span) for span in plan.spans):
            return None
        tmp = cache_dir / tmp_name(job.name)
        tmp.mkdir()
        try:
            theirs = _join(cache_dir, job, plan, tmp)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, TlsweepError) and e.exit_code == 2:  # no usable image: nothing of use
                shutil.rmtree(job.shards.dir, ignore_errors=True)
            raise  # else the written shards stay for the next extraction (Ctrl-C, a full disk)
        shutil.rmtree(job.shards.dir, ignore_errors=True)
        # read back under the lock: a `cache clear` meanwhile cannot remove it in between
        entry = theirs or read_entry(cache_dir / job.name, job.key)
    if theirs is not None:
        log.info("cache hit: %s (published by another machine meanwhile)", job.name)
        return theirs, True
    if entry is None:  # pragma: no cover - we just wrote it
        raise TlsweepError(f"{cache_dir / job.name}: the new cache entry failed verification")
    t = entry.manifest["timings"]
    log.info(
        "extracted %s: %d images in %.1fs (%.0f images/s) by %d worker(s), %d skipped%s",
        job.name,
        n - len(entry.manifest["skipped"]),
        t["extract_s"],
        (n - len(entry.manifest["skipped"])) / max(t["extract_s"], 1e-9),
        len(t["workers"]),
        len(entry.manifest["skipped"]),
        job.cost_note(t.get("forward_passes", 0)),
    )
    return entry, False


def _join(cache_dir: Path, job: Job, plan: RowPlan, tmp: Path) -> Entry | None:
    """Write the entry into ``tmp`` from its shards and publish it (None), or return the
    same entry another machine published first."""
    images, order, row_of, spans = plan.images, plan.order, plan.row_of, plan.spans
    n = len(order)
    got = np.zeros(n, dtype=bool)
    feats: Any = None
    owners: set[str] = set()
    for a, b in spans:
        part, rows, owner = job.shards.read((a, b))
        if feats is None:
            job.dim = part.shape[-1]
            feats = np.lib.format.open_memmap(
                tmp / "features.npy", mode="w+", dtype=np.float32, shape=(job.total, job.dim)
            )
        feats[a:b] = part[0]
        for v in range(1, job.views):  # rows of the augmented splits' files, view by view
            end = min(b, job.rows)
            if end > a:
                start = job.base + (v - 1) * job.rows
                feats[start + a : start + end] = part[v, : end - a]
        got[a:b] = rows
        owners.add(owner)
    if feats is not None:
        feats.flush()
    del feats
    t_extract = time.perf_counter() - plan.t0
    # Rows of skipped files stay zero and no file points at them.
    t_diag = time.perf_counter()
    paths = plan.paths
    missing = np.flatnonzero(~got).tolist()
    skipped = dict(zip(missing, why_skipped([paths[i] for i in missing]), strict=True))
    t_diag = time.perf_counter() - t_diag
    if not got.any():
        raise TlsweepError(
            f"{images.root}: none of the {n} image files is usable "
            f"(first: {images.files[order[0]].path}: {skipped[0]}); check the files"
        )
    files = [
        {"path": f.path, "label": f.label, "split": f.split, "row": int(row_of[i])}
        for i, f in enumerate(images.files)
        if got[row_of[i]]
    ]
    skipped_list = [
        {"path": images.files[i].path, "reason": skipped[int(row_of[i])]}
        for i in range(len(images.files))
        if int(row_of[i]) in skipped
    ]
    done = int(got.sum())
    manifest: dict[str, Any] = {
        "format": CACHE_FORMAT,
        "complete": True,
        "key": job.key,
        "key_parts": job.parts,
        "name": job.name,
        "backbone": {
            "name": job.bb.name,
            "weights": job.bb.weights,
            "input_size": job.bb.input_size,
            "pooling": job.bb.pooling,
            "args": dict(job.bb.args),
            "label": job.bb.label,
            "augment": asdict(job.bb.augment) if job.bb.augment else None,
        },
        "shape": [job.total, job.dim],
        "dtype": "float32",
        "data_dir": str(images.root),
        "layout": images.layout,
        "class_names": images.class_names,
        "files": files,
        "skipped": skipped_list,
        "ignored": [{"path": p, "reason": r} for p, r in images.ignored],
        "timings": {
            # this worker's model build and trace, overlapped with the first decoding
            "build_s": round(job.t_build, 3),
            # from this worker's start to the last shard written, by any worker
            "extract_s": round(t_extract, 3),
            "images_per_s": round(done / t_extract, 1) if t_extract > 0 else None,
            "diagnose_skipped_s": round(t_diag, 3),
            # entries this worker extracted together, from one decoding of each image
            "extracted_with": job.together,
            # the shards of rows, and the workers (host:pid) that extracted them
            "shards": len(spans),
            "workers": sorted(owners),
        },
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        # its checksum and stat: a load whose stat differs checks the bytes (entries.py)
        FEATURES_FILE: features_record(tmp / "features.npy"),
    }
    if job.bb.augment is not None:
        manifest["views"] = job.views_info()
        # forward passes per usable image: the views' cost, K x on augmented splits
        manifest["timings"]["forward_passes"] = done + (job.views - 1) * int(got[: job.rows].sum())
    with open(tmp / "manifest.json", "w") as f:
        json.dump(manifest, f)  # no indent: the C encoder, 10x faster on 4000 files
        f.flush()
        os.fsync(f.fileno())
    return publish(tmp, cache_dir / job.name, job.key)
