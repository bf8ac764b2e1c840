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
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from tlsweep.errors import BackboneError, ConfigError
from tlsweep.registry import get_spec

# --- every default, in one place ---------------------------------------------------------------
DEFAULT_CACHE_DIR = ".tlsweep/cache"  # relative to the working directory
DEFAULT_STORAGE = "sqlite:///tlsweep.db"  # relative to the sweep file
DEFAULT_VALIDATION_SPLIT = 0.2  # layout B only
DEFAULT_TEST_SPLIT = 0.1  # layout B only
DEFAULT_SEED = 1337
DEFAULT_POOLING = "avg"
DEFAULT_WEIGHTS = "imagenet"
DEFAULT_N_TRIALS = 40
DEFAULT_SAMPLER = "tpe"
DEFAULT_PRUNER = "median"
DEFAULT_METRIC = "val_accuracy"
DEFAULT_HEARTBEAT_INTERVAL = 5  # seconds between a running trial's heartbeats
DEFAULT_GRACE_PERIOD = 30  # seconds without a heartbeat before a trial is taken as dead
DEFAULT_MAX_RETRY = 3  # how often the parameters of a trial killed mid-way are retried

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

SAMPLERS = ("tpe", "random", "grid", "cmaes", "gp", "qmc")
PRUNERS = ("median", "hyperband", "none")
DIRECTIONS = ("maximize", "minimize")
METRICS = ("val_accuracy", "val_loss")
POOLINGS = ("avg", "max", "flatten")
OPTIMIZERS = ("adam", "sgd", "rmsprop")

# The head's hyperparameters: name -> (kind, default used when the sweep has no `space`).
# A sweep may set any of these to a fixed value, a range or a list of choices.
HEAD_PARAMS: dict[str, str] = {
    "units": "int",
    "dropout": "float",
    "learning_rate": "float",
    "batch_size": "int",
    "epochs": "int",
    "hidden_layers": "int",
    "l2": "float",
    "label_smoothing": "float",
    "optimizer": "str",
}
DEFAULT_SPACE: dict[str, Any] = {
    "units": {"low": 32, "high": 1024, "log": True},
    "dropout": {"low": 0.0, "high": 0.7},
    "learning_rate": {"low": 1.0e-5, "high": 1.0e-2, "log": True},
    "batch_size": {"choices": [16, 32, 64, 128]},
    "epochs": 30,
    "hidden_layers": 1,
    "l2": 0.0,
    "label_smoothing": 0.0,
    "optimizer": "adam",
}
# Bounds every value of a head parameter must respect, whatever the sweep says.
_PARAM_BOUNDS: dict[str, tuple[float, float]] = {
    "units": (1, 65536),
    "dropout": (0.0, 0.99),
    "learning_rate": (1e-9, 10.0),
    "batch_size": (1, 65536),
    "epochs": (1, 10000),
    "hidden_layers": (0, 8),
    "l2": (0.0, 1.0),
    "label_smoothing": (0.0, 0.99),
}


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***``: the one place URLs are made safe to print."""
    return re.sub(r"//([^:/@]*):[^@/]*@", r"//\1:***@", url)


def _fail(where: str, field_name: str, value: Any, allowed: str) -> ConfigError:
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return ConfigError(f"{where}: {field_name}: got {shown}; {allowed}")


# --- the schema --------------------------------------------------------------------------------
@dataclass(frozen=True)
class DataConfig:
    """Where the images are and how layout B is split."""

    dir: Path
    validation_split: float = DEFAULT_VALIDATION_SPLIT
    test_split: float = DEFAULT_TEST_SPLIT
    seed: int = DEFAULT_SEED


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
        return "-".join(parts)


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
    direction: str = "maximize"
    metric: str = DEFAULT_METRIC
    seed: int = DEFAULT_SEED
    space: Mapping[str, Param] = field(default_factory=dict)
    heartbeat_interval: int = DEFAULT_HEARTBEAT_INTERVAL
    grace_period: int = DEFAULT_GRACE_PERIOD
    max_retry: int = DEFAULT_MAX_RETRY


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
    finetune: FinetuneConfig | None = None  # None: no fine-tuning stage

    def space_fingerprint(self) -> str:
        """A hash of the search space, stored in the study to refuse a changed space."""
        payload = {name: p.to_json() for name, p in sorted(self.search.space.items())}
        payload["backbone"] = [b.label for b in self.backbones]
        payload["direction"] = self.search.direction
        payload["metric"] = self.search.metric
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
    "finetune",
)
_FINETUNE_KEYS = tuple(DEFAULT_FINETUNE)
_AUGMENT_KEYS = tuple(DEFAULT_FINETUNE["augment"])
_DATA_KEYS = ("dir", "validation_split", "test_split", "seed")
_BACKBONE_KEYS = ("name", "weights", "input_size", "pooling", "args")
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


def _parse_param(where: str, name: str, spec: Any) -> Param:
    fname = f"search.space.{name}"
    kind = HEAD_PARAMS[name]
    bounds = _PARAM_BOUNDS.get(name)

    def check_value(v: Any, label: str) -> Any:
        if kind == "str":
            if name == "optimizer":
                return _choice(where, label, v, OPTIMIZERS)
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
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise _fail(where, f"{fname}.log", log, "expected true or false")
    if log and low <= 0:
        raise _fail(where, f"{fname}.low", low, "a log range needs low > 0")
    step = spec.get("step")
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
    weights = spec.get("weights", DEFAULT_WEIGHTS)
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
    input_size = spec.get("input_size")
    if input_size is not None:
        input_size = _int(where, f"{sec}.input_size", input_size, 32, 2048)
    pooling = _choice(where, f"{sec}.pooling", spec.get("pooling", DEFAULT_POOLING), POOLINGS)
    args = spec.get("args") or {}
    if not isinstance(args, dict):
        raise _fail(where, f"{sec}.args", args, "expected a mapping of constructor arguments")
    for reserved in ("weights", "include_top", "input_shape", "pooling", "input_tensor"):
        if reserved in args:
            raise ConfigError(
                f"{where}: {sec}.args.{reserved}: set by tlsweep; use the backbone's own field"
            )
    return BackboneConfig(
        name=name, weights=weights, input_size=input_size, pooling=pooling, args=dict(args)
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
    return json.dumps([b.name, b.weights, b.input_size, b.pooling, sorted(b.args.items())])


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
) -> SweepConfig:
    """Read, validate and resolve a sweep file; command-line overrides win over the file."""
    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise ConfigError(f"{where}: no such sweep file; give the path to a YAML sweep file")
    try:
        text = path.read_text(encoding="utf-8")
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

    name = study if study is not None else raw.get("study")
    if not isinstance(name, str) or not name.strip() or len(name) > 200:
        raise _fail(where, "study", name, "expected a non-empty name (at most 200 characters)")
    name = name.strip()

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
        where, "data.validation_split", data_raw.get("validation_split", DEFAULT_VALIDATION_SPLIT)
    )
    tsplit = _fraction(where, "data.test_split", data_raw.get("test_split", DEFAULT_TEST_SPLIT))
    if vsplit <= 0:
        raise _fail(where, "data.validation_split", vsplit, "expected a number above 0")
    if vsplit + tsplit >= 0.9:
        raise ConfigError(
            f"{where}: data: validation_split + test_split = {vsplit + tsplit:g} leaves too few "
            "training images; keep the sum below 0.9"
        )
    dseed = _int(where, "data.seed", data_raw.get("seed", DEFAULT_SEED), 0)
    data = DataConfig(dir=ddir, validation_split=vsplit, test_split=tsplit, seed=dseed)

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
    nt = n_trials if n_trials is not None else s_raw.get("n_trials", DEFAULT_N_TRIALS)
    nt = _int(where, "search.n_trials" if n_trials is None else "--n-trials", nt, 1)
    timeout = s_raw.get("timeout")
    if timeout is not None and (not _is_num(timeout) or timeout <= 0):
        raise _fail(where, "search.timeout", timeout, "expected a number of seconds > 0, or null")
    space_raw = s_raw.get("space")
    if space_raw is None:
        space_raw = {}
    if not isinstance(space_raw, dict):
        raise _fail(where, "search.space", space_raw, "expected a mapping of parameter names")
    _check_keys(where, "search.space", space_raw, tuple(HEAD_PARAMS))
    merged = {**DEFAULT_SPACE, **space_raw}
    space = {n: _parse_param(where, n, merged[n]) for n in HEAD_PARAMS}
    direction = _choice(where, "search.direction", s_raw.get("direction", "maximize"), DIRECTIONS)
    metric = _choice(where, "search.metric", s_raw.get("metric", DEFAULT_METRIC), METRICS)
    expected = "maximize" if metric == "val_accuracy" else "minimize"
    if direction != expected:
        raise ConfigError(
            f"{where}: search.direction: got '{direction}' for metric '{metric}'; "
            f"use direction: {expected}"
        )
    search = SearchConfig(
        n_trials=nt,
        timeout=float(timeout) if timeout is not None else None,
        sampler=_choice(where, "search.sampler", s_raw.get("sampler", DEFAULT_SAMPLER), SAMPLERS),
        pruner=_choice(where, "search.pruner", s_raw.get("pruner", DEFAULT_PRUNER), PRUNERS),
        direction=direction,
        metric=metric,
        seed=_int(where, "search.seed", s_raw.get("seed", DEFAULT_SEED), 0),
        space=space,
        heartbeat_interval=_int(
            where,
            "search.heartbeat_interval",
            s_raw.get("heartbeat_interval", DEFAULT_HEARTBEAT_INTERVAL),
            1,
        ),
        grace_period=_int(
            where, "search.grace_period", s_raw.get("grace_period", DEFAULT_GRACE_PERIOD), 2
        ),
        max_retry=_int(where, "search.max_retry", s_raw.get("max_retry", DEFAULT_MAX_RETRY), 0),
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
    if tracking_uri is None:
        tracking_uri = raw.get("tracking_uri")
    if tracking_uri is not None and (not isinstance(tracking_uri, str) or not tracking_uri):
        raise _fail(where, "tracking_uri", tracking_uri, "expected an MLflow tracking URI or null")

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
        finetune=parse_finetune(where, raw.get("finetune")),
    )


# The SQLAlchemy dialects Optuna's RDBStorage can use (sqlite is handled above).
_DATABASES = ("postgresql", "postgres", "mysql", "mariadb", "oracle", "mssql", "cockroachdb")


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
    scheme = url.partition("://")[0].partition("+")[0] if "://" in url else None
    if scheme not in _DATABASES:
        raise _fail(
            where,
            field_name,
            redact_url(url),  # no password in the message
            "expected sqlite:///FILE, journal:FILE or a database URL like postgresql://... "
            f"({', '.join(_DATABASES)})",
        )
    return url


def with_overrides(cfg: SweepConfig, **changes: Any) -> SweepConfig:
    """A copy of ``cfg`` with top-level fields replaced (used by tests and the CLI)."""
    return replace(cfg, **changes)
