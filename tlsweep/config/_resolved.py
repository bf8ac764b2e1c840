"""The resolved sweep: a record of what ran, and what changed when a study is resumed.

:func:`resolved_record` is the sweep as it runs (every default filled in, every override
applied, passwords in URLs replaced) with the versions of the libraries that ran it; a study
stores it and MLflow logs it as a sweep file (:func:`resolved_yaml`) that loads back to the
same configuration. :func:`changes` lists, one line each, the settings that differ between two
records (a resumed study's overrides).

This module imports neither TensorFlow, Optuna nor MLflow.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import yaml

from ._schema import FUSED_NAME, SweepConfig
from ._urls import redact_url


def resolved(cfg: SweepConfig) -> dict[str, Any]:
    """The sweep as it runs: a sweep file with every default filled in and every override applied.

    Loading it back (:func:`~tlsweep.config._sweepfile.load_sweep`) gives the same configuration;
    passwords in URLs are replaced by ``***``. With the versions that ran it, it is what
    :func:`resolved_yaml` writes.
    """
    d = cfg.to_json()
    d.pop("path")
    d["backbones"] = [_backbone_entry(bb) for bb in d["backbones"]]
    d["search"]["space"] = {n: p.to_sweep() for n, p in cfg.search.space.items()}
    d["storage"] = redact_url(d["storage"])
    if d["tracking_uri"] is not None:
        d["tracking_uri"] = redact_url(d["tracking_uri"])
    return d


def _backbone_entry(bb: dict[str, Any]) -> dict[str, Any]:
    """A resolved backbone as a sweep file's entry (a fused one as ``{fuse: [...]}``)."""
    bb.pop("weights_tag", None)  # derived from the weights file's name when two clash
    if bb.get("augment", 0) is None:
        bb.pop("augment")  # absent from a sweep file without it, as it was before it existed
    members = bb.pop("members", None)
    if members:
        return {FUSED_NAME: [_backbone_entry(m) for m in members]}
    return bb


def versions() -> dict[str, str]:
    """tlsweep's version and those of the libraries that decide its results."""
    from tlsweep.versions import versions as installed

    return installed()


def resolved_record(cfg: SweepConfig) -> dict[str, Any]:
    """What a study stores and MLflow logs: the resolved sweep and the versions that ran it."""
    return {"versions": versions(), "sweep": resolved(cfg)}


def resolved_yaml(record: Mapping[str, Any]) -> str:
    """A :func:`resolved_record` as a sweep file, its versions as a comment on top."""
    head = ", ".join(f"{k} {v}" for k, v in record["versions"].items())
    return f"# the resolved sweep, every default filled in ({head})\n" + yaml.safe_dump(
        dict(record["sweep"]), sort_keys=False, default_flow_style=None
    )


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, Mapping):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(d, list) and any(isinstance(v, (Mapping, list)) for v in d):
        out = {}
        for i, v in enumerate(d):
            out.update(_flatten(v, f"{prefix}[{i}]"))
        return out
    return {prefix: d}


def changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """One ``key: old -> new`` line per setting that differs between two resolved records."""
    a, b = _flatten(old), _flatten(new)
    missing = "(unset)"
    return [
        f"{k.removeprefix('sweep.')}: {a.get(k, missing)!r} -> {b.get(k, missing)!r}"
        for k in sorted(set(a) | set(b), key=lambda k: (k not in a, k))
        if a.get(k, missing) != b.get(k, missing)
    ]
