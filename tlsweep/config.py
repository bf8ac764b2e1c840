"""The sweep file: its schema, every default, validation and the resolved config.

A sweep file is YAML, loaded with ``yaml.safe_load``. Every default lives in this module, once;
the CLI reads them from here. Unknown keys are errors. Every bad value raises a
:class:`~tlsweep.errors.ConfigError` whose message is one line naming the field, the value and
what is allowed, before any work starts.

Paths in the sweep file (``data.dir``, a weights file, a ``sqlite:///`` storage) are relative to
the sweep file; ``cache_dir`` is relative to the working directory. Command-line overrides are
relative to the working directory.

This module imports neither TensorFlow, Optuna nor MLflow.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from tlsweep.errors import BackboneError, ConfigError, ServiceError
from tlsweep.registry import get_spec

# --- every default, in one place ---------------------------------------------------------------
DEFAULT_CACHE_DIR = ".tlsweep/cache"  # relative to the working directory
DEFAULT_STORAGE = "sqlite:///tlsweep.db"  # relative to the sweep file
DEFAULT_VALIDATION_SPLIT = 0.2  # layout B only
DEFAULT_TEST_SPLIT = 0.1  # layout B only
DEFAULT_VERIFY = False  # True: re-read every image for the cache key, not trusting the stat index
DEFAULT_SEED = 1337
DEFAULT_POOLING = "avg"
DEFAULT_WEIGHTS = "imagenet"
DEFAULT_UI_HOST = "127.0.0.1"  # tlsweep ui binds here: this machine only unless asked
DEFAULT_UI_PORT = 5000  # tlsweep ui: MLflow's own default port
DEFAULT_UI_START_TIMEOUT = 120.0  # seconds tlsweep ui waits for the MLflow server to answer
DEFAULT_N_TRIALS = 40
DEFAULT_SAMPLER = "tpe"
DEFAULT_PRUNER = "median"
DEFAULT_METRIC = "val_accuracy"
DEFAULT_DIRECTION = "maximize"  # the one that fits DEFAULT_METRIC
DEFAULT_HEARTBEAT_INTERVAL = 5  # seconds between a running trial's heartbeats
DEFAULT_GRACE_PERIOD = 30  # seconds without a heartbeat before a trial is taken as dead
DEFAULT_MAX_RETRY = 3  # how often the parameters of a trial killed mid-way are retried
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
CLASS_WEIGHTS = ("none", "balanced")
POOLINGS = ("avg", "max", "flatten")
OPTIMIZERS = ("adam", "sgd", "rmsprop")


# --- the head's parameters: declared once ------------------------------------------------------
@dataclass(frozen=True)
class HeadParam:
    """One hyperparameter of the head, declared once.

    Everything else is derived from :data:`HEAD_PARAMETERS`: the sweep file's validation
    (``search.space.<name>`` keys, types, bounds, choices), the default search space, the
    trainer's :class:`tlsweep.head.HeadParams` fields, and the README's ``space:`` block
    (:func:`space_yaml`, checked by a test).
    """

    name: str
    type: type  # int | float | str
    default: Any  # the search space's default: a value, {low, high[, log]} or {choices: [...]}
    help: str
    bounds: tuple[float, float] | None = None  # every value must lie in here (int and float)
    choices: tuple[str, ...] | None = None  # the allowed values (str)

    @property
    def kind(self) -> str:
        return self.type.__name__


HEAD_PARAMETERS: tuple[HeadParam, ...] = (
    HeadParam(
        "units",
        int,
        {"low": 32, "high": 1024, "log": True},
        "width of each hidden Dense layer",
        bounds=(1, 65536),
    ),
    HeadParam(
        "dropout",
        float,
        {"low": 0.0, "high": 0.7},
        "dropout after each hidden layer",
        bounds=(0.0, 0.99),
    ),
    HeadParam(
        "learning_rate",
        float,
        {"low": 1.0e-5, "high": 1.0e-2, "log": True},
        "the optimizer's step size",
        bounds=(1e-9, 10.0),
    ),
    HeadParam(
        "batch_size", int, {"choices": [16, 32, 64, 128]}, "examples per step", bounds=(1, 65536)
    ),
    HeadParam("epochs", int, 30, "passes over the training features", bounds=(1, 10000)),
    HeadParam("hidden_layers", int, 1, "Dense(units, relu) -> Dropout, repeated", bounds=(0, 8)),
    HeadParam("l2", float, 0.0, "L2 penalty l2 * sum(kernel**2), as Keras's L2", bounds=(0.0, 1.0)),
    HeadParam("label_smoothing", float, 0.0, "as Keras's cross-entropy", bounds=(0.0, 0.99)),
    HeadParam("optimizer", str, "adam", "sgd has momentum 0.9", choices=OPTIMIZERS),
)
HEAD_PARAM: dict[str, HeadParam] = {p.name: p for p in HEAD_PARAMETERS}
# Derived views, kept under their old names: name -> kind, and the default search space.
HEAD_PARAMS: dict[str, str] = {p.name: p.kind for p in HEAD_PARAMETERS}
DEFAULT_SPACE: dict[str, Any] = {p.name: p.default for p in HEAD_PARAMETERS}


def _yaml_flow(v: Any) -> str:
    """A value as the README writes it in YAML flow style (``{low: 32, high: 1024, log: true}``)."""
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_yaml_flow(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(_yaml_flow(x) for x in v) + "]"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and v != 0 and not 0.1 <= abs(v) < 1e4:
        mantissa, exponent = f"{v:.1e}".split("e")
        return f"{mantissa}e{int(exponent)}"  # 1.0e-5: YAML 1.1 reads it as a float
    return str(v)


def space_yaml(indent: int = 4) -> str:
    """The default ``space:`` entries as the README shows them, one commented line each."""
    width = max(len(p.name) for p in HEAD_PARAMETERS) + 2
    values = [f"{p.name + ':':<{width}}{_yaml_flow(p.default)}" for p in HEAD_PARAMETERS]
    column = max(len(v) for v in values) + 1
    lines = []
    for p, value in zip(HEAD_PARAMETERS, values, strict=True):
        allowed = " | ".join(p.choices) + "; " if p.choices else ""
        lines.append(f"{' ' * indent}{value:<{column}} # {allowed}{p.help}")
    return "\n".join(lines) + "\n"


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***``: the one place URLs are made safe to print."""
    return re.sub(r"//([^:/@]*):[^@/]*@", r"//\1:***@", url)


def check_can_write(path: str | Path, field_name: str, kind: str = "file") -> Path:
    """Check, creating nothing, that ``path`` (a ``kind`` of "file" or "dir") can be written.

    Missing folders on the way are fine (the writer makes them) if the nearest existing one is
    a writable folder. A path through a file is a usage error (:class:`ConfigError`); no
    permission or a read-only filesystem is a runtime failure (:class:`ServiceError`).
    Returns the absolute path.
    """
    p = Path(path).expanduser().absolute()
    shown = str(path)
    if p.exists():
        if kind == "file" and p.is_dir():
            raise _fail("", field_name, shown, "it is a folder; expected a file path")
        if kind == "dir" and not p.is_dir():
            raise _fail("", field_name, shown, "it is a file; expected a folder")
        if not os.access(p, os.W_OK | (os.X_OK if kind == "dir" else 0)):
            raise ServiceError(f"{field_name}: {shown}: permission denied (cannot write it)")
        if kind == "dir":
            return p
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise _fail("", field_name, shown, f"{parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ServiceError(
            f"{field_name}: {shown}: permission denied (cannot create files in {parent})"
        )
    return p


def _fail(where: str, field_name: str, value: Any, allowed: str) -> ConfigError:
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return ConfigError(f"{where + ': ' if where else ''}{field_name}: got {shown}; {allowed}")


# --- the schema --------------------------------------------------------------------------------
@dataclass(frozen=True)
class DataConfig:
    """Where the images are and how layout B is split."""

    dir: Path
    validation_split: float = DEFAULT_VALIDATION_SPLIT
    test_split: float = DEFAULT_TEST_SPLIT
    seed: int = DEFAULT_SEED
    verify: bool = DEFAULT_VERIFY  # not part of any key: it changes how the images are hashed


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
class Param:
    """One dimension of the search space."""

    name: str
    value: Any = None  # fixed value when `choices`, `low` and `high` are all None
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] | None = None
    kind: str = "fixed"  # fixed | int | float | categorical

    def to_sweep(self) -> Any:
        """This dimension as a sweep file writes it: a value, a range or ``{choices: [...]}``."""
        if self.kind == "fixed":
            return self.value
        if self.kind == "categorical":
            return {"choices": list(self.choices or ())}
        d = {"low": self.low, "high": self.high, "log": self.log}
        return d if self.step is None else {**d, "step": self.step}

    def to_json(self) -> dict[str, Any]:
        d = {"kind": self.kind}
        if self.kind == "fixed":
            d["value"] = self.value
        elif self.kind == "categorical":
            d["choices"] = list(self.choices or ())
        else:
            d.update(low=self.low, high=self.high, log=self.log, step=self.step)
        return d


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
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("text")
        return json.loads(json.dumps(d, default=str))


# --- parsing -----------------------------------------------------------------------------------
_TOP_KEYS = (
    "study",
    "data",
    "backbones",
    "cache_dir",
    "search",
    "storage",
    "tracking_uri",
    "register",
    "finetune",
)
_FINETUNE_KEYS = tuple(DEFAULT_FINETUNE)
_AUGMENT_KEYS = tuple(DEFAULT_FINETUNE["augment"])
_DATA_KEYS = ("dir", "validation_split", "test_split", "seed", "verify")
_BACKBONE_KEYS = ("name", "weights", "input_size", "pooling", "args", "augment")
_VIEWS_KEYS = tuple(DEFAULT_VIEWS)
_SEARCHABLE_BACKBONE_KEYS = ("input_size", "pooling")  # may be {choices: [...]}
FUSED_NAME = "fuse"  # the name (and key) of a fused backbone entry
_SEARCH_KEYS = (
    "n_trials",
    "timeout",
    "sampler",
    "pruner",
    "direction",
    "metric",
    "seed",
    "space",
    "heartbeat_interval",
    "grace_period",
    "max_retry",
    "max_failures",
    "cv_folds",
    "repeats",
    "class_weight",
)
_PARAM_KEYS = ("low", "high", "log", "step", "choices")


def _check_keys(where: str, section: str, mapping: Any, allowed: tuple[str, ...]) -> None:
    if not isinstance(mapping, dict):
        what = section or "the sweep file"
        raise _fail(where, what, mapping, "expected a mapping of keys to values")
    for key in mapping:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            prefix = f"{section}." if section else ""
            raise ConfigError(
                f"{where}: {prefix}{key}: unknown key; {hint}allowed: {', '.join(allowed)}"
            )


def _get(raw: Mapping[str, Any], schema: type, key: str) -> Any:
    """``raw[key]``, or the default of the dataclass field ``schema.key``: defaults live there."""
    if key in raw:
        return raw[key]
    f = schema.__dataclass_fields__[key]
    if f.default is not MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _int(where: str, name: str, v: Any, lo: int, hi: int | None = None) -> int:
    if not _is_int(v) or v < lo or (hi is not None and v > hi):
        rng = f"an integer >= {lo}" if hi is None else f"an integer from {lo} to {hi}"
        raise _fail(where, name, v, f"expected {rng}")
    return int(v)


def _fraction(where: str, name: str, v: Any) -> float:
    if not _is_num(v) or not 0.0 <= v < 1.0:
        raise _fail(where, name, v, "expected a number from 0 (inclusive) to 1 (exclusive)")
    return float(v)


def _choice(where: str, name: str, v: Any, allowed: tuple[str, ...]) -> str:
    if not isinstance(v, str) or v.lower() not in allowed:
        raise _fail(where, name, v, f"allowed: {' | '.join(allowed)}")
    return v.lower()


def _resolve(base: Path, p: str) -> Path:
    path = Path(p).expanduser()
    return path if path.is_absolute() else (base / path).resolve()


def _parse_param(where: str, decl: HeadParam, spec: Any) -> Param:
    name = decl.name
    fname = f"search.space.{name}"
    kind = decl.kind
    bounds = decl.bounds

    def check_value(v: Any, label: str) -> Any:
        if kind == "str":
            if decl.choices:
                return _choice(where, label, v, decl.choices)
            if not isinstance(v, str):
                raise _fail(where, label, v, "expected a string")
            return v
        if kind == "int" and not _is_int(v):
            raise _fail(where, label, v, "expected an integer")
        if kind == "float" and not _is_num(v):
            raise _fail(where, label, v, "expected a number")
        if bounds and not bounds[0] <= v <= bounds[1]:
            raise _fail(where, label, v, f"expected a value from {bounds[0]} to {bounds[1]}")
        return float(v) if kind == "float" else int(v)

    if not isinstance(spec, dict):
        if isinstance(spec, list):
            raise _fail(where, fname, spec, "write a list of options as {choices: [...]}")
        return Param(name=name, value=check_value(spec, fname), kind="fixed")
    _check_keys(where, fname, spec, _PARAM_KEYS)
    if "choices" in spec:
        if set(spec) - {"choices"}:
            raise ConfigError(f"{where}: {fname}: 'choices' cannot be combined with low/high/log")
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise _fail(where, f"{fname}.choices", choices, "expected a non-empty list")
        values = tuple(check_value(c, f"{fname}.choices") for c in choices)
        if len(set(values)) != len(values):
            raise _fail(where, f"{fname}.choices", choices, "expected distinct values")
        if len(values) == 1:
            return Param(name=name, value=values[0], kind="fixed")
        return Param(name=name, choices=values, kind="categorical")
    if "low" not in spec or "high" not in spec:
        raise ConfigError(
            f"{where}: {fname}: a range needs both 'low' and 'high' "
            "(or give 'choices', or a plain value)"
        )
    if kind == "str":
        raise _fail(where, fname, spec, "expected a value or {choices: [...]}")
    low = check_value(spec["low"], f"{fname}.low")
    high = check_value(spec["high"], f"{fname}.high")
    if low > high:
        raise ConfigError(f"{where}: {fname}: low ({low}) is greater than high ({high})")
    log = _get(spec, Param, "log")
    if not isinstance(log, bool):
        raise _fail(where, f"{fname}.log", log, "expected true or false")
    if log and low <= 0:
        raise _fail(where, f"{fname}.low", low, "a log range needs low > 0")
    step = _get(spec, Param, "step")
    if step is not None:
        if not _is_num(step) or step <= 0 or (kind == "int" and not _is_int(step)):
            raise _fail(where, f"{fname}.step", step, "expected a positive number")
        if log:
            raise ConfigError(f"{where}: {fname}: 'step' cannot be combined with 'log: true'")
    if low == high:
        return Param(name=name, value=low, kind="fixed")
    return Param(name=name, low=low, high=high, log=log, step=step, kind=kind)


def _parse_backbone(where: str, i: int, spec: Any, base: Path) -> BackboneConfig:
    sec = f"backbones[{i}]"
    if isinstance(spec, str):
        spec = {"name": spec}
    _check_keys(where, sec, spec, _BACKBONE_KEYS)
    if "name" not in spec:
        raise ConfigError(f"{where}: {sec}.name: missing; give a keras.applications class name")
    name = spec["name"]
    if not isinstance(name, str) or not name:
        raise _fail(where, f"{sec}.name", name, "expected a keras.applications class name")
    weights = _get(spec, BackboneConfig, "weights")
    if weights is None:
        weights = "none"
    if not isinstance(weights, str) or not weights:
        raise _fail(where, f"{sec}.weights", weights, "allowed: imagenet | none | a file path")
    if weights.lower() in ("imagenet", "none"):
        weights = weights.lower()
    else:
        wpath = _resolve(base, weights)
        if not wpath.is_file():
            raise _fail(
                where,
                f"{sec}.weights",
                weights,
                f"no such file ({wpath}); allowed: imagenet | none | a weights file path",
            )
        weights = str(wpath)
    input_size = _get(spec, BackboneConfig, "input_size")
    if input_size is not None:
        input_size = _int(where, f"{sec}.input_size", input_size, 32, 2048)
    pooling = _choice(where, f"{sec}.pooling", _get(spec, BackboneConfig, "pooling"), POOLINGS)
    args = spec.get("args") or {}
    if not isinstance(args, dict):
        raise _fail(where, f"{sec}.args", args, "expected a mapping of constructor arguments")
    for reserved in ("weights", "include_top", "input_shape", "pooling", "input_tensor"):
        if reserved in args:
            raise ConfigError(
                f"{where}: {sec}.args.{reserved}: set by tlsweep; use the backbone's own field"
            )
    return BackboneConfig(
        name=name,
        weights=weights,
        input_size=input_size,
        pooling=pooling,
        args=dict(args),
        augment=parse_views(where, f"{sec}.augment", spec.get("augment")),
    )


def parse_views(where: str, sec: str, raw: Any) -> ViewsConfig | None:
    """A backbone's ``augment:`` (absent, null or false: None; true or {}: every default)."""
    if raw is None or raw is False:
        return None
    if raw is True:
        raw = {}
    _check_keys(where, sec, raw, _VIEWS_KEYS)
    d = {**DEFAULT_VIEWS, **raw}
    for k in ("flip", "tta"):
        if not isinstance(d[k], bool):
            raise _fail(where, f"{sec}.{k}", d[k], "expected true or false")
    crop = d["crop"]
    if not _is_num(crop) or not 0 <= crop <= 0.5:
        raise _fail(where, f"{sec}.crop", crop, "expected a number from 0 to 0.5")
    if not d["flip"] and crop == 0:
        raise ConfigError(
            f"{where}: {sec}: flip: false and crop: 0 make every view the plain image; "
            "set flip: true or crop > 0, or remove augment"
        )
    return ViewsConfig(
        views=_int(where, f"{sec}.views", d["views"], 2, MAX_VIEWS),
        flip=d["flip"],
        crop=float(crop),
        tta=d["tta"],
        train=_choice(where, f"{sec}.train", d["train"], VIEW_TRAINING),
        seed=_int(where, f"{sec}.seed", d["seed"], 0),
    )


def _backbone_choices(where: str, sec: str, spec: dict[str, Any]) -> list[dict[str, Any]]:
    """One plain backbone spec per combination of ``input_size`` and ``pooling`` choices."""
    combos: list[dict[str, Any]] = [dict(spec)]
    for key in _SEARCHABLE_BACKBONE_KEYS:
        value = spec.get(key)
        if isinstance(value, list):
            raise _fail(where, f"{sec}.{key}", value, "write a list of options as {choices: [...]}")
        if not isinstance(value, dict):
            continue
        _check_keys(where, f"{sec}.{key}", value, ("choices",))
        choices = value.get("choices")
        if not isinstance(choices, list) or not choices:
            raise _fail(where, f"{sec}.{key}.choices", choices, "expected a non-empty list")
        if any(isinstance(c, (dict, list)) for c in choices) or len(
            {json.dumps(c) for c in choices}
        ) != len(choices):
            raise _fail(where, f"{sec}.{key}.choices", choices, "expected distinct plain values")
        combos = [{**c, key: v} for c in combos for v in choices]
    return combos


def _parse_fused(where: str, i: int, spec: dict[str, Any], base: Path) -> BackboneConfig:
    sec = f"backbones[{i}]"
    _check_keys(where, sec, spec, (FUSED_NAME,))
    members_raw = spec[FUSED_NAME]
    if not isinstance(members_raw, list) or len(members_raw) < 2:
        raise _fail(where, f"{sec}.fuse", members_raw, "expected a list of 2 or more backbones")
    members = []
    for j, m in enumerate(members_raw):
        msec = f"{sec}.fuse[{j}]"
        if isinstance(m, dict) and FUSED_NAME in m:
            raise ConfigError(f"{where}: {msec}: a fused backbone cannot contain another fuse:")
        if isinstance(m, dict) and any(
            isinstance(m.get(k), dict) for k in ("input_size", "pooling")
        ):
            raise ConfigError(
                f"{where}: {msec}: a fused member takes one input_size and one pooling, not "
                "choices; list each fused combination as its own fuse: entry"
            )
        if isinstance(m, dict) and m.get("augment") not in (None, False):
            raise ConfigError(
                f"{where}: {msec}.augment: a fused member takes no augment; augment a "
                "backbone entry of its own"
            )
        member = _parse_backbone(where, i, m, base)
        members.append(resolve_backbone(member, f"{where}: {msec}"))
    ids = [_identity(m) for m in members]
    if len(set(ids)) < len(ids):
        raise ConfigError(f"{where}: {sec}.fuse: the same backbone is listed twice")
    return BackboneConfig(
        name=FUSED_NAME, weights="members", pooling="concat", members=tuple(members)
    )


def _identity(b: BackboneConfig) -> str:
    """What makes two backbone entries the same (for the duplicate check)."""
    if b.members:
        return "fuse:" + "|".join(_identity(m) for m in b.members)
    views = asdict(b.augment) if b.augment else None
    return json.dumps([b.name, b.weights, b.input_size, b.pooling, sorted(b.args.items()), views])


def parse_backbones(where: str, raw: Any, base: Path) -> tuple[BackboneConfig, ...]:
    """The ``backbones:`` list, resolved, with choices expanded and fused entries built.

    ``input_size: {choices: [160, 224]}`` (and ``pooling``) expands one entry into one backbone
    per value (their product when both are given): each is its own cache entry and its own
    value of the study's categorical ``backbone`` parameter, whose label names size and pooling.
    """
    if not isinstance(raw, list) or not raw:
        raise _fail(where, "backbones", raw, "expected a non-empty list of backbones")
    out: list[BackboneConfig] = []
    src: list[int] = []  # the entry each backbone comes from
    try:
        for i, s in enumerate(raw):
            if isinstance(s, dict) and FUSED_NAME in s:
                out.append(_parse_fused(where, i, s, base))
            else:
                specs = (
                    _backbone_choices(where, f"backbones[{i}]", s) if isinstance(s, dict) else [s]
                )
                for one in specs:
                    bb = _parse_backbone(where, i, one, base)
                    out.append(resolve_backbone(bb, f"{where}: backbones[{i}]"))
            src += [i] * (len(out) - len(src))
    except BackboneError as e:  # an unknown name or a size the backbone cannot take
        raise ConfigError(str(e)) from None
    ids = [_identity(b) for b in out]
    for i, ident in enumerate(ids):
        if ident in ids[:i]:
            raise ConfigError(
                f"{where}: backbones[{src[i]}]: {out[i].label}: the same backbone is listed twice"
            )
    plain = [b.label for b in out]
    if len(set(plain)) < len(plain):
        out = [
            replace(b, weights_tag=Path(b.weights).stem)
            if plain.count(b.label) > 1 and not b.members
            else b
            for b in out
        ]
    labels = [b.label for b in out]
    for i, label in enumerate(labels):
        if label in labels[:i]:  # e.g. two entries that differ by augment.crop alone
            raise ConfigError(
                f"{where}: backbones[{src[i]}]: {label}: another entry has the same label; "
                "entries may differ in augment by views, tta or train, not by flip, crop or "
                "seed alone"
            )
    return tuple(out)


def parse_finetune(where: str, raw: Any) -> FinetuneConfig | None:
    """The ``finetune:`` section (absent or false: None; true or {}: every default)."""
    if raw is None or raw is False:
        return None
    if raw is True:
        raw = {}
    _check_keys(where, "finetune", raw, _FINETUNE_KEYS)
    d = {**DEFAULT_FINETUNE, **raw}
    lr = d["learning_rate"]
    if not _is_num(lr) or not 0 < lr <= 1:
        raise _fail(where, "finetune.learning_rate", lr, "expected a number above 0, at most 1")
    unfreeze = d["unfreeze"]
    if isinstance(unfreeze, str) and unfreeze.lower() == "all":
        unfreeze = None
    elif not _is_int(unfreeze) or unfreeze < 0:
        raise _fail(where, "finetune.unfreeze", unfreeze, "expected an integer >= 0 or 'all'")
    aug_raw = d["augment"]
    if aug_raw is None or aug_raw is False:
        aug_raw = {"flip": False}
    _check_keys(where, "finetune.augment", aug_raw, _AUGMENT_KEYS)
    aug = {**DEFAULT_FINETUNE["augment"], **aug_raw}
    if not isinstance(aug["flip"], bool):
        raise _fail(where, "finetune.augment.flip", aug["flip"], "expected true or false")
    for k in ("rotation", "zoom", "contrast"):
        if not _is_num(aug[k]) or not 0 <= aug[k] < 1:
            raise _fail(where, f"finetune.augment.{k}", aug[k], "expected a number from 0 to 1")
    return FinetuneConfig(
        epochs=_int(where, "finetune.epochs", d["epochs"], 1, 10000),
        learning_rate=float(lr),
        batch_size=_int(where, "finetune.batch_size", d["batch_size"], 1, 4096),
        unfreeze=unfreeze,
        optimizer=_choice(where, "finetune.optimizer", d["optimizer"], OPTIMIZERS),
        patience=_int(where, "finetune.patience", d["patience"], 1),
        augment=AugmentConfig(
            flip=aug["flip"],
            rotation=float(aug["rotation"]),
            zoom=float(aug["zoom"]),
            contrast=float(aug["contrast"]),
        ),
    )


def resolve_backbone(bb: BackboneConfig, where: str = "backbones") -> BackboneConfig:
    """Check a backbone config against the registry and fill in its input size."""
    if bb.members:
        members = tuple(resolve_backbone(m, f"{where}.fuse[{j}]") for j, m in enumerate(bb.members))
        return replace(bb, members=members)
    try:
        spec = get_spec(bb.name)
    except BackboneError as e:
        raise BackboneError(f"{where}.name: {e}") from None
    if bb.weights == "imagenet" and not spec.has_imagenet:
        raise BackboneError(
            f"{where}.weights: got 'imagenet'; {bb.name} has no ImageNet weights: use weights: "
            "none (seeded random) or a weights file"
        )
    size = bb.input_size or spec.default_size
    if size < spec.min_size:
        raise BackboneError(
            f"{where}.input_size: got {size}; {bb.name} needs at least {spec.min_size} px"
        )
    if spec.fixed_size_with_imagenet and bb.weights == "imagenet" and size != spec.default_size:
        raise BackboneError(
            f"{where}.input_size: got {size}; {bb.name} ImageNet weights need "
            f"{spec.default_size} px (or weights: none)"
        )
    return replace(bb, input_size=size)


def load_sweep(
    path: str | Path,
    *,
    data_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    study: str | None = None,
    storage: str | None = None,
    tracking_uri: str | None = None,
    n_trials: int | None = None,
    check_data_dir: bool = True,
    verify: bool | None = None,
) -> SweepConfig:
    """Read, validate and resolve a sweep file; command-line overrides win over the file."""
    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise ConfigError(f"{where}: no such sweep file; give the path to a YAML sweep file")
    try:
        text = path.read_text(encoding="utf-8")
    except PermissionError as e:  # the file is fine; this process may not read it
        raise ServiceError(f"{where}: cannot read the sweep file ({e.strerror})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{where}: cannot read the sweep file ({e})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise ConfigError(f"{where}: not valid YAML{at}: {problem}") from None
    if raw is None:
        raise ConfigError(f"{where}: the sweep file is empty; see sweeps/ for examples")
    _check_keys(where, "", raw, _TOP_KEYS)
    base = path.resolve().parent

    name = check_study_name(where, "study" if study is None else "--study", study, raw)

    # data
    if "data" not in raw:
        raise ConfigError(f"{where}: data: missing; give data.dir, the folder of images")
    data_raw = raw["data"]
    if isinstance(data_raw, str):
        data_raw = {"dir": data_raw}
    _check_keys(where, "data", data_raw, _DATA_KEYS)
    if data_dir is not None:
        ddir = Path(data_dir).expanduser().resolve()
    else:
        d = data_raw.get("dir")
        if not isinstance(d, str) or not d:
            raise _fail(where, "data.dir", d, "expected the path of a folder of images")
        ddir = _resolve(base, d)
    if check_data_dir and not ddir.is_dir():
        raise _fail(where, "data.dir", str(ddir), "no such folder; fix data.dir or pass --data DIR")
    vsplit = _fraction(
        where, "data.validation_split", _get(data_raw, DataConfig, "validation_split")
    )
    tsplit = _fraction(where, "data.test_split", _get(data_raw, DataConfig, "test_split"))
    if vsplit <= 0:
        raise _fail(where, "data.validation_split", vsplit, "expected a number above 0")
    if vsplit + tsplit >= 0.9:
        raise ConfigError(
            f"{where}: data: validation_split + test_split = {vsplit + tsplit:g} leaves too few "
            "training images; keep the sum below 0.9"
        )
    dseed = _int(where, "data.seed", _get(data_raw, DataConfig, "seed"), 0)
    dverify = _get(data_raw, DataConfig, "verify") if verify is None else verify
    if not isinstance(dverify, bool):
        raise _fail(where, "data.verify", dverify, "expected true or false")
    data = DataConfig(
        dir=ddir, validation_split=vsplit, test_split=tsplit, seed=dseed, verify=dverify
    )

    # backbones
    backbones = parse_backbones(where, raw.get("backbones"), base)

    # cache
    if cache_dir is not None:
        cdir = Path(cache_dir).expanduser().resolve()
    else:
        c = raw.get("cache_dir", DEFAULT_CACHE_DIR)
        if not isinstance(c, str) or not c:
            raise _fail(where, "cache_dir", c, "expected a folder path")
        cdir = Path(c).expanduser().resolve()

    # search
    s_raw = raw.get("search") or {}
    _check_keys(where, "search", s_raw, _SEARCH_KEYS)
    nt = n_trials if n_trials is not None else _get(s_raw, SearchConfig, "n_trials")
    nt = _int(where, "search.n_trials" if n_trials is None else "--n-trials", nt, 1)
    timeout = _get(s_raw, SearchConfig, "timeout")
    if timeout is not None and (not _is_num(timeout) or timeout <= 0):
        raise _fail(where, "search.timeout", timeout, "expected a number of seconds > 0, or null")
    space_raw = s_raw.get("space")
    if space_raw is None:
        space_raw = {}
    if not isinstance(space_raw, dict):
        raise _fail(where, "search.space", space_raw, "expected a mapping of parameter names")
    _check_keys(where, "search.space", space_raw, tuple(p.name for p in HEAD_PARAMETERS))
    space = {
        p.name: _parse_param(where, p, space_raw.get(p.name, p.default)) for p in HEAD_PARAMETERS
    }
    direction = _choice(
        where, "search.direction", _get(s_raw, SearchConfig, "direction"), DIRECTIONS
    )
    metric = _choice(where, "search.metric", _get(s_raw, SearchConfig, "metric"), METRICS)
    expected = METRIC_DIRECTIONS[metric]
    if direction != expected:
        raise ConfigError(
            f"{where}: search.direction: got '{direction}' for metric '{metric}'; "
            f"use direction: {expected}"
        )
    search = SearchConfig(
        n_trials=nt,
        timeout=float(timeout) if timeout is not None else None,
        sampler=_choice(where, "search.sampler", _get(s_raw, SearchConfig, "sampler"), SAMPLERS),
        pruner=_choice(where, "search.pruner", _get(s_raw, SearchConfig, "pruner"), PRUNERS),
        direction=direction,
        metric=metric,
        seed=_int(where, "search.seed", _get(s_raw, SearchConfig, "seed"), 0),
        space=space,
        heartbeat_interval=_int(
            where,
            "search.heartbeat_interval",
            _get(s_raw, SearchConfig, "heartbeat_interval"),
            1,
        ),
        grace_period=_int(
            where, "search.grace_period", _get(s_raw, SearchConfig, "grace_period"), 2
        ),
        max_retry=_int(where, "search.max_retry", _get(s_raw, SearchConfig, "max_retry"), 0),
        max_failures=_int(
            where, "search.max_failures", _get(s_raw, SearchConfig, "max_failures"), 1
        ),
        cv_folds=_cv_folds(where, _get(s_raw, SearchConfig, "cv_folds")),
        repeats=_int(where, "search.repeats", _get(s_raw, SearchConfig, "repeats"), 1, 100),
        class_weight=_class_weight(where, _get(s_raw, SearchConfig, "class_weight")),
    )
    if search.grace_period <= search.heartbeat_interval:
        raise ConfigError(
            f"{where}: search.grace_period: got {search.grace_period}; it must be longer than "
            f"heartbeat_interval ({search.heartbeat_interval})"
        )
    if search.sampler == "grid":
        for p in space.values():
            if p.kind == "float" and p.step is None:
                raise ConfigError(
                    f"{where}: search.space.{p.name}: the grid sampler needs choices or a fixed "
                    "value (or an int range, or a float range with step)"
                )

    # storage and tracking
    if storage is not None:
        st = _storage_url(where, storage, Path.cwd(), "--storage")
    else:
        st = _storage_url(where, raw.get("storage", DEFAULT_STORAGE), base, "storage")
    if tracking_uri is not None:
        tracking_uri = _tracking_uri(where, tracking_uri, "--tracking-uri")
    elif raw.get("tracking_uri") is not None:
        tracking_uri = _tracking_uri(where, raw["tracking_uri"], "tracking_uri")

    register = raw.get("register", DEFAULT_REGISTER)
    if register is not None:
        register = model_name(where, "register", register)

    return SweepConfig(
        path=path.resolve(),
        study=name,
        data=data,
        backbones=backbones,
        cache_dir=cdir,
        search=search,
        storage=st,
        tracking_uri=tracking_uri,
        text=text,
        register=register,
        finetune=parse_finetune(where, raw.get("finetune")),
    )


def check_study_name(where: str, field_name: str, study: str | None, raw: Mapping) -> str:
    """The study name: 1 to STUDY_NAME_MAX printable characters, any script, quotes and slashes.

    Leading and trailing spaces are dropped; control characters (a newline, a tab, NUL) are
    refused, since neither a terminal line nor every database can carry them.
    """
    name = study if study is not None else raw.get("study")
    if not isinstance(name, str) or not name.strip():
        raise _fail(where, field_name, name, STUDY_NAME_RULE)
    name = name.strip()
    if len(name) > STUDY_NAME_MAX or not name.isprintable():
        raise _fail(where, field_name, name, STUDY_NAME_RULE)
    return name


STUDY_NAME_MAX = 200  # MLflow keeps run names to 250 characters, experiments to 256
STUDY_NAME_RULE = (
    f"expected a name of 1 to {STUDY_NAME_MAX} printable characters (any language, spaces, "
    "quotes and slashes are fine; no newline, tab or other control character)"
)

# The tracking URIs MLflow 3.17 builds a store for (mlflow/tracking/_tracking_service/utils.py):
# a local path or file:, a database through SQLAlchemy, a tracking server, or Databricks.
TRACKING_DATABASES = ("postgresql", "mysql", "sqlite", "mssql")
TRACKING_SCHEMES = ("file", "http", "https", "databricks", "databricks-uc", "uc")
_TRACKING_ALLOWED = (
    "expected a folder path, file:///DIR, sqlite:///FILE, postgresql://, mysql://, mssql://, "
    "http(s)://HOST:PORT or databricks"
)


def _tracking_uri(where: str, uri: Any, field_name: str) -> str:
    """Check an MLflow tracking URI's form (reaching it is checked when a command starts)."""
    from urllib.parse import urlsplit

    if not isinstance(uri, str) or not uri.strip():
        raise _fail(where, field_name, uri, _TRACKING_ALLOWED)
    uri = uri.strip()
    if uri.startswith("postgres://"):  # neither MLflow nor SQLAlchemy 2 take this alias
        uri = "postgresql://" + uri[len("postgres://") :]
    if uri in ("databricks", "databricks-uc", "uc"):
        return uri
    try:
        parts = urlsplit(uri)
    except ValueError:
        raise _fail(where, field_name, redact_url(uri), _TRACKING_ALLOWED) from None
    scheme = parts.scheme.lower()
    if "://" not in uri and ":" in uri.split("/", 1)[0]:
        scheme = uri.split(":", 1)[0].lower()  # e.g. "bogus:x"
    elif "://" not in uri:
        scheme = ""  # a plain folder path
    if scheme in ("", "file"):
        return uri
    if scheme in ("http", "https"):
        if not parts.hostname:
            raise _fail(where, field_name, redact_url(uri), "expected http(s)://HOST[:PORT]")
        try:
            parts.port  # noqa: B018 - raises on a port that is not a number
        except ValueError:
            raise _fail(where, field_name, redact_url(uri), "the port must be a number") from None
        return uri
    if scheme.partition("+")[0] in TRACKING_DATABASES:
        if scheme.startswith("sqlite") and parts.path.lstrip("/") in ("", ":memory:"):
            raise _fail(where, field_name, uri, "use a file: sqlite:///mlflow.db")
        if not scheme.startswith("sqlite") and not parts.hostname and "host=" not in parts.query:
            raise _fail(where, field_name, redact_url(uri), "expected DIALECT://USER@HOST/DB")
        return uri
    if scheme in TRACKING_SCHEMES:
        return uri
    raise _fail(where, field_name, redact_url(uri), _TRACKING_ALLOWED)


def model_name(where: str, field_name: str, v: Any) -> str:
    """A registered model's name: letters, digits, ``_ . -`` and spaces, up to 200."""
    if not isinstance(v, str) or not re.fullmatch(r"[\w.\- ]{1,200}", v.strip()):
        err = _fail(where, field_name, v, "expected a model name (letters, digits, _ . - space)")
        raise ConfigError(str(err).removeprefix(": ")) if not where else err
    return v.strip()


def _cv_folds(where: str, v: Any) -> int | None:
    """``null``, 0 or 1: off; otherwise the number of folds (2 to 20)."""
    if v is None or (_is_int(v) and v in (0, 1)):
        return None
    return _int(where, "search.cv_folds", v, 2, 20)


def _class_weight(where: str, v: Any) -> str | dict[str, float]:
    """``none``, ``balanced`` or a mapping of class names to positive weights."""
    name = "search.class_weight"
    allowed = "allowed: none | balanced | {class name: weight > 0}"
    if v is None:
        return "none"
    if isinstance(v, str):
        return _choice(where, name, v, CLASS_WEIGHTS)
    if not isinstance(v, dict) or not v:
        raise _fail(where, name, v, allowed)
    out: dict[str, float] = {}
    for k, w in v.items():
        if not _is_num(w) or w <= 0:
            raise _fail(where, f"{name}.{k}", w, "expected a weight > 0")
        out[str(k)] = float(w)
    return out


# The SQLAlchemy dialects Optuna's RDBStorage can use (sqlite is handled above).
# The SQLAlchemy dialects whose worker lock tlsweep implements (workers.storage_lock:
# pg_advisory_lock, GET_LOCK); other databases Optuna could use (oracle, mssql, cockroachdb) are
# refused, since N workers there could not agree on who runs the last trials.
_DATABASES = ("postgresql", "postgres", "mysql", "mariadb")


def _storage_url(where: str, url: Any, base: Path, field_name: str) -> str:
    """Resolve a storage URL: a relative SQLite or journal path is made absolute against base."""
    if not isinstance(url, str) or not url:
        raise _fail(where, field_name, url, "expected an Optuna storage URL like sqlite:///x.db")
    if url.startswith("sqlite:///"):
        rest = url[len("sqlite:///") :]
        if rest in ("", ":memory:"):
            raise _fail(where, field_name, url, "use a file: sqlite:///tlsweep.db")
        p = Path(rest).expanduser()
        if not p.is_absolute():
            p = (base / p).resolve()
        return f"sqlite:///{p}"
    if url.startswith("journal:"):
        p = Path(url[len("journal:") :]).expanduser()
        if not p.is_absolute():
            p = (base / p).resolve()
        return f"journal:{p}"
    if url.startswith("postgres://"):  # SQLAlchemy 2 dropped this alias of postgresql://
        url = "postgresql://" + url[len("postgres://") :]
    scheme = url.partition("://")[0].partition("+")[0] if "://" in url else None
    if scheme not in _DATABASES:
        raise _fail(
            where,
            field_name,
            redact_url(url),  # no password in the message
            "expected sqlite:///FILE, journal:FILE, postgresql://... or mysql://... (the "
            "storages whose worker lock tlsweep implements)",
        )
    return url


def with_overrides(cfg: SweepConfig, **changes: Any) -> SweepConfig:
    """A copy of ``cfg`` with top-level fields replaced (used by tests and the CLI)."""
    return replace(cfg, **changes)


# --- the resolved sweep: a record of what ran ----------------------------------------------------
def resolved(cfg: SweepConfig) -> dict[str, Any]:
    """The sweep as it runs: a sweep file with every default filled in and every override applied.

    Loading it back (:func:`load_sweep`) gives the same configuration; passwords in URLs are
    replaced by ``***``. With the versions that ran it, it is what :func:`resolved_yaml` writes.
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
    from importlib import metadata

    from tlsweep._version import __version__

    out = {"tlsweep": __version__}
    for pkg in ("keras", "tensorflow", "optuna", "mlflow", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "absent"
    return out


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
