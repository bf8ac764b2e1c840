"""Reading a sweep file: :func:`load_sweep` turns its YAML into a validated
:class:`~tlsweep.config.SweepConfig`, command-line overrides applied.

The file is loaded with ``yaml.safe_load``. Unknown keys are errors. Every bad value raises a
:class:`~tlsweep.errors.ConfigError` whose message is one line naming the field, the value and
what is allowed, before any work starts. Defaults come from the schema in
:mod:`tlsweep.config`; the ``backbones:`` list is parsed by :mod:`tlsweep.config._backbones`,
``search.space`` by :mod:`tlsweep.config._params`, the URLs by :mod:`tlsweep.config._urls`.

Paths in the sweep file (``data.dir``, a weights file, a ``sqlite:///`` storage) are relative to
the sweep file; ``cache_dir`` is relative to the working directory. Command-line overrides are
relative to the working directory.

This module imports neither TensorFlow, Optuna nor MLflow.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from tlsweep.errors import ConfigError, ServiceError

from ._backbones import parse_backbones
from ._checks import (
    check_keys,
    choice,
    fail,
    field_value,
    fraction,
    integer,
    is_int,
    is_num,
    resolve_path,
)
from ._params import OPTIMIZERS, parse_space
from ._schema import (
    CLASS_WEIGHTS,
    DEDUPE_CHOICES,
    DEFAULT_CACHE_DIR,
    DEFAULT_FINETUNE,
    DEFAULT_REGISTER,
    DEFAULT_STORAGE,
    DIRECTIONS,
    METRIC_DIRECTIONS,
    METRICS,
    PRUNERS,
    SAMPLERS,
    AugmentConfig,
    DataConfig,
    FinetuneConfig,
    SearchConfig,
    SweepConfig,
    check_combinations,
)
from ._urls import check_storage_url, check_tracking_uri

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
_DATA_KEYS = ("dir", "validation_split", "test_split", "seed", "verify", "dedupe")
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
    check_keys(where, "", raw, _TOP_KEYS)
    base = path.resolve().parent

    name = check_study_name(where, "study" if study is None else "--study", study, raw)

    # data
    if "data" not in raw:
        raise ConfigError(f"{where}: data: missing; give data.dir, the folder of images")
    data_raw = raw["data"]
    if isinstance(data_raw, str):
        data_raw = {"dir": data_raw}
    check_keys(where, "data", data_raw, _DATA_KEYS)
    if data_dir is not None:
        ddir = Path(data_dir).expanduser().resolve()
    else:
        d = data_raw.get("dir")
        if not isinstance(d, str) or not d:
            raise fail(where, "data.dir", d, "expected the path of a folder of images")
        ddir = resolve_path(base, d)
    if check_data_dir and not ddir.is_dir():
        raise fail(where, "data.dir", str(ddir), "no such folder; fix data.dir or pass --data DIR")
    vsplit = fraction(
        where, "data.validation_split", field_value(data_raw, DataConfig, "validation_split")
    )
    tsplit = fraction(where, "data.test_split", field_value(data_raw, DataConfig, "test_split"))
    if vsplit <= 0:
        raise fail(where, "data.validation_split", vsplit, "expected a number above 0")
    if vsplit + tsplit >= 0.9:
        raise ConfigError(
            f"{where}: data: validation_split + test_split = {vsplit + tsplit:g} leaves too few "
            "training images; keep the sum below 0.9"
        )
    dseed = integer(where, "data.seed", field_value(data_raw, DataConfig, "seed"), 0)
    dverify = field_value(data_raw, DataConfig, "verify") if verify is None else verify
    if not isinstance(dverify, bool):
        raise fail(where, "data.verify", dverify, "expected true or false")
    ddedupe = field_value(data_raw, DataConfig, "dedupe")
    if ddedupe is False:  # YAML 1.1 reads an unquoted `off` as false
        ddedupe = "off"
    if ddedupe not in DEDUPE_CHOICES:
        raise fail(where, "data.dedupe", ddedupe, f"expected one of {', '.join(DEDUPE_CHOICES)}")
    data = DataConfig(
        dir=ddir,
        validation_split=vsplit,
        test_split=tsplit,
        seed=dseed,
        verify=dverify,
        dedupe=ddedupe,
    )

    # backbones
    backbones = parse_backbones(where, raw.get("backbones"), base)

    # cache
    if cache_dir is not None:
        cdir = Path(cache_dir).expanduser().resolve()
    else:
        c = raw.get("cache_dir", DEFAULT_CACHE_DIR)
        if not isinstance(c, str) or not c:
            raise fail(where, "cache_dir", c, "expected a folder path")
        cdir = Path(c).expanduser().resolve()

    # search
    s_raw = raw.get("search") or {}
    check_keys(where, "search", s_raw, _SEARCH_KEYS)
    nt = n_trials if n_trials is not None else field_value(s_raw, SearchConfig, "n_trials")
    nt = integer(where, "search.n_trials" if n_trials is None else "--n-trials", nt, 1)
    timeout = field_value(s_raw, SearchConfig, "timeout")
    if timeout is not None and (not is_num(timeout) or timeout <= 0):
        raise fail(where, "search.timeout", timeout, "expected a number of seconds > 0, or null")
    space = parse_space(where, s_raw.get("space"))
    direction = choice(
        where, "search.direction", field_value(s_raw, SearchConfig, "direction"), DIRECTIONS
    )
    metric = choice(where, "search.metric", field_value(s_raw, SearchConfig, "metric"), METRICS)
    expected = METRIC_DIRECTIONS[metric]
    if direction != expected:
        raise ConfigError(
            f"{where}: search.direction: got '{direction}' for metric '{metric}'; "
            f"use direction: {expected}"
        )
    search = SearchConfig(
        n_trials=nt,
        timeout=float(timeout) if timeout is not None else None,
        sampler=choice(
            where, "search.sampler", field_value(s_raw, SearchConfig, "sampler"), SAMPLERS
        ),
        pruner=choice(where, "search.pruner", field_value(s_raw, SearchConfig, "pruner"), PRUNERS),
        direction=direction,
        metric=metric,
        seed=integer(where, "search.seed", field_value(s_raw, SearchConfig, "seed"), 0),
        space=space,
        heartbeat_interval=integer(
            where,
            "search.heartbeat_interval",
            field_value(s_raw, SearchConfig, "heartbeat_interval"),
            1,
        ),
        grace_period=integer(
            where, "search.grace_period", field_value(s_raw, SearchConfig, "grace_period"), 2
        ),
        max_retry=integer(
            where, "search.max_retry", field_value(s_raw, SearchConfig, "max_retry"), 0
        ),
        max_failures=integer(
            where, "search.max_failures", field_value(s_raw, SearchConfig, "max_failures"), 1
        ),
        cv_folds=_cv_folds(where, field_value(s_raw, SearchConfig, "cv_folds")),
        repeats=integer(
            where, "search.repeats", field_value(s_raw, SearchConfig, "repeats"), 1, 100
        ),
        class_weight=_class_weight(where, field_value(s_raw, SearchConfig, "class_weight")),
    )
    if search.grace_period <= search.heartbeat_interval:
        raise ConfigError(
            f"{where}: search.grace_period: got {search.grace_period}; it must be longer than "
            f"heartbeat_interval ({search.heartbeat_interval})"
        )
    check_combinations(
        where, search, backbones, "search.n_trials" if n_trials is None else "--n-trials"
    )

    # storage and tracking
    if storage is not None:
        st = check_storage_url(where, storage, Path.cwd(), "--storage")
    else:
        st = check_storage_url(where, raw.get("storage", DEFAULT_STORAGE), base, "storage")
    if tracking_uri is not None:
        tracking_uri = check_tracking_uri(where, tracking_uri, "--tracking-uri")
    elif raw.get("tracking_uri") is not None:
        tracking_uri = check_tracking_uri(where, raw["tracking_uri"], "tracking_uri")

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
        raise fail(where, field_name, name, STUDY_NAME_RULE)
    name = name.strip()
    if len(name) > STUDY_NAME_MAX or not name.isprintable():
        raise fail(where, field_name, name, STUDY_NAME_RULE)
    return name


STUDY_NAME_MAX = 200  # MLflow keeps run names to 250 characters, experiments to 256
STUDY_NAME_RULE = (
    f"expected a name of 1 to {STUDY_NAME_MAX} printable characters (any language, spaces, "
    "quotes and slashes are fine; no newline, tab or other control character)"
)


def model_name(where: str, field_name: str, v: Any) -> str:
    """A registered model's name: letters, digits, ``_ . -`` and spaces, up to 200."""
    if not isinstance(v, str) or not re.fullmatch(r"[\w.\- ]{1,200}", v.strip()):
        err = fail(where, field_name, v, "expected a model name (letters, digits, _ . - space)")
        raise ConfigError(str(err).removeprefix(": ")) if not where else err
    return v.strip()


def _cv_folds(where: str, v: Any) -> int | None:
    """``null``, 0 or 1: off; otherwise the number of folds (2 to 20)."""
    if v is None or (is_int(v) and v in (0, 1)):
        return None
    return integer(where, "search.cv_folds", v, 2, 20)


def _class_weight(where: str, v: Any) -> str | dict[str, float]:
    """``none``, ``balanced`` or a mapping of class names to positive weights."""
    name = "search.class_weight"
    allowed = "allowed: none | balanced | {class name: weight > 0}"
    if v is None:
        return "none"
    if isinstance(v, str):
        return choice(where, name, v, CLASS_WEIGHTS)
    if not isinstance(v, dict) or not v:
        raise fail(where, name, v, allowed)
    out: dict[str, float] = {}
    for k, w in v.items():
        if not is_num(w) or w <= 0:
            raise fail(where, f"{name}.{k}", w, "expected a weight > 0")
        out[str(k)] = float(w)
    return out


def parse_finetune(where: str, raw: Any) -> FinetuneConfig | None:
    """The ``finetune:`` section (absent or false: None; true or {}: every default)."""
    if raw is None or raw is False:
        return None
    if raw is True:
        raw = {}
    check_keys(where, "finetune", raw, _FINETUNE_KEYS)
    d = {**DEFAULT_FINETUNE, **raw}
    lr = d["learning_rate"]
    if not is_num(lr) or not 0 < lr <= 1:
        raise fail(where, "finetune.learning_rate", lr, "expected a number above 0, at most 1")
    unfreeze = d["unfreeze"]
    if isinstance(unfreeze, str) and unfreeze.lower() == "all":
        unfreeze = None
    elif not is_int(unfreeze) or unfreeze < 0:
        raise fail(where, "finetune.unfreeze", unfreeze, "expected an integer >= 0 or 'all'")
    aug_raw = d["augment"]
    if aug_raw is None or aug_raw is False:
        aug_raw = {"flip": False}
    check_keys(where, "finetune.augment", aug_raw, _AUGMENT_KEYS)
    aug = {**DEFAULT_FINETUNE["augment"], **aug_raw}
    if not isinstance(aug["flip"], bool):
        raise fail(where, "finetune.augment.flip", aug["flip"], "expected true or false")
    for k in ("rotation", "zoom", "contrast"):
        if not is_num(aug[k]) or not 0 <= aug[k] < 1:
            raise fail(where, f"finetune.augment.{k}", aug[k], "expected a number from 0 to 1")
    return FinetuneConfig(
        epochs=integer(where, "finetune.epochs", d["epochs"], 1, 10000),
        learning_rate=float(lr),
        batch_size=integer(where, "finetune.batch_size", d["batch_size"], 1, 4096),
        unfreeze=unfreeze,
        optimizer=choice(where, "finetune.optimizer", d["optimizer"], OPTIMIZERS),
        patience=integer(where, "finetune.patience", d["patience"], 1),
        augment=AugmentConfig(
            flip=aug["flip"],
            rotation=float(aug["rotation"]),
            zoom=float(aug["zoom"]),
            contrast=float(aug["contrast"]),
        ),
    )
