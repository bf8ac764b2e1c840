"""Fused backbones: the concatenation of several cached feature sets, offered as one backbone.

A ``fuse:`` entry in the sweep file lists two or more backbones. Its features are its members'
cached features side by side, row for row: nothing is extracted beyond the members' own cache
entries, and the fused view is built in memory when the study starts. The members' manifests
must describe the same images (same folder, class names, and for every file the same label and
split); a file one member skipped is left out of the fused view (the intersection of the rows).

The exported model of a fused winner runs every member on the same image
(:func:`tlsweep.winner._export.build_export_model`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tlsweep.config import BackboneConfig
from tlsweep.errors import TlsweepError

from ._entries import Entry, ManifestFields


@dataclass
class FusedEntry(ManifestFields):
    """A read-only view with the interface of :class:`tlsweep.features._entries.Entry`."""

    backbone: BackboneConfig
    members: list[Entry]  # in the fuse: order
    manifest: dict[str, Any]
    _rows: list[np.ndarray] = field(default_factory=list)  # per member: its row of each file
    _features: np.ndarray | None = None

    @property
    def path(self) -> Path:
        return self.members[0].path  # where messages point (the first member's entry)

    def features(self) -> np.ndarray:
        """All fused rows, [files, sum of the members' feature sizes], float32 (in memory)."""
        if self._features is None:
            self._features = np.concatenate(
                [
                    np.asarray(m.features()[rows])
                    for m, rows in zip(self.members, self._rows, strict=True)
                ],
                axis=1,
            ).astype(np.float32, copy=False)
        return self._features

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(features, labels) of one split, in file order; empty arrays if the split is empty."""
        files = self.manifest["files"]
        idx = np.array([f["row"] for f in files if f["split"] == name], dtype=np.int64)
        labels = np.array([f["label"] for f in files if f["split"] == name], dtype=np.int64)
        feats = self.features()
        if len(idx) == 0:
            return np.zeros((0, feats.shape[1]), np.float32), np.zeros((0,), np.int64)
        return feats[idx], labels

    def views(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """As :meth:`split`: a fused backbone has no augmented views (its members take none)."""
        return self.split(name)

    def split_sizes(self) -> dict[str, int]:
        out = {"train": 0, "validation": 0, "test": 0}
        for f in self.manifest["files"]:
            out[f["split"]] += 1
        return out


def fuse_entries(bb: BackboneConfig, members: list[Entry]) -> FusedEntry:
    """The fused view of ``members`` (cache entries of ``bb.members``, in the same order)."""
    first = members[0].manifest
    where = f"{bb.label}"
    for m in members[1:]:
        mm = m.manifest
        for what in ("data_dir", "class_names"):
            if mm[what] != first[what]:
                raise TlsweepError(
                    f"{where}: the members' cache entries disagree on {what} "
                    f"({first[what]!r} vs {mm[what]!r}); extract them from the same data"
                )
    by_path = [{f["path"]: f for f in m.manifest["files"]} for m in members]
    files, rows = [], [[] for _ in members]
    for f in first["files"]:  # the first member's file order
        found = [d.get(f["path"]) for d in by_path]
        if any(g is None for g in found):
            continue  # a member skipped this file: it is left out of the fused view
        for g in found[1:]:
            if (g["label"], g["split"]) != (f["label"], f["split"]):
                raise TlsweepError(
                    f"{where}: {f['path']}: the members' cache entries disagree on its label or "
                    f"split ({f['label']}/{f['split']} vs {g['label']}/{g['split']}); extract "
                    "them with the same data settings"
                )
        for r, g in zip(rows, found, strict=True):
            r.append(g["row"])
        files.append(
            {"path": f["path"], "label": f["label"], "split": f["split"], "row": len(files)}
        )
    if not files:
        raise TlsweepError(f"{where}: the members' cache entries have no image in common")
    skipped: dict[str, str] = {}
    for m in members:
        for s in m.manifest["skipped"]:
            skipped.setdefault(s["path"], s["reason"])
    kept = {f["path"] for f in files}
    for d in by_path:  # files a member has but another skipped without a reason on record
        for p in d:
            if p not in kept:
                skipped.setdefault(p, "skipped by another member of the fused backbone")
    keys = [m.key for m in members]
    dim = sum(int(m.manifest["shape"][1]) for m in members)
    manifest = {
        "key": hashlib.sha256(json.dumps({"fuse": keys}).encode()).hexdigest(),
        "key_parts": {"fuse": keys},
        "name": bb.label,
        "backbone": {
            "name": bb.name,
            "label": bb.label,
            "members": [m.manifest["backbone"] for m in members],
        },
        "shape": [len(files), dim],
        "dtype": "float32",
        "data_dir": first["data_dir"],
        "layout": first.get("layout"),
        "class_names": first["class_names"],
        "files": files,
        "skipped": [{"path": p, "reason": r} for p, r in sorted(skipped.items())],
        "ignored": first.get("ignored", []),
        "timings": {},
    }
    rows_arr = [np.asarray(r, dtype=np.int64) for r in rows]
    return FusedEntry(bb, list(members), manifest, rows_arr)


CachedEntry = Entry | FusedEntry  # what a backbone's features come from: one entry, or fused
