"""The on-disk, content-addressed feature cache: lookup, listing, clearing, and extraction of
the entries that are missing.

What an entry is on disk (key, manifest, lock, publication) is :mod:`tlsweep.features._entries`; the
shard folder that lets several workers extract one entry together is
:mod:`tlsweep.features._shards`.

A missing entry's rows are cut into shards that every process asking for it (``run --workers
N``, other machines on the same cache folder) claims, extracts and writes (streamed to
memory-mapped files, :mod:`tlsweep.features._extract`); a dead worker's shard is taken over, and the
entry is joined and published under its lock once every shard is written, bit-identical to
one worker's (also :mod:`tlsweep.features._extract`), by :meth:`FeatureCache.ensure_many`.

Computing a key imports no TensorFlow, and reads only the images whose stat changed: a stat
index per data folder (``<cache_dir>/stat-index-<hash of the folder's path>.json``) maps each
file's (size, mtime, ctime, inode, device) to its content digest (see
:func:`tlsweep.images._digests.file_digests`), so a cache hit costs one ``stat`` per image, whatever
their size. ``verify`` (``--verify``, ``data.verify``) reads every image, and every entry's
features to check them against their recorded checksum.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tlsweep.config import BackboneConfig, SweepConfig
from tlsweep.errors import TlsweepError
from tlsweep.files import held_lock, lock_held, lock_holder
from tlsweep.images import ImageSet, content_digest, find_images

from ._entries import (
    Entry,
    cache_key,
    check_usable,
    entry_lock,
    entry_name,
    in_progress,
    key_parts,
    read_entry,
    report_skipped,
)
from ._extract import Job, Progress, RowPlan, assemble, extract_shards
from ._shards import (
    CLAIM_STALE_AFTER,
    SHARDS_SUFFIX,
    Shards,
    Span,
)

# the cache folder also holds what fine-tuning keeps (tlsweep.winner), apart from the entries
FINETUNE_DIR = "finetune"  # <cache_dir>/finetune/<stage>/: resumable checkpoints
IMAGES_DIR = "images"  # <cache_dir>/images/<size>px-<key>/: decoded images

log = logging.getLogger(__name__)

STAT_INDEX_PREFIX = "stat-index-"  # a file in the cache folder per data folder
WAIT_POLL = 0.5  # seconds between looks at shards other workers are extracting
WAIT_LOG_EVERY = 30.0  # seconds between two "waiting for shards" lines


class FeatureCache:
    """The cache folder: lookup, extraction with publication, listing and clearing."""

    def __init__(self, cache_dir: str | Path, verify: bool = False):
        self.dir = Path(cache_dir)
        self.verify = verify  # check every entry's feature checksum (once per process)
        self._verified: set[Path] = set()

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
        """:func:`~tlsweep.images._digests.content_digest` through this cache's stat index of the
        folder."""
        self._mkdir()
        return content_digest(images, index=self.stat_index(images.root), verify=verify)

    def lookup(self, bb: BackboneConfig, key: str) -> Entry | None:
        path = self.dir / entry_name(bb, key)
        entry = read_entry(path, key, verify=self.verify and path not in self._verified)
        if entry is not None and self.verify:
            self._verified.add(path)
        return entry

    def entries(self) -> list[Entry]:
        if not self.dir.is_dir():
            return []
        out = []
        for p in sorted(self.dir.iterdir()):
            if p.is_dir() and ".tmp-" not in p.name:
                e = read_entry(p)
                if e is not None:
                    out.append(e)
        return out

    def clear(self, match: str | None = None) -> list[str]:
        """Remove feature entries (all, or those whose name contains ``match``) and leftovers,
        and without ``match`` the data folders' stat indexes; never fine-tuning stages or
        decoded images (``clear_side``), nor what a live process holds (an extraction: its
        lock, temporary or shard folder), which is logged."""
        removed: list[str] = []
        if not self.dir.is_dir():
            return removed
        for p in sorted(self.dir.iterdir()):
            if (match and match not in p.name) or p.name in (FINETUNE_DIR, IMAGES_DIR):
                continue
            if p.is_dir():
                name = p.name.split(".tmp-")[0].removesuffix(SHARDS_SUFFIX)
                lock, entry = self.dir / f"{name}.lock", p.name == name
                if p.name.endswith(SHARDS_SUFFIX):  # unless a worker extracts its shards
                    busy = not Shards(self.dir, name).remove_if_abandoned()
                else:
                    busy = in_progress(p, lock_held(lock)) if ".tmp-" in p.name else False
                    busy = busy or (entry and lock_held(lock))
                if busy:
                    log.warning("%s: in use by %s; left alone", p.name, lock_holder(lock))
                    continue
                shutil.rmtree(p, ignore_errors=True)
                if entry:
                    removed.append(p.name)
            elif (p.suffix == ".lock" and not lock_held(p)) or (
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
        machine that asks for a missing entry meanwhile (other machines on the same cache
        folder) takes shards of it; on one machine one process extracts it and the others
        (``run --workers N``) wait (see :class:`Shards`); an entry another process published
        is returned as cached.
        """
        digest = images_digest or self.images_digest(images)
        out: list[tuple[Entry, bool] | None] = [None] * len(backbones)
        jobs: list[tuple[int, Job]] = []
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
                jobs.append((k, Job(bb, parts, key, name, progress[k] if progress else None)))
        if jobs:
            self._mkdir()
            todo: list[tuple[int, Job]] = []
            try:
                for k, job in jobs:
                    hit = self._start(job)
                    if hit is not None:
                        out[k] = (hit, True)
                    else:
                        todo.append((k, job))
                if todo:
                    done = self._extract([job for _, job in todo], images)
                    for _, job in todo:
                        job.shards.release_machine()
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

    def _start(self, job: Job) -> Entry | None:
        """Under the entry's lock: the entry if another worker published it meanwhile; else
        make its shard folder (abandoned temporary folders removed, a damaged entry replaced)."""
        with entry_lock(self.dir, job.name):
            hit = self.lookup(job.bb, job.key)
            if hit is not None:
                log.info("cache hit: %s (extracted by another worker)", job.name)
                return hit
            for stale in self.dir.glob(f"{job.name}.tmp-*"):
                if not in_progress(stale, locked=False):  # we hold the lock; others'
                    shutil.rmtree(stale, ignore_errors=True)
            final = self.dir / job.name
            if final.exists():  # a damaged entry: never used, replaced
                log.warning("replacing damaged cache entry %s", job.name)
                shutil.rmtree(final, ignore_errors=True)
            job.shards = Shards(self.dir, job.name)
            job.shards.dir.mkdir(exist_ok=True)
        return None

    def _extract(self, jobs: list[Job], images: ImageSet) -> list[tuple[Entry, bool]]:
        """Take and extract shards of the ``jobs``' entries until every shard is written, then
        assemble and publish each entry (unless another worker did); (entry, was_cached)."""
        plan = RowPlan.of(images)
        spans = plan.spans
        for job in jobs:
            job.plan_views(len(plan.paths), [images.files[i].split for i in plan.order])
        results: dict[str, tuple[Entry, bool]] = {}
        waiting_since: float | None = None
        last_log = 0.0
        for job in jobs:
            job.together = len(jobs)
        while len(results) < len(jobs):
            left = [job for job in jobs if job.name not in results]
            held: list[tuple[Job, Span, str]] = []
            for job in left:
                state = self._state(job, spans)
                if isinstance(state, Entry):
                    log.info("cache hit: %s (extracted by another worker)", job.name)
                    results[job.name] = (state, True)
                elif state:
                    held += [(job, span, owner) for span, owner in state.items()]
                elif not any(job.shards.claimable(span) for span in spans):
                    made = assemble(self.dir, job, plan)
                    if made is not None:
                        results[job.name] = made
            left = [job for job in left if job.name not in results]
            # One extractor per machine and entry: another process of this machine extracting
            # it (with every core) is waited for, and taken over as soon as it is gone.
            mine = [job for job in left if job.shards.take_machine()]
            held += [
                (job, (0, 0), job.shards.machine_extractor() or "?")
                for job in left
                if job not in mine
            ]
            if any(job.shards.claimable(s) for job in mine for s in spans):
                extract_shards(self.dir, mine, plan)
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
                        "waiting for %s, being extracted by %s (%.0fs so far); a claim of "
                        "another machine not refreshed for %gs is taken over",
                        ", ".join(sorted({job.name for job, _, _ in held})),
                        ", ".join(owners),
                        now - waiting_since,
                        CLAIM_STALE_AFTER,
                    )
                time.sleep(WAIT_POLL)
        return [results[job.name] for job in jobs]

    def _state(self, job: Job, spans: list[Span]) -> Entry | dict[Span, str] | None:
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

    def _abandon(self, job: Job) -> None:
        """After an error or Ctrl-C: written shards are kept for the next extraction (as after
        ``kill -9``); a shard folder with none, and no live claim, is removed."""
        job.shards.release_machine()
        with (
            contextlib.suppress(OSError, TlsweepError),
            held_lock(self.dir / f"{job.name}.lock", f"extracting {job.name}", 5.0),
        ):
            d = job.shards.dir
            if d.is_dir() and not any(d.glob("*.npz")) and not job.shards.any_live():
                shutil.rmtree(d, ignore_errors=True)


@dataclass
class Extraction:
    """The entries a sweep needs, found before any is extracted (:func:`plan_extraction`).

    Its steps are called in order by the caller (:mod:`tlsweep.sweep`): :meth:`expected` to
    refuse a study made on other features before minutes of extraction, :meth:`ready` to tell
    whether every entry exists (``run --workers N`` starts its workers on the shards when not,
    and waits for them), then :meth:`extract` for whatever is still missing.
    """

    backbones: list[BackboneConfig]  # resolved against the registry, in sweep-file order
    images: ImageSet
    cache: FeatureCache
    digest: str  # the images' content digest, part of every key

    @property
    def plain(self) -> list[BackboneConfig]:
        """Every entry that must exist, fused backbones' members included, extracted together
        (one decode of each image for all of them); a fused backbone joins its members'."""
        plain: list[BackboneConfig] = []
        for bb in self.backbones:
            for m in bb.members or (bb,):
                if m not in plain:
                    plain.append(m)
        return plain

    def expected(self) -> dict[str, Any]:
        """:func:`study_keys`' view of the entries (label -> key and key parts), before
        anything is extracted (a missing ImageNet file is downloaded: its bytes are in the key)."""
        return {bb.label: _expected(bb, self.digest) for bb in self.backbones}

    @functools.cached_property
    def _keys(self) -> list[tuple[BackboneConfig, str]]:
        return [(bb, cache_key(key_parts(bb, self.digest))) for bb in self.plain]

    def ready(self) -> bool:
        """Whether every entry exists now."""
        return all(self.cache.lookup(bb, key) is not None for bb, key in self._keys)

    def extract(
        self, progress: Callable[[BackboneConfig], Progress | None] | None = None
    ) -> list[tuple[BackboneConfig, Entry, bool]]:
        """Make sure every entry exists; (resolved backbone, entry, was_cached) per backbone,
        in sweep-file order."""
        plain = self.plain
        done = self.cache.ensure_many(
            plain, self.images, self.digest, [progress(bb) for bb in plain] if progress else None
        )
        out = []
        for bb in self.backbones:
            if bb.members:
                from ._fusion import fuse_entries

                got = [done[plain.index(m)] for m in bb.members]
                entry, cached = fuse_entries(bb, [e for e, _ in got]), all(c for _, c in got)
            else:
                entry, cached = done[plain.index(bb)]
            report_skipped(entry)
            check_usable(entry)
            out.append((bb, entry, cached))
        return out


def plan_extraction(cfg: SweepConfig) -> Extraction:
    """Find the images once and digest them (through the cache's stat index)."""
    images = find_images(cfg.data)
    cache = FeatureCache(cfg.cache_dir, verify=cfg.data.verify)
    digest = cache.images_digest(images, verify=cfg.data.verify)
    return Extraction(list(cfg.backbones), images, cache, digest)


def extract_all(
    cfg: SweepConfig, progress: Callable[[BackboneConfig], Progress | None] | None = None
) -> list[tuple[BackboneConfig, Entry, bool]]:
    """Make sure every configured backbone's entry exists (:func:`plan_extraction`, then
    :meth:`Extraction.extract`)."""
    return plan_extraction(cfg).extract(progress)


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
    joined members, as :func:`tlsweep.features._fusion.fuse_entries` keys it); None when an ImageNet
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
