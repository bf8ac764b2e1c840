"""What ``run`` does with the audit: warn when validation or test images copy training images,
and with ``data.dedupe: eval`` leave those copies out of validation and test."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from tlsweep.config import SweepConfig

from ._report import EVAL_SPLITS, AuditReport, find_copies

log = logging.getLogger(__name__)


def eval_copies(
    cfg: SweepConfig, entries: list[tuple[Any, Any, bool]]
) -> tuple[list[tuple[Any, Any, bool]], AuditReport]:
    """(the entries, the copies found: ``copies_of_train`` of the report lists the validation
    and test images that are exact or near copies of a training image). With
    ``data.dedupe: eval`` the entries returned leave those images out of their validation and
    test splits (the cache is not touched)."""
    from tlsweep.features import FeatureCache
    from tlsweep.images import file_digests, find_images

    images = find_images(cfg.data)
    # the stat index extract_all has just brought up to date: nothing is hashed again
    digests = file_digests(images, index=FeatureCache(cfg.cache_dir).stat_index(images.root))
    report = find_copies(images, digests, entries[0][1])
    copies = report.copies_of_train
    if cfg.data.dedupe != "eval" or not any(copies.values()):
        return entries, report
    drop = {p for s in EVAL_SPLITS for p in copies.get(s, [])}
    kept = [(bb, without(e, drop), cached) for bb, e, cached in entries]
    report.split_sizes = kept[0][1].split_sizes()
    return kept, report


def warn_copies(cfg: SweepConfig, report: AuditReport) -> dict[str, int]:
    """One warning per split that holds copies of training images; their counts."""
    counts = {s: len(report.copies_of_train.get(s, [])) for s in EVAL_SPLITS}
    for split, n in counts.items():
        if not n:
            continue
        what = (
            "images are copies of training images"
            if n != 1
            else "image is a copy of a training image"
        )
        log.warning(
            "%d %s %s: the %s score may be inflated%s",
            n,
            split,
            what,
            split,
            " (left out: data.dedupe: eval)"
            if cfg.data.dedupe == "eval"
            else "; set data.dedupe: eval to leave them out, 'tlsweep audit' lists them",
        )
    return counts


def scored_entries(cfg: SweepConfig, study: Any) -> list[tuple[Any, Any, bool]] | None:
    """What ``best`` and ``export`` score the winner on: with ``data.dedupe: eval`` the entries
    without the copies, as ``run`` scored it (checked against the study's data first); None
    otherwise (they extract as they always have)."""
    if cfg.data.dedupe != "eval":
        return None
    from tlsweep.features import plan_extraction
    from tlsweep.study import check_data

    extraction = plan_extraction(cfg)
    check_data(cfg, study, extraction.expected())  # before anything is extracted
    return eval_copies(cfg, extraction.extract())[0]


def without(entry: Any, paths: set[str]) -> Any:
    """A view of cache ``entry`` (an Entry or a fused one) without the files of ``paths``: the
    same key and rows, fewer files."""
    manifest = dict(entry.manifest)
    manifest["files"] = [f for f in entry.manifest["files"] if f["path"] not in paths]
    return dataclasses.replace(entry, manifest=manifest)
