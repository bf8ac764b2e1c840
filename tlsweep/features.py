"""Feature extraction into the on-disk, content-addressed feature cache.

What an entry is on disk (key, manifest, lock, publication) is :mod:`tlsweep.entries`; the
shard folder that lets several workers extract one entry together is :mod:`tlsweep.shards`.

Extraction streams batches to a memory-mapped ``.npy`` file, so a dataset larger than memory
works. A missing entry's rows are cut into shards (:func:`shard_spans`) that every process
asking for it (``run --workers N``, other machines on the same cache folder) claims, extracts
and writes; a shard of a worker that died is taken over, and the entry is joined and published
under a per-entry file lock once every shard is written, bit-identical to one worker's.

Computing a key imports no TensorFlow, and reads only the images whose stat changed: a stat
index per data folder (``<cache_dir>/stat-index-<hash of the folder's path>.json``) maps each
file's (size, mtime, ctime, inode, device) to its content digest (see
:func:`tlsweep.digests.file_digests`), so a cache hit costs one ``stat`` per image, whatever
their size. ``verify`` (``--verify``, ``data.verify``) reads every image.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
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
from tlsweep.config import BackboneConfig, SweepConfig
from tlsweep.data import SPLITS, ImageSet, find_images
from tlsweep.decode import (
    CHUNK_BYTES,
    ViewsVariant,
    decoded_chunks,
    path_seeds,
    read_failure,
    variant_pixels,
    why_skipped,
)
from tlsweep.digests import content_digest
from tlsweep.entries import (
    CACHE_FORMAT,
    Entry,
    _entry_lock,
    _in_progress,
    _lock_held,
    _publish,
    _read_entry,
    _tmp_name,
    cache_key,
    check_usable,
    entry_name,
    key_parts,
    report_skipped,
    weights_identity,
)
from tlsweep.errors import DataError, TlsweepError
from tlsweep.shards import (
    CLAIM_STALE_AFTER,
    SHARDS_SUFFIX,
    Span,
    _Claim,
    _Refresher,
    _Shards,
)

log = logging.getLogger(__name__)

STAT_INDEX_PREFIX = "stat-index-"  # a file in the cache folder per data folder
# Images per forward pass, two passes in flight (see _forward_all). Measured on 2 cores with
# MobileNetV2 a0.35 at 160 px: 32 with two in flight beats 64, 128 or 256 with one.
EXTRACT_BATCH = 32
IN_FLIGHT = 2
# Batches per decoded chunk when several entries are extracted together (see _extract).
MULTI_CHUNK_BATCHES = 8
VIEWS_CHUNK_BYTES = 256 << 20  # at most this much decoded image data per chunk with views
Progress = Callable[[int, int], None]

# Forward batches per shard: a shard is what one worker claims, decodes and writes at a time.
SHARD_BATCHES = 16
WAIT_POLL = 0.5  # seconds between looks at shards other workers are extracting
WAIT_LOG_EVERY = 30.0  # seconds between two "waiting for shards" lines


class FeatureCache:
    """The cache folder: lookup, extraction with publication, listing and clearing."""

    def __init__(self, cache_dir: str | Path):
        self.dir = Path(cache_dir)

    def _mkdir(self) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TlsweepError(
                f"{self.dir}: cannot create the cache folder ({e.strerror}); "
                "set cache_dir or pass --cache-dir"
            ) from None

    def stat_index(self, data_dir: str | Path) -> Path:
        """Where the stat index of the images under ``data_dir`` lives (by its absolute path)."""
        folder = hashlib.sha256(os.path.abspath(data_dir).encode()).hexdigest()[:24]
        return self.dir / f"{STAT_INDEX_PREFIX}{folder}.json"

    def images_digest(self, images: ImageSet, verify: bool = False) -> str:
        """:func:`~tlsweep.digests.content_digest` through this cache's stat index of the folder."""
        self._mkdir()
        return content_digest(images, index=self.stat_index(images.root), verify=verify)

    def lookup(self, bb: BackboneConfig, key: str) -> Entry | None:
        return _read_entry(self.dir / entry_name(bb, key), key)

    def entries(self) -> list[Entry]:
        if not self.dir.is_dir():
            return []
        out = []
        for p in sorted(self.dir.iterdir()):
            if p.is_dir() and ".tmp-" not in p.name:
                e = _read_entry(p)
                if e is not None:
                    out.append(e)
        return out

    def clear(self, match: str | None = None) -> list[str]:
        """Remove entries (all, or those whose name contains ``match``) and leftovers; without
        ``match``, the stat indexes of the data folders too (they are a cache as well). An
        extraction in progress (its lock held, its temporary folder alive) is left alone."""
        removed = []
        if not self.dir.is_dir():
            return removed
        for p in sorted(self.dir.iterdir()):
            if match and match not in p.name:
                continue
            if p.is_dir():
                lock = self.dir / f"{p.name.split('.tmp-')[0]}.lock"
                shards = p.name.endswith(SHARDS_SUFFIX)
                if (".tmp-" in p.name and _in_progress(p, _lock_held(lock))) or (
                    shards and _Shards(self.dir, p.name[: -len(SHARDS_SUFFIX)]).any_live()
                ):
                    log.info("%s: an extraction in progress; left alone", p.name)
                    continue
                shutil.rmtree(p, ignore_errors=True)
                if ".tmp-" not in p.name and not shards:
                    removed.append(p.name)
            elif (p.suffix == ".lock" and not _lock_held(p)) or (
                match is None and p.name.lstrip(".").startswith(STAT_INDEX_PREFIX)
            ):
                with contextlib.suppress(OSError):
                    p.unlink()
        return removed

    def ensure(
        self,
        bb: BackboneConfig,
        images: ImageSet,
        images_digest: str | None = None,
        progress: Progress | None = None,
    ) -> tuple[Entry, bool]:
        """The entry for ``bb`` on ``images``, extracting it if needed; (entry, was_cached)."""
        return self.ensure_many([bb], images, images_digest, [progress])[0]

    def ensure_many(
        self,
        backbones: list[BackboneConfig],
        images: ImageSet,
        images_digest: str | None = None,
        progress: list[Progress | None] | None = None,
    ) -> list[tuple[Entry, bool]]:
        """The entry of each backbone on ``images``; (entry, was_cached) per backbone, in order.

        The missing entries are extracted together: each image is decoded once, resized to
        every input size they need, and goes through every backbone's forward pass. Every
        process that asks for a missing entry meanwhile (``run --workers N``, other machines on
        the same cache folder) takes shards of it (see :class:`_Shards`); an entry another
        process published is returned as cached.
        """
        digest = images_digest or self.images_digest(images)
        out: list[tuple[Entry, bool] | None] = [None] * len(backbones)
        jobs: list[tuple[int, _Job]] = []
        first: dict[str, int] = {}  # entry name -> the first backbone asking for it
        same: list[tuple[int, int]] = []
        for k, bb in enumerate(backbones):
            parts = key_parts(bb, digest)
            key = cache_key(parts)
            name = entry_name(bb, key)
            if name in first:
                same.append((k, first[name]))
                continue
            first[name] = k
            hit = self.lookup(bb, key)
            if hit is not None:
                log.info("cache hit: %s", name)
                out[k] = (hit, True)
            else:
                jobs.append((k, _Job(bb, parts, key, name, progress[k] if progress else None)))
        if jobs:
            self._mkdir()
            todo: list[tuple[int, _Job]] = []
            try:
                for k, job in jobs:
                    hit = self._start(job)
                    if hit is not None:
                        out[k] = (hit, True)
                    else:
                        todo.append((k, job))
                if todo:
                    done = self._extract([job for _, job in todo], images)
                    for (k, _), got in zip(todo, done, strict=True):
                        out[k] = got
            except BaseException:
                for k, job in jobs:
                    if out[k] is None and job.shards is not None:
                        self._abandon(job)
                raise
        for k, j in same:
            out[k] = out[j]
        return out  # type: ignore[return-value]

    def _start(self, job: _Job) -> Entry | None:
        """Under the entry's lock: the entry if another worker published it meanwhile; else
        make its shard folder (abandoned temporary folders removed, a damaged entry replaced)."""
        with _entry_lock(self.dir, job.name):
            hit = self.lookup(job.bb, job.key)
            if hit is not None:
                log.info("cache hit: %s (extracted by another worker)", job.name)
                return hit
            for stale in self.dir.glob(f"{job.name}.tmp-*"):
                if not _in_progress(stale, locked=False):  # we hold the lock; others'
                    shutil.rmtree(stale, ignore_errors=True)
            final = self.dir / job.name
            if final.exists():  # a damaged entry: never used, replaced
                log.warning("replacing damaged cache entry %s", job.name)
                shutil.rmtree(final, ignore_errors=True)
            job.shards = _Shards(self.dir, job.name)
            job.shards.dir.mkdir(exist_ok=True)
        return None

    def _extract(self, jobs: list[_Job], images: ImageSet) -> list[tuple[Entry, bool]]:
        """Take and extract shards of the ``jobs``' entries until every shard is written, then
        assemble and publish each entry (unless another worker did); (entry, was_cached)."""
        t0 = time.perf_counter()
        # Rows grouped by split (train, validation, test), each in file order: a split is one
        # block of the .npy, which training maps without a copy (Entry.split). Layout A is in
        # that order already; layout B's files are in path order, their splits interleaved.
        rank = {s: i for i, s in enumerate(SPLITS)}
        order = sorted(range(len(images.files)), key=lambda i: rank[images.files[i].split])
        row_of = np.empty(len(order), dtype=np.int64)
        row_of[order] = np.arange(len(order))
        paths = [images.abspath(images.files[i]) for i in order]
        seeds = path_seeds([images.files[i].path for i in order])  # of augmented views
        spans = shard_spans(len(paths))
        for job in jobs:
            job.plan_views(len(paths), [images.files[i].split for i in order])
        results: dict[str, tuple[Entry, bool]] = {}
        waiting_since: float | None = None
        last_log = 0.0
        for job in jobs:
            job.together = len(jobs)
        while len(results) < len(jobs):
            left = [job for job in jobs if job.name not in results]
            held: list[tuple[_Job, Span, str]] = []
            for job in left:
                state = self._state(job, spans)
                if isinstance(state, Entry):
                    log.info("cache hit: %s (extracted by another worker)", job.name)
                    results[job.name] = (state, True)
                elif state:
                    held += [(job, span, owner) for span, owner in state.items()]
                elif not any(job.shards.claimable(span) for span in spans):
                    made = self._assemble(job, images, order, row_of, spans, t0)
                    if made is not None:
                        results[job.name] = made
            left = [job for job in left if job.name not in results]
            if any(job.shards.claimable(s) for job in left for s in spans):
                self._extract_shards(left, paths, seeds, spans)
                waiting_since = None
            elif held and len(results) < len(jobs):
                # every missing shard is being extracted by a live worker: wait for them,
                # and take over the shard of any that dies or stops refreshing its claim
                now = time.monotonic()
                waiting_since = waiting_since or now
                if now - last_log >= WAIT_LOG_EVERY:
                    last_log = now
                    owners = sorted({owner for _, _, owner in held})
                    log.info(
                        "waiting for %d shard(s) of %s being extracted by %s (%.0fs so "
                        "far); a claim not refreshed for %gs is taken over",
                        len(held),
                        ", ".join(sorted({job.name for job, _, _ in held})),
                        ", ".join(owners),
                        now - waiting_since,
                        CLAIM_STALE_AFTER,
                    )
                time.sleep(WAIT_POLL)
        return [results[job.name] for job in jobs]

    def _state(self, job: _Job, spans: list[Span]) -> Entry | dict[Span, str] | None:
        """The entry if another worker published it; else the shards claimed by live workers
        (span -> owner), empty when none is (every shard written, or some free to claim)."""
        hit = self.lookup(job.bb, job.key)
        if hit is not None:
            return hit
        if not job.shards.dir.is_dir():  # removed by `cache clear`: start again
            hit = self._start(job)
            if hit is not None:
                return hit
        held = {}
        for span in spans:
            if not job.shards.is_done(span):
                owner = job.shards.live_owner(span)
                if owner is not None:
                    held[span] = owner
        job.done = sum(job.span_rows(s) for s in spans if job.shards.is_done(s))
        if job.progress:
            job.progress(job.done, job.total)
        return held

    def _abandon(self, job: _Job) -> None:
        """After an error or Ctrl-C: remove the entry's shard folder, unless another worker is
        extracting shards of it (their claims are live) or will assemble it."""
        with contextlib.suppress(OSError), _entry_lock(self.dir, job.name):
            if job.shards.dir.is_dir() and not job.shards.any_live():
                shutil.rmtree(job.shards.dir, ignore_errors=True)

    def _extract_shards(
        self, jobs: list[_Job], paths: list[str], seeds: np.ndarray, spans: list[Span]
    ) -> None:
        """One stream of forward passes over every shard this process can claim, in order.

        A shard is claimed when the stream reaches it (while the last passes of the previous
        one run), decoded once for every entry that claimed it (resized once per input size,
        augmented once per set of views), and written when its last batch is through. Batches
        never cross a shard's boundary, so each batch holds the same images whichever worker
        extracts the shard and however many there are.
        """
        import tensorflow as tf

        t0 = time.perf_counter()
        opened: list[tuple[Span, list[tuple[_Job, _Claim]]]] = []
        # per shard and entry: features [views, shard rows, dim], which rows decoded
        bufs: dict[tuple[Span, str], tuple[np.ndarray, np.ndarray]] = {}
        ready = threading.Event()
        single = len(jobs) == 1

        def claims() -> Iterator[tuple[Span, list[tuple[_Job, _Claim]]]]:
            for span in spans:
                claimed = []
                for job in jobs:
                    if job.shards.is_done(span):
                        continue
                    try:
                        claim = job.shards.claim(span, lambda j=job: _entry_lock(self.dir, j.name))
                    except FileNotFoundError:  # the folder is gone: published or cleared
                        continue
                    if claim is not None:
                        claimed.append((job, claim))
                if claimed:
                    opened.append((span, claimed))
                    yield span, claimed

        def batches() -> Iterator[tuple[tuple[Span, _Job, np.ndarray, int], tuple[_Job, Any]]]:
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
                    self._write_shard(*opened[0], bufs, paths)
                    opened.pop(0)
                return
            stream = _forward_all(lambda jx: jx[0].forward(jx[1]), itertools.chain([got], gen))
            with _Refresher(opened):
                for (span, job, idx, view), out in stream:
                    while opened[0][0] != span:  # every pass of the shards before is through
                        self._write_shard(*opened[0], bufs, paths)
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
                    self._write_shard(*opened[0], bufs, paths)
                    opened.pop(0)
        finally:
            gen.close()
            for _, claimed in opened:  # claimed but not written: free for others to take
                for _, claim in claimed:
                    claim.release()

    def _write_shard(
        self,
        span: Span,
        claimed: list[tuple[_Job, _Claim]],
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

    def _assemble(
        self,
        job: _Job,
        images: ImageSet,
        order: list[int],
        row_of: np.ndarray,
        spans: list[Span],
        t0: float,
    ) -> tuple[Entry, bool] | None:
        """Under the entry's lock, join the written shards into the entry and publish it;
        (entry, False), or (entry, True) when another worker published it first; None if a
        shard is missing after all (its folder was cleared meanwhile)."""
        n = len(order)
        with _entry_lock(self.dir, job.name):
            hit = self.lookup(job.bb, job.key)
            if hit is not None:
                log.info("cache hit: %s (extracted by another worker)", job.name)
                return hit, True
            if not all(job.shards.is_done(span) for span in spans):
                return None
            tmp = self.dir / _tmp_name(job.name)
            tmp.mkdir()
            try:
                entry = self._join(job, images, order, row_of, spans, tmp, t0)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            finally:
                shutil.rmtree(job.shards.dir, ignore_errors=True)
        if entry is not None:
            log.info("cache hit: %s (published by another machine meanwhile)", job.name)
            return entry, True
        entry = _read_entry(self.dir / job.name, job.key)
        if entry is None:  # pragma: no cover - we just wrote it
            raise TlsweepError(f"{self.dir / job.name}: the new cache entry failed verification")
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

    def _join(
        self,
        job: _Job,
        images: ImageSet,
        order: list[int],
        row_of: np.ndarray,
        spans: list[Span],
        tmp: Path,
        t0: float,
    ) -> Entry | None:
        """Write the entry into ``tmp`` from its shards and publish it (None), or return the
        same entry another machine published first."""
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
        t_extract = time.perf_counter() - t0
        # Rows of skipped files stay zero and no file points at them.
        t_diag = time.perf_counter()
        paths = [images.abspath(images.files[i]) for i in order]
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
        manifest = {
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
        }
        if job.bb.augment is not None:
            manifest["views"] = job.views_info()
            # forward passes per usable image: the views' cost, K x on augmented splits
            manifest["timings"]["forward_passes"] = done + (job.views - 1) * int(
                got[: job.rows].sum()
            )
        with open(tmp / "manifest.json", "w") as f:
            json.dump(manifest, f)  # no indent: the C encoder, 10x faster on 4000 files
            f.flush()
            os.fsync(f.fileno())
        return _publish(tmp, self.dir / job.name, job.key)


@dataclass
class _Job:
    """One entry being extracted: what it is, its model, its shard folder and progress."""

    bb: BackboneConfig
    parts: dict[str, Any]
    key: str
    name: str
    progress: Progress | None
    forward: Any = None
    dim: int = 0
    shards: _Shards | None = None
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


def _shard_buffers(job: _Job, span: Span) -> tuple[np.ndarray, np.ndarray]:
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


def extract_all(
    cfg: SweepConfig,
    progress: Callable[[BackboneConfig], Progress | None] | None = None,
    check: Callable[[dict[str, dict[str, Any]]], None] | None = None,
    share: Callable[[Callable[[], bool]], None] | None = None,
) -> list[tuple[BackboneConfig, Entry, bool]]:
    """Find the images once, then make sure every configured backbone's entry exists.

    ``check`` is called with :func:`study_keys`' view of the entries (label -> key and key
    parts) before anything is extracted, so a study made on other features is refused before
    minutes of extraction (a missing ImageNet file is downloaded first: its bytes are part of
    the key). ``share`` is called when an entry is missing, before this process extracts
    anything, with a function that tells whether every entry exists now: ``run --workers N``
    starts its workers on the shards then and waits for them; this process extracts whatever
    is still missing after it returns. Returns (resolved backbone, entry, was_cached) per
    backbone, in sweep-file order.
    """
    resolved = list(cfg.backbones)  # load_sweep resolved them against the registry
    images = find_images(cfg.data)
    cache = FeatureCache(cfg.cache_dir)
    digest = cache.images_digest(images, verify=cfg.data.verify)
    if check is not None:
        check({bb.label: _expected(bb, digest) for bb in resolved})
    # Every entry that must exist, fused backbones' members included, extracted together (one
    # decode of each image for all of them); a fused backbone joins its members' entries.
    plain: list[BackboneConfig] = []
    for bb in resolved:
        for m in bb.members or (bb,):
            if m not in plain:
                plain.append(m)
    if share is not None:
        keys = [(bb, cache_key(key_parts(bb, digest))) for bb in plain]
        if any(cache.lookup(bb, key) is None for bb, key in keys):
            share(lambda: all(cache.lookup(bb, key) is not None for bb, key in keys))
    done = cache.ensure_many(
        plain, images, digest, [progress(bb) for bb in plain] if progress else None
    )
    out = []
    for bb in resolved:
        if bb.members:
            from tlsweep.fusion import fuse_entries

            got = [done[plain.index(m)] for m in bb.members]
            entry, cached = fuse_entries(bb, [e for e, _ in got]), all(c for _, c in got)
        else:
            entry, cached = done[plain.index(bb)]
        report_skipped(entry)
        check_usable(entry)
        out.append((bb, entry, cached))
    return out


def study_keys(entries: list[tuple[BackboneConfig, Entry, bool]]) -> dict[str, dict[str, Any]]:
    """label -> {"key", "parts"} of each backbone's entry: what a study is tied to."""
    return {bb.label: {"key": e.key, "parts": e.manifest["key_parts"]} for bb, e, _ in entries}


def expected_keys(cfg: SweepConfig) -> dict[str, dict[str, Any]]:
    """label -> {"key", "parts"} the sweep file's data would have now, without extracting or
    downloading; a backbone whose ImageNet file is not downloaded yet is left out."""
    images = find_images(cfg.data)
    cache = FeatureCache(cfg.cache_dir)
    if cache.dir.is_dir():  # through the stat index; a command that reads makes no folder
        digest = cache.images_digest(images, verify=cfg.data.verify)
    else:
        digest = content_digest(images)
    out = {}
    for bb in cfg.backbones:
        expected = _expected(bb, digest, fetch=False)
        if expected is not None:
            out[bb.label] = expected
    return out


def _expected(bb: BackboneConfig, digest: str, fetch: bool = True) -> dict[str, Any] | None:
    """{"key", "parts"} of ``bb``'s entry on images of ``digest`` (a fused backbone: of its
    joined members, as :func:`tlsweep.fusion.fuse_entries` keys it); None when an ImageNet
    file is not downloaded yet and ``fetch`` is False."""
    if bb.members:
        members = [_expected(m, digest, fetch) for m in bb.members]
        if any(m is None for m in members):
            return None
        keys = [m["key"] for m in members]  # type: ignore[index]
        return {
            "key": hashlib.sha256(json.dumps({"fuse": keys}).encode()).hexdigest(),
            "parts": {"fuse": keys},
        }
    parts = key_parts(bb, digest, fetch)
    if parts["weights"] is None:
        return None
    return {"key": cache_key(parts), "parts": parts}
