"""One audit of a data folder from a cache entry: what it found, as JSON, and the copies of
training images among the validation and test images."""

from __future__ import annotations

import json
import logging
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._dupes import NEAR_THRESHOLD, exact_duplicates, near_duplicates
from ._labels import label_issues, out_of_fold_proba

log = logging.getLogger(__name__)

EVAL_SPLITS = ("validation", "test")


@dataclass
class AuditReport:
    """What ``tlsweep audit`` found; paths relative to the data folder."""

    data_dir: str
    backbone: str
    threshold: float
    images: int
    exact_duplicates: list[dict[str, Any]]
    near_duplicates: list[dict[str, Any]]
    label_issues: list[dict[str, Any]] = field(default_factory=list)
    head: dict[str, Any] = field(default_factory=dict)  # the parameters that scored labels
    copies_of_train: dict[str, list[str]] = field(default_factory=dict)
    split_of: dict[str, str] = field(default_factory=dict, repr=False)  # path -> split
    cache_key: str = ""  # of the entry the features came from
    split_sizes: dict[str, int] = field(default_factory=dict)  # images scored per split
    class_of: dict[str, str] = field(default_factory=dict, repr=False)  # path -> class name

    def counts(self) -> dict[str, int]:
        ex = self.exact_duplicates
        return {
            "images": self.images,
            "exact_groups": len(ex),
            "exact_files": sum(len(g["files"]) for g in ex),
            "exact_cross_split": sum(len(g["splits"]) > 1 for g in ex),
            "exact_cross_class": sum(len(g["classes"]) > 1 for g in ex),
            "near_pairs": len(self.near_duplicates),
            "label_issues": len(self.label_issues),
            **{f"{s}_copies_of_train": len(v) for s, v in self.copies_of_train.items()},
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "data_dir": self.data_dir,
            "backbone": self.backbone,
            "near_threshold": self.threshold,
            "head": self.head,
            "counts": self.counts(),
            "exact_duplicates": self.exact_duplicates,
            "near_duplicates": self.near_duplicates,
            "label_issues": self.label_issues,
            "copies_of_train": self.copies_of_train,
        }

    def write_json(self, path: str | Path) -> None:
        """Write the report to ``path``, replacing it atomically (temporary file, rename)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.part")
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(tmp, "w") as f:
                json.dump(self.to_json(), f, indent=1)
                f.write("\n")
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()


def copies_of_train(
    exact: list[dict[str, Any]], near: list[dict[str, Any]], split_of: dict[str, str]
) -> dict[str, list[str]]:
    """The validation and test images that are exact or near copies of a training image."""
    out: dict[str, set[str]] = {s: set() for s in EVAL_SPLITS}
    for g in exact:
        if "train" in g["splits"]:
            for p in g["files"]:
                if split_of.get(p) in out:
                    out[split_of[p]].add(p)
    for pair in near:
        if split_of.get(pair["a"]) == "train" and split_of.get(pair["b"]) in out:
            out[split_of[pair["b"]]].add(pair["b"])
    return {s: sorted(v) for s, v in out.items()}


def find_copies(
    images: Any, digests: list[str], entry: Any, threshold: float = NEAR_THRESHOLD
) -> AuditReport:
    """Exact and near duplicates of ``images`` (``digests``: their SHA-256, in order) from the
    features of cache ``entry``; no label scoring."""
    exact = exact_duplicates(images.files, digests, images.class_names)
    digest_of = {f.path: d for f, d in zip(images.files, digests, strict=True)}
    files = entry.manifest["files"]
    near = near_duplicates(entry.features(), files, digest_of, threshold)
    split_of = {f.path: f.split for f in images.files}
    return AuditReport(
        data_dir=str(images.root),
        backbone=entry.manifest.get("backbone", {}).get("label", ""),
        threshold=threshold,
        images=len(images.files),
        exact_duplicates=exact,
        near_duplicates=near,
        copies_of_train=copies_of_train(exact, near, split_of),
        split_of=split_of,
        cache_key=entry.key,
        split_sizes=entry.split_sizes(),
        class_of={f.path: images.class_names[f.label] for f in images.files},
    )


def audit_entry(
    images: Any,
    digests: list[str],
    entry: Any,
    params: Any,
    threshold: float = NEAR_THRESHOLD,
) -> AuditReport:
    """:func:`find_copies`, and the likely label errors of the training and validation images
    from heads of ``params`` (a :class:`~tlsweep.head.HeadParams`) trained out of fold."""
    from dataclasses import asdict

    report = find_copies(images, digests, entry, threshold)
    files = [f for f in entry.manifest["files"] if f["split"] in ("train", "validation")]
    rows = np.array([f["row"] for f in files], np.int64)
    y = np.array([f["label"] for f in files], np.int64)
    x = np.asarray(entry.features()[rows], np.float32)
    try:
        proba = out_of_fold_proba(x, y, len(entry.class_names), params)
    except ValueError as e:  # a class with a single labelled image: nothing to hold out
        log.warning("labels not scored: %s", e)
        return report
    report.label_issues = label_issues([f["path"] for f in files], y, proba, entry.class_names)
    report.head = asdict(params)
    return report
