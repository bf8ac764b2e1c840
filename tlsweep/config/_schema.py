"""The sweep file's schema and every default, written once.

Every default lives in this module, once (the head's search space in :mod:`tlsweep.config._params`,
where each head parameter is declared); the CLI reads them from here. The schema is the frozen
dataclasses below, whose field defaults are the defaults of the sweep file's keys.
:func:`tlsweep.config._sweepfile.load_sweep` reads and validates a sweep file into a
:class:`SweepConfig`; the resolved record (``_resolved``) keeps the configuration that ran.

This module imports neither TensorFlow, Optuna nor MLflow.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from tlsweep.errors import ConfigError

from ._params import Param, grid_values

# --- every default, in one place ---------------------------------------------------------------
DEFAULT_CACHE_DIR = ".tlsweep/cache"  # relative to the working directory
DEFAULT_STORAGE = "sqlite:///tlsweep.db"  # relative to the sweep file
DEFAULT_VALIDATION_SPLIT = 0.2  # layout B only
DEFAULT_TEST_SPLIT = 0.1  # layout B only
DEFAULT_VERIFY = False  # True: re-read every image for the cache key, not trusting the stat index
# "eval": drop validation and test images that copy a training image (tlsweep audit finds them)
DEDUPE_CHOICES = ("off", "eval")
DEFAULT_DEDUPE = "off"
DEFAULT_SEED = 1337
DEFAULT_POOLING = "avg"
DEFAULT_WEIGHTS = "imagenet"
DEFAULT_UI_HOST = "127.0.0.1"  # tlsweep ui binds here: this machine only unless asked
DEFAULT_UI_PORT = 5000  # tlsweep ui: MLflow's own default port
DEFAULT_UI_START_TIMEOUT = 120.0  # seconds tlsweep ui waits for the MLflow server to answer
DEFAULT_N_TRIALS = 40
# the trial states that count towards n_trials (read by the study and by the tracking of runs)
FINISHED = ("COMPLETE", "PRUNED")
DEFAULT_SAMPLER = "tpe"
DEFAULT_PRUNER = "median"
DEFAULT_METRIC = "val_accuracy"
DEFAULT_HEARTBEAT_INTERVAL = 5  # seconds between a running trial's heartbeats
DEFAULT_GRACE_PERIOD = 30  # seconds without a heartbeat before a trial is taken as dead
DEFAULT_MAX_RETRY = 3  # how often the parameters of a trial killed mid-way are retried
# the pruners' settings, and the strides that keep the seeds drawn from search.seed apart
MEDIAN_STARTUP_TRIALS = 5  # median pruner: trials finished before it prunes any
MEDIAN_WARMUP_STEPS = 3  # median pruner: epochs of a trial before it may be pruned
HYPERBAND_MIN_RESOURCE = 1  # hyperband: fewest epochs a trial runs (most: the largest epochs)
WORKER_SEED_STRIDE = 7919  # a prime: worker w's sampler seed is seed + w * this + trials so far
REPEAT_SEED_STRIDE = 1  # repeat r of a trial trains its head with seed + r * this
DROPOUT_SEED_STRIDE = 7919  # hidden layer i's dropout: the step's seed + (0, i * this)
INIT_SEED_OFFSET = 1000  # layer i's initial weights: stateless seed (seed, this + i)
VIEW_SEED_OFFSET = 1 << 20  # epoch e's choice of views: seed (seed, this + e), apart from dropout
FINETUNE_SHUFFLE_STRIDE = 1000  # fine-tuning's epoch e shuffles the images with seed * this + e
# seconds a command waits for a file lock another process holds (an entry being extracted, a
# fine-tuning stage, a local store) before it stops with who holds it; TLSWEEP_LOCK_TIMEOUT wins
DEFAULT_LOCK_TIMEOUT = 900.0
MAX_WORKERS = 256  # `run --workers N` on one machine: more is a typo, not a plan
# How long a server may keep a command waiting. MLflow's own defaults (7 HTTP retries with
# exponential back-off, 120 s per request) wait for minutes on a server that is down; the
# environment variables MLFLOW_HTTP_REQUEST_MAX_RETRIES / _TIMEOUT still win when set.
DEFAULT_HTTP_MAX_RETRIES = 3  # MLflow HTTP requests during a command
DEFAULT_HTTP_TIMEOUT = 30  # seconds per MLflow HTTP request
CHECK_HTTP_MAX_RETRIES = 1  # the check before any work: one line within about 30 s
CHECK_HTTP_TIMEOUT = 10  # seconds
DEFAULT_CONNECT_TIMEOUT = 10  # seconds for a database server to answer a connection
DEFAULT_PREDICT_BATCH = 64  # images per forward pass of `tlsweep predict`
DEFAULT_MAX_FAILURES = 5  # trials failing in a row (in one worker) before `run` stops
DEFAULT_CV_FOLDS = None  # None (or 0, 1): no cross-validation; K >= 2: K stratified folds of train
DEFAULT_REPEATS = 1  # heads trained per trial (per fold) with seeds seed, seed+1, ...; averaged
DEFAULT_CLASS_WEIGHT = "none"  # none | balanced | {class name: weight}
DEFAULT_REGISTER = None  # a registered model name for `tlsweep export`, or None
MIN_VALIDATION_PER_CLASS = 5  # fewer validation images of a class than this: a warning
BOOTSTRAP_SAMPLES = 2000  # resamples of the test images for the winner's 95% intervals

# The optional fine-tuning stage of the winner (`finetune:`), every default once.
DEFAULT_FINETUNE: dict[str, Any] = {
    "epochs": 5,  # at most; early stopping may end it sooner
    "learning_rate": 1.0e-5,  # small: the Keras transfer-learning guide's second stage
    "batch_size": 32,
    "unfreeze": 20,  # the backbone's top layers to train (BatchNorm stays frozen); or "all"
    "optimizer": "adam",
    "patience": 2,  # epochs without a better validation score before stopping
    "augment": {"flip": True, "rotation": 0.0, "zoom": 0.0, "contrast": 0.0},
}

# Augmented feature views of a backbone entry (`augment:`), every default once.
DEFAULT_VIEWS: dict[str, Any] = {
    "views": 4,  # views of each training image in the cache; view 0 is the plain image
    "flip": True,  # each augmented view is mirrored left-right with probability 1/2
    "crop": 0.1,  # each side of an augmented view keeps a random 1 - crop .. 1 of its length
    "tta": False,  # true: validation/test images get the views too; a score is their mean
    "train": "one",  # per epoch, each training image as one seeded view (one) or every view (all)
    "seed": DEFAULT_SEED,  # with each file's path and the view's number: the view's randomness
}
VIEW_TRAINING = ("one", "all")
MAX_VIEWS = 64

SAMPLERS = ("tpe", "random", "grid", "cmaes", "gp", "qmc")
PRUNERS = ("median", "hyperband", "none")
DIRECTIONS = ("maximize", "minimize")
# The objective metrics and the direction each must be optimised in.
METRIC_DIRECTIONS: dict[str, str] = {
    "val_accuracy": "maximize",
    "val_loss": "minimize",
    "val_balanced_accuracy": "maximize",
    "val_macro_f1": "maximize",
    "val_roc_auc": "maximize",  # two classes only
    "val_log_loss": "minimize",  # cross-entropy without label smoothing
}
METRICS = tuple(METRIC_DIRECTIONS)
DEFAULT_DIRECTION = METRIC_DIRECTIONS[DEFAULT_METRIC]  # read from the one table of directions
CLASS_WEIGHTS = ("none", "balanced")
POOLINGS = ("avg", "max", "flatten")
FUSED_NAME = "fuse"  # the name (and key) of a fused backbone entry


# --- the schema --------------------------------------------------------------------------------
@dataclass(frozen=True)
class DataConfig:
    """Where the images are and how layout B is split."""

    dir: Path
    validation_split: float = DEFAULT_VALIDATION_SPLIT
    test_split: float = DEFAULT_TEST_SPLIT
    seed: int = DEFAULT_SEED
    verify: bool = DEFAULT_VERIFY  # not part of any key: it changes how the images are hashed
    dedupe: str = DEFAULT_DEDUPE  # part of the study's fingerprint: it changes the scores


@dataclass(frozen=True)
class BackboneConfig:
    """One pretrained backbone: a ``keras.applications`` class and how to run it."""

    name: str
    weights: str = DEFAULT_WEIGHTS  # "imagenet", "none" or an absolute path to a weights file
    input_size: int | None = None  # None: the backbone's default
    pooling: str = DEFAULT_POOLING
    args: Mapping[str, Any] = field(default_factory=dict)
    weights_tag: str = ""  # set only when two backbones differ by their weights file alone
    members: tuple[BackboneConfig, ...] = ()  # a fused backbone: its members' features, joined
    augment: ViewsConfig | None = None  # augmented feature views of the training images

    @property
    def label(self) -> str:
        """A short, readable name (``MobileNetV2-alpha0.35-160-avg``): the categorical choice."""
        if self.members:
            return "fuse(" + "+".join(m.label for m in self.members) + ")"
        extra = "-".join(f"{k}{v}" for k, v in sorted(self.args.items()))
        parts = [self.name] + ([extra] if extra else [])
        parts += [str(self.input_size or "default"), self.pooling]
        if self.weights == "none":
            parts.append("random")
        elif self.weights != "imagenet" and self.weights_tag:
            parts.append(self.weights_tag)
        if self.augment is not None:
            parts.append(self.augment.tag)
        return "-".join(parts)


@dataclass(frozen=True)
class ViewsConfig:
    """``augment:`` of a backbone entry: K seeded, augmented views of each training image in
    the cache (view 0 the plain image), how the head trains on them, and test-time
    augmentation (``tta``) of validation and test images."""

    views: int = DEFAULT_VIEWS["views"]
    flip: bool = DEFAULT_VIEWS["flip"]
    crop: float = DEFAULT_VIEWS["crop"]
    tta: bool = DEFAULT_VIEWS["tta"]
    train: str = DEFAULT_VIEWS["train"]
    seed: int = DEFAULT_VIEWS["seed"]

    @property
    def tag(self) -> str:
        """What the backbone's label says: ``views4``, ``views4-tta``, ``views4-all``.

        The settings that change the features themselves (flip, crop, seed) are in the cache
        key, so a study resumed with other values is refused by its data check.
        """
        return "-".join(
            [f"views{self.views}"]
            + (["tta"] if self.tta else [])
            + ([self.train] * (self.train != "one"))
        )

    def key(self) -> dict[str, Any]:
        """What changes the cached views (``train`` does not: the same views either way)."""
        return {
            "views": self.views,
            "flip": self.flip,
            "crop": self.crop,
            "seed": self.seed,
            "splits": list(self.splits),
            "method": VIEWS_METHOD,
        }

    @property
    def splits(self) -> tuple[str, ...]:
        """The splits whose images get every view (the others get the plain one)."""
        return ("train", "validation", "test") if self.tta else ("train",)


VIEWS_METHOD = "crop-flip-stateless-1"  # the augmentation's code: a change re-extracts


@dataclass(frozen=True)
class SearchConfig:
    """The ``search:`` section: the Optuna study."""

    n_trials: int = DEFAULT_N_TRIALS
    timeout: float | None = None
    sampler: str = DEFAULT_SAMPLER
    pruner: str = DEFAULT_PRUNER
    direction: str = DEFAULT_DIRECTION
    metric: str = DEFAULT_METRIC
    seed: int = DEFAULT_SEED
    space: Mapping[str, Param] = field(default_factory=dict)
    heartbeat_interval: int = DEFAULT_HEARTBEAT_INTERVAL
    grace_period: int = DEFAULT_GRACE_PERIOD
    max_retry: int = DEFAULT_MAX_RETRY
    max_failures: int = DEFAULT_MAX_FAILURES
    cv_folds: int | None = DEFAULT_CV_FOLDS
    repeats: int = DEFAULT_REPEATS
    class_weight: str | Mapping[str, float] = DEFAULT_CLASS_WEIGHT


@dataclass(frozen=True)
class AugmentConfig:
    """Keras preprocessing layers applied to the training images while fine-tuning."""

    flip: bool = DEFAULT_FINETUNE["augment"]["flip"]  # RandomFlip("horizontal")
    rotation: float = DEFAULT_FINETUNE["augment"]["rotation"]  # RandomRotation(factor)
    zoom: float = DEFAULT_FINETUNE["augment"]["zoom"]  # RandomZoom(factor)
    contrast: float = DEFAULT_FINETUNE["augment"]["contrast"]  # RandomContrast(factor)


@dataclass(frozen=True)
class FinetuneConfig:
    """The ``finetune:`` section: train the winner end to end on the raw images."""

    epochs: int = DEFAULT_FINETUNE["epochs"]
    learning_rate: float = DEFAULT_FINETUNE["learning_rate"]
    batch_size: int = DEFAULT_FINETUNE["batch_size"]
    unfreeze: int | None = DEFAULT_FINETUNE["unfreeze"]  # None: every layer
    optimizer: str = DEFAULT_FINETUNE["optimizer"]
    patience: int = DEFAULT_FINETUNE["patience"]
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass(frozen=True)
class SweepConfig:
    """A resolved, validated sweep file."""

    path: Path  # the sweep file itself (absolute)
    study: str
    data: DataConfig
    backbones: tuple[BackboneConfig, ...]
    cache_dir: Path
    search: SearchConfig
    storage: str
    tracking_uri: str | None
    text: str = ""  # the sweep file's text, logged to MLflow
    register: str | None = DEFAULT_REGISTER  # registered model name for `tlsweep export`
    finetune: FinetuneConfig | None = None  # None: no fine-tuning stage

    def space_fingerprint(self) -> str:
        """A hash of the search space, stored in the study to refuse a changed space."""
        payload = {name: p.to_json() for name, p in sorted(self.search.space.items())}
        payload["backbone"] = [b.label for b in self.backbones]
        payload["direction"] = self.search.direction
        payload["metric"] = self.search.metric
        # Only when set, so studies made before these keys existed keep their fingerprint.
        for key, default in (
            ("cv_folds", DEFAULT_CV_FOLDS),
            ("repeats", DEFAULT_REPEATS),
            ("class_weight", DEFAULT_CLASS_WEIGHT),
        ):
            value = getattr(self.search, key)
            if value != default:
                payload[key] = dict(value) if isinstance(value, Mapping) else value
        if self.data.dedupe != DEFAULT_DEDUPE:
            payload["dedupe"] = self.data.dedupe
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("text")
        return json.loads(json.dumps(d, default=str))


# --- which combinations of settings run ------------------------------------------------------
# A sampler that needs a package tlsweep does not install: (package modules, pip install line).
SAMPLER_NEEDS: dict[str, tuple[tuple[str, ...], str]] = {
    "cmaes": (("cmaes",), "pip install cmaes"),
    "gp": (("torch", "scipy"), "pip install torch scipy"),
    "qmc": (("scipy",), "pip install scipy"),
}


def check_combinations(
    where: str,
    search: SearchConfig,
    backbones: tuple[BackboneConfig, ...],
    n_trials_name: str = "search.n_trials",
) -> None:
    """Refuse, with one line, the combinations of settings that cannot run; the one place that
    knows them. Every other combination of sampler x pruner x kind of each parameter (fixed,
    range, log range, step range, choices) x folds x augment x finetune runs.

    Refused, and why:

    - ``sampler: grid`` with a float range without ``step``: a grid needs a finite list of values.
    - ``sampler: grid`` with more ``n_trials`` than grid points: the grid has no more points to
      try, and Optuna's grid sampler would score the same ones again.
    - ``sampler: cmaes | gp | qmc`` without the package it needs (:data:`SAMPLER_NEEDS`).

    ``pruner: hyperband`` takes the largest ``epochs`` the space can draw as its max resource.
    """
    if search.sampler == "grid":
        size = len(backbones)
        for p in search.space.values():
            values = grid_values(p)
            if values is None:
                raise ConfigError(
                    f"{where}: search.space.{p.name}: the grid sampler needs choices or a fixed "
                    "value (or an int range, or a float range with step)"
                )
            size *= len(values)
        if search.n_trials > size:
            raise ConfigError(
                f"{where}: {n_trials_name}: got {search.n_trials}; the grid sampler's grid "
                f"has only {size} point(s); set it to {size} or fewer, or add values to search"
            )
    needs = SAMPLER_NEEDS.get(search.sampler)
    if needs is not None:
        missing = [m for m in needs[0] if importlib.util.find_spec(m) is None]
        if missing:
            raise ConfigError(
                f"{where}: search.sampler: '{search.sampler}' needs {' and '.join(missing)}, "
                f"which is not installed; {needs[1]}, or use sampler: tpe"
            )


def with_overrides(cfg: SweepConfig, **changes: Any) -> SweepConfig:
    """A copy of ``cfg`` with top-level fields replaced (used by tests and the CLI)."""
    return replace(cfg, **changes)
