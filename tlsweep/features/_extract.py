"""Extracting shards of feature cache entries: one stream of forward passes per process.

An entry's rows are cut into shards (:func:`shard_spans`) that every process asking for the
entry claims, extracts and writes (the claims are :mod:`tlsweep.features._shards`).
:func:`extract_shards` claims the free shards of several entries as its stream reaches them,
decodes each image once for all of them (resized once per input size, augmented once per set
of views) and runs every entry's forward pass, two batches in flight (:func:`_forward_all`).
An entry being extracted is a :class:`Job`: its key, its model, the layout of its rows.
The loop that decides what to claim or wait for is :class:`tlsweep.features.FeatureCache`'s.

Once every shard is written, :func:`assemble` joins them into ``features.npy`` under the
entry's lock, writes the manifest and publishes the entry; another worker may have published
it first, then it is returned as cached. The result is bit-identical to one worker's
extraction.
"""

from __future__ import annotations

import collections
import itertools
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tlsweep import backbones as bbs
from tlsweep.config import BackboneConfig
from tlsweep.errors import DataError, TlsweepError
from tlsweep.images import (
    CHUNK_BYTES,
    SPLITS,
    ImageSet,
    ViewsVariant,
    decoded_chunks,
    features_record,
    path_seeds,
    read_failure,
    variant_pixels,
    why_skipped,
)

from ._entries import (
    CACHE_FORMAT,
    FEATURES_FILE,
    Entry,
    entry_lock,
    entry_name,
    publish,
    read_entry,
    tmp_name,
    weights_identity,
)
from ._shards import Claim, Refresher, Shards, Span

log = logging.getLogger(__name__)

# Images per forward pass, two passes in flight (see _forward_all). Measured on 2 cores with
# MobileNetV2 a0.35 at 160 px: 32 with two in flight beats 64, 128 or 256 with one.
EXTRACT_BATCH = 32
IN_FLIGHT = 2
# Batches per decoded chunk when several entries are extracted together (see extract_shards).
MULTI_CHUNK_BATCHES = 8
VIEWS_CHUNK_BYTES = 256 << 20  # at most this much decoded image data per chunk with views
Progress = Callable[[int, int], None]

# Forward batches per shard: a shard is what one worker claims, decodes and writes at a time.
SHARD_BATCHES = 16


@dataclass
class Job:
    """One entry being extracted: what it is, its model, its shard folder and progress."""

    bb: BackboneConfig
    parts: dict[str, Any]
    key: str
    name: str
    progress: Progress | None
    forward: Any = None
    dim: int = 0
    shards: Shards | None = None
    done: int = 0  # rows written, by any worker
    together: int = 1  # entries extracted together with this one
    t_build: float = 0.0
    base: int = 0  # rows of view 0 (every file)
    rows: int = 0  # rows of each further view: the files of the augmented splits
    total: int = 0  # rows of features.npy

    @property
    def variant(self) -> ViewsVariant | None:
        """The augmented variant of the decoded images this entry needs, if any."""
        a = self.bb.augment
        if a is None:
            return None
        return (int(self.bb.input_size or 0), a.views, a.flip, a.crop, a.seed)

    @property
    def views(self) -> int:
        return self.bb.augment.views if self.bb.augment is not None else 1

    def plan_views(self, n: int, splits: list[str]) -> None:
        """Lay out the rows: view 0 of all ``n`` files, then views 1 .. K - 1 of the files of
        the augmented splits, which come first in ``splits`` (the files' splits in row order)."""
        self.base = self.total = n
        a = self.bb.augment
        if a is None:
            return
        self.rows = sum(1 for s in splits if s in a.splits)
        if any(s not in a.splits for s in splits[: self.rows]):  # pragma: no cover - row order
            raise TlsweepError("augmented splits must come first in the rows")
        self.total = n + (a.views - 1) * self.rows

    def span_rows(self, span: Span) -> int:
        """The rows of features.npy a shard holds (every view of its files)."""
        a, b = span
        return b - a + (self.views - 1) * max(0, min(b, self.rows) - a)

    def views_info(self) -> dict[str, Any]:
        a = self.bb.augment
        assert a is not None
        return {"count": a.views, "base": self.base, "rows": self.rows, "splits": list(a.splits)}

    def cost_note(self, passes: int) -> str:
        if self.bb.augment is None:
            return ""
        return (
            f"; {self.bb.augment.views} views of {', '.join(self.bb.augment.splits)}: "
            f"{passes} forward passes, {passes / max(self.base, 1):.2f}x a single view"
        )

    def build(self, tf: Any) -> None:
        extractor = bbs.build_extractor(self.bb)
        self.dim = int(np.prod(extractor.output_shape[1:]))
        # One trace for every batch size (the last batch is smaller), traced here, before two
        # threads call it.
        size = self.bb.input_size
        spec = tf.TensorSpec([None, size, size, 3], tf.float32)
        self.forward = tf.function(
            lambda x: extractor(x, training=False), input_signature=[spec], autograph=False
        )
        self.forward.get_concrete_function()


def shard_spans(n: int) -> list[Span]:
    """The shards of ``n`` rows: SHARD_BATCHES forward batches each, the last one shorter.

    They depend only on ``n``, so every worker (and a single one) cuts the rows the same way.
    """
    size = SHARD_BATCHES * EXTRACT_BATCH
    return [(a, min(a + size, n)) for a in range(0, n, size)]


def _shard_buffers(job: Job, span: Span) -> tuple[np.ndarray, np.ndarray]:
    """Zeroed features ``[views, shard rows, dim]`` and decoded-row flags of one shard."""
    return (
        np.zeros((job.views, span[1] - span[0], job.dim), np.float32),
        np.zeros(span[1] - span[0], bool),
    )


def _forward_all(
    forward: Callable[[Any], Any],
    batches: Iterator[tuple[np.ndarray, Any]],
    in_flight: int | None = None,
):
    """Yield ``(indices, features)`` of every batch, with ``in_flight`` forward passes running.

    One pass at a time leaves a core partly idle between and inside small ops; a second pass
    in flight fills the gaps (TensorFlow runs concurrent calls of one function in parallel and
    releases the GIL while it does). Results come back in order.
    """
    in_flight = in_flight or IN_FLIGHT
    pending: collections.deque = collections.deque()
    with ThreadPoolExecutor(max_workers=in_flight, thread_name_prefix="tlsweep-forward") as pool:
        try:
            for idx, batch in batches:
                pending.append((idx, pool.submit(lambda b: forward(b).numpy(), batch)))
                if len(pending) >= in_flight:
                    i, fut = pending.popleft()
                    yield i, fut.result()
            while pending:
                i, fut = pending.popleft()
                yield i, fut.result()
        finally:
            for _, fut in pending:
                fut.cancel()


@dataclass(frozen=True)
class RowPlan:
    """How one extraction lays out the rows of an image set's entries.

    Rows are grouped by split (train, validation, test), each in file order: a split is one
    block of the .npy, which training maps without a copy (``Entry.split``). Layout A is in that
    order already; layout B's files are in path order, their splits interleaved. The rows are
    cut into shards (``spans``) that never change with the number of workers.
    """

    images: ImageSet
    order: list[int]  # the file index of each row
    row_of: np.ndarray  # the row of each file index
    paths: list[str]  # the file of each row
    seeds: np.ndarray  # of each row's augmented views
    spans: list[Span]
    t0: float  # when the extraction started (perf_counter)

    @classmethod
    def of(cls, images: ImageSet) -> RowPlan:
        t0 = time.perf_counter()
        rank = {s: i for i, s in enumerate(SPLITS)}
        order = sorted(range(len(images.files)), key=lambda i: rank[images.files[i].split])
        row_of = np.empty(len(order), dtype=np.int64)
        row_of[order] = np.arange(len(order))
        paths = [images.abspath(images.files[i]) for i in order]
        seeds = path_seeds([images.files[i].path for i in order])
        return cls(images, order, row_of, paths, seeds, shard_spans(len(paths)), t0)


def extract_shards(cache_dir: Path, jobs: list[Job], plan: RowPlan) -> None:
    """One stream of forward passes over every shard this process can claim, in order.

    A shard is claimed when the stream reaches it (while the last passes of the previous
    one run), decoded once for every entry that claimed it (resized once per input size,
    augmented once per set of views), and written when its last batch is through. Batches
    never cross a shard's boundary, so each batch holds the same images whichever worker
    extracts the shard and however many there are.
    """
    import tensorflow as tf

    paths, seeds, spans = plan.paths, plan.seeds, plan.spans
    t0 = time.perf_counter()
    opened: list[tuple[Span, list[tuple[Job, Claim]]]] = []
    # per shard and entry: features [views, shard rows, dim], which rows decoded
    bufs: dict[tuple[Span, str], tuple[np.ndarray, np.ndarray]] = {}
    ready = threading.Event()
    single = len(jobs) == 1

    def claims() -> Iterator[tuple[Span, list[tuple[Job, Claim]]]]:
        for span in spans:
            claimed = []
            for job in jobs:
                if job.shards.is_done(span):
                    continue
                try:
                    claim = job.shards.claim(span, lambda j=job: entry_lock(cache_dir, j.name))
                except FileNotFoundError:  # the folder is gone: published or cleared
                    continue
                if claim is not None:
                    claimed.append((job, claim))
            if claimed:
                opened.append((span, claimed))
                yield span, claimed

    def batches() -> Iterator[tuple[tuple[Span, Job, np.ndarray, int], tuple[Job, Any]]]:
        import tensorflow as tf

        first = True
        for span, claimed in claims():
            a, b = span
            sizes = sorted({job.bb.input_size for job, _ in claimed})
            augmented = sorted({j.variant for j, _ in claimed if j.variant is not None})
            variants: list[Any] = [*sizes, *augmented]
            per_batch = EXTRACT_BATCH * sum(variant_pixels(v) for v in variants) * 3 * 4
            chunk = None
            if augmented:
                chunk = max(per_batch, min(MULTI_CHUNK_BATCHES * per_batch, VIEWS_CHUNK_BYTES))
            elif not single:
                chunk = MULTI_CHUNK_BATCHES * per_batch
            chunks = decoded_chunks(
                paths[a:b],
                sizes[0] if len(variants) == 1 else variants,
                EXTRACT_BATCH,
                first_bytes=None if first else (chunk or CHUNK_BYTES),
                chunk_bytes=chunk,
                first_until=ready if first else None,
                seeds=seeds[a:b] if augmented else None,
            )
            first = False
            for decoded in chunks:
                for job, _ in claimed:
                    k = variants.index(job.bb.input_size)
                    for idx, x in decoded:
                        yield (span, job, idx + a, 0), (job, x if len(variants) == 1 else x[k])
                    if job.variant is None:
                        continue
                    kv = variants.index(job.variant)
                    for idx, x in decoded:
                        keep = np.flatnonzero(idx + a < job.rows)  # the augmented splits
                        if len(keep) == 0:
                            continue
                        xs = x[kv] if len(keep) == len(idx) else tf.gather(x[kv], keep)
                        for v in range(1, job.views):
                            yield (span, job, idx[keep] + a, v), (job, xs[:, v - 1])

    gen = batches()
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tlsweep-decode") as dec:
            # The first chunk decodes (on the decoding threads, mostly without the GIL)
            # while this thread builds the models and traces the forward passes: a second
            # of Python per model that leaves the other core free. It stops once the
            # models are ready.
            head = dec.submit(next, gen, None)
            try:
                for job in jobs:
                    if job.forward is None:
                        job.build(tf)
                        job.t_build = time.perf_counter() - t0
                    if weights_identity(job.bb, fetch=False) != job.parts["weights"]:
                        raise TlsweepError(
                            f"{job.bb.label}: its weights file changed while the features "
                            "were being extracted; run again"
                        )
            finally:
                ready.set()
            got = head.result()
        if got is None:  # nothing decoded: no free shard left, or none of their images
            while opened:
                _write_shard(*opened[0], bufs, paths)
                opened.pop(0)
            return
        stream = _forward_all(lambda jx: jx[0].forward(jx[1]), itertools.chain([got], gen))
        with Refresher(opened):
            for (span, job, idx, view), out in stream:
                while opened[0][0] != span:  # every pass of the shards before is through
                    _write_shard(*opened[0], bufs, paths)
                    opened.pop(0)
                key = (span, job.name)
                if key not in bufs:
                    bufs[key] = _shard_buffers(job, span)
                feats, rows = bufs[key]
                feats[view, idx - span[0]] = out.reshape(len(idx), job.dim)
                if view == 0:
                    rows[idx - span[0]] = True
                job.done += len(idx)
                if job.progress:
                    job.progress(job.done, job.total)
            while opened:
                _write_shard(*opened[0], bufs, paths)
                opened.pop(0)
    finally:
        gen.close()
        for _, claimed in opened:  # claimed but not written: free for others to take
            for _, claim in claimed:
                claim.release()


def _write_shard(
    span: Span,
    claimed: list[tuple[Job, Claim]],
    bufs: dict[tuple[Span, str], tuple[np.ndarray, np.ndarray]],
    paths: list[str],
) -> None:
    """Write the finished shard of each entry that claimed it and release the claims.

    An image the decoding dropped because of an I/O error (not a bad image) fails the
    extraction: the shard is not written, so nothing is silently skipped.
    """
    a, b = span
    for job, claim in claimed:
        feats, rows = bufs.pop((span, job.name), None) or _shard_buffers(job, span)
        for i in np.flatnonzero(~rows).tolist():
            failure = read_failure(paths[a + i], job.bb.input_size)
            if failure is not None:
                raise DataError(
                    f"{paths[a + i]}: {failure}; an I/O error, not a bad image: check the "
                    "disk or network share, then run again"
                )
        try:
            job.shards.write(span, feats, rows)
        except FileNotFoundError:  # published by another worker (who took it over) meanwhile
            pass
        claim.release()


# --- assembly: the written shards joined into the entry, published -----------------------
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
