"""A first sweep file for an image folder (``tlsweep init``): the settings a newcomer should start
from (:func:`plan`, each with its reason) and the short, commented YAML that runs as written
(:func:`render`).

What the folder holds comes from :func:`tlsweep.images.survey` and reaches this module through
the :class:`SurveyFacts` Protocol (the images package sits above the config); the backbones with
ImageNet weights in the Keras cache from :func:`tlsweep.backbones.cached_backbones`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tlsweep.backbones import CachedWeights, get_spec

IMBALANCE_RATIO = 3.0  # the largest class at least this many times the smallest: balanced
SMALL_TRAINING_SET = 600  # fewer training images than this: each trial scored on folds of them
CV_FOLDS = 5
SIZES = (96, 128, 160, 192, 224)  # the input sizes init picks from (every MobileNet takes them)
MAX_BACKBONES = 2
EPOCHS = 20
STUDY_TARGET_S = 600.0  # the trial budget aims at a study of about ten minutes on this machine
MIN_TRIALS, MAX_TRIALS, DEFAULT_TRIALS = 10, 50, 30
# Without ImageNet weights in the Keras cache: two small backbones, downloaded once (~25 MB).
DOWNLOAD_DEFAULTS = ("MobileNetV2", "EfficientNetB0")


class SurveyFacts(Protocol):
    """What planning and rendering read of a folder's survey (``tlsweep.images.Survey``)."""

    @property
    def root(self) -> Path: ...
    @property
    def layout(self) -> str: ...
    @property
    def class_names(self) -> list[str]: ...
    @property
    def counts(self) -> dict[str, int]: ...
    @property
    def split_counts(self) -> dict[str, int]: ...
    @property
    def typical_size(self) -> tuple[int, int]: ...
    @property
    def unreadable(self) -> list[tuple[str, str]]: ...
    @property
    def imbalance(self) -> float: ...


@dataclass
class Plan:
    """The settings a first sweep of a folder starts from, each with the reason it was chosen."""

    study: str
    # name, weights ("imagenet" or a file), input_size, args, file (the cached weights or None)
    backbones: list[dict[str, Any]]
    offline: bool  # every backbone's weights are on this machine already
    class_weight: str
    metric: str
    cv_folds: int | None
    n_trials: int = DEFAULT_TRIALS
    epochs: int = EPOCHS
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Timing:
    """Times measured on this machine, and what they predict for the whole sweep."""

    images_measured: int
    extraction_s: float  # every backbone, every image, once (cached after)
    seconds_per_trial: float
    study_s: float


def input_size_for(typical: tuple[int, int], min_size: int = 32) -> int:
    """The largest of :data:`SIZES` no larger than the images' short side (upscaling adds no
    detail, only cost), at least the smallest of them and the backbone's minimum."""
    fits = [s for s in SIZES if s <= min(typical)]
    return max(fits[-1] if fits else SIZES[0], min_size)


def trial_budget(seconds_per_trial: float) -> int:
    """The trials that fit in about :data:`STUDY_TARGET_S` here, within 10..50."""
    return int(min(MAX_TRIALS, max(MIN_TRIALS, STUDY_TARGET_S // max(seconds_per_trial, 1e-3))))


def plan(s: SurveyFacts, cached: Sequence[CachedWeights], *, study: str) -> Plan:
    """Decide a first sweep for the folder surveyed in ``s``."""
    notes: list[str] = []
    backbones: list[dict[str, Any]] = []
    for c in cached[:MAX_BACKBONES]:
        spec = get_spec(c.name)
        size = (
            spec.default_size
            if spec.fixed_size_with_imagenet
            else input_size_for(s.typical_size, spec.min_size)
        )
        weights = "imagenet" if c.loads_by_name(size) else str(c.path)
        backbones.append(
            {"name": c.name, "weights": weights, "input_size": size, "args": c.args, "file": c.path}
        )
    offline = bool(backbones)
    if offline:
        notes.append(
            f"{len(cached)} backbone(s) with ImageNet weights in the Keras cache; using the "
            f"{len(backbones)} smallest, so it runs offline"
        )
    else:
        size = input_size_for(s.typical_size)
        backbones = [
            {"name": n, "weights": "imagenet", "input_size": size, "args": {}, "file": None}
            for n in DOWNLOAD_DEFAULTS
        ]
        notes.append("no ImageNet weights in the Keras cache: the first run downloads them once")
    imbalanced = s.imbalance >= IMBALANCE_RATIO
    if imbalanced:
        notes.append(
            f"imbalanced classes (largest {s.imbalance:.1f}x the smallest): class_weight "
            "balanced, scored by val_balanced_accuracy (accuracy rewards the majority class)"
        )
    n_train = s.split_counts.get("train", 0)
    cv = CV_FOLDS if n_train < SMALL_TRAINING_SET else None
    if cv:
        notes.append(f"{n_train} training images: each trial is scored on {cv} folds of them")
    return Plan(
        study=study,
        backbones=backbones,
        offline=offline,
        class_weight="balanced" if imbalanced else "none",
        metric="val_balanced_accuracy" if imbalanced else "val_accuracy",
        cv_folds=cv,
        notes=notes,
    )


def duration(seconds: float) -> str:
    """``40 s``, ``12 min``, ``2.5 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def _near(path: Path | str, sweep_file: Path) -> str:
    """``path`` relative to the sweep file when close by (it moves with it), else absolute."""
    target, here = Path(path).resolve(), sweep_file.resolve().parent
    if os.path.commonpath([target, here]) == os.path.sep:  # nothing in common but the root
        return str(target)
    rel = os.path.relpath(target, here)
    return str(target) if rel.startswith(os.path.join("..", "..", "..")) else rel


def _flow(args: Mapping[str, Any]) -> str:
    return "{" + ", ".join(f"{k}: {json.dumps(v)}" for k, v in args.items()) + "}"


def render(s: SurveyFacts, p: Plan, t: Timing | None, out: Path) -> str:
    """The sweep file's text: short, commented, valid as written (paths relative to ``out``)."""
    counts = ", ".join(f"{c} {n}" for c, n in s.counts.items())
    test = "/test" if s.split_counts.get("test") else ""
    layout = f"train/validation{test}" if s.layout == "A" else "one folder per class"
    w, h = s.typical_size
    lines = [
        f"# Written by `tlsweep init` for {s.root}: {len(s.class_names)} classes ({counts});",
        f"# layout {s.layout} ({layout}), typical image {w}x{h} px"
        + (f", {len(s.unreadable)} unreadable file(s) skipped" if s.unreadable else "")
        + ".",
        *(f"# {n}." for n in p.notes),
    ]
    if t is not None:
        lines.append(
            f"# Measured here on {t.images_measured} images: extraction about "
            f"{duration(t.extraction_s)} (once, cached after), the study about "
            f"{duration(t.study_s)} ({p.n_trials} trials, ~{t.seconds_per_trial:.1f} s each)."
        )
    # a folder or class name may hold any character, a line break too: a comment stays one line
    lines = ["# " + " ".join(line[1:].split()) for line in lines]
    lines += [
        f"# Run it: tlsweep run {out.name}; compare the trials: tlsweep ui {out.name}.",
        "# Every key and its default: the sweep-file reference in tlsweep's README.",
        f"study: {json.dumps(p.study)}",
        "data:",
        f"  dir: {json.dumps(_near(s.root, out))}",
        "backbones:",
    ]
    for b in p.backbones:
        # a file of the Keras cache: machine-wide, not the project's, so absolute
        weights = b["weights"]
        if weights not in ("imagenet", "none"):
            weights = str(Path(weights).resolve())
        lines += [
            f"  - name: {b['name']}",
            f"    weights: {json.dumps(weights)}",
            f"    input_size: {b['input_size']}",
            "    pooling: avg",
        ]
        if b["args"]:
            lines.append(f"    args: {_flow(b['args'])}")
    lines += ["search:", f"  n_trials: {p.n_trials}", f"  metric: {p.metric}"]
    if p.class_weight != "none":
        lines.append(f"  class_weight: {p.class_weight}")
    if p.cv_folds:
        lines.append(f"  cv_folds: {p.cv_folds}")
    lines += [
        "  space:",
        "    units:         {low: 32, high: 1024, log: true}",
        "    dropout:       {low: 0.0, high: 0.7}",
        "    learning_rate: {low: 1.0e-4, high: 1.0e-2, log: true}",
        "    batch_size:    {choices: [32, 64, 128]}",
        f"    epochs:        {p.epochs}",
    ]
    return "\n".join(lines) + "\n"


def check_output(out: Path, *, force: bool) -> None:
    """Refuse, before any work, a sweep file that exists (without ``force``) or whose folder
    does not."""
    from tlsweep.errors import ConfigError

    if out.is_dir():
        raise ConfigError(f"-o {out}: is a folder; give a file name, e.g. -o {out / 'sweep.yaml'}")
    if out.exists() and not force:
        raise ConfigError(f"-o {out}: the file exists; pass --force to replace it")
    if not out.parent.is_dir():
        raise ConfigError(f"-o {out}: no folder {out.parent}; create it first")


def write_new(out: Path, text: str, *, force: bool) -> None:
    """Write ``text`` to ``out`` whole or not at all; an existing file only with ``force``."""
    import tempfile

    import yaml

    yaml.safe_load(text)  # the file runs as written, or nothing is written (a bug, not input)

    from tlsweep.errors import ConfigError

    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        if force:
            os.replace(tmp, out)
        else:
            try:
                os.link(tmp, out)  # fails if another process made the file meanwhile
            except FileExistsError:
                msg = f"-o {out}: the file exists; pass --force to replace it"
                raise ConfigError(msg) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
