"""The head's parameters, declared once, and the search space derived from that declaration.

:data:`HEAD_PARAMETERS` names each hyperparameter of the head with its type, default, bounds
and help. The sweep file's ``search.space`` validation (:func:`parse_space`), the default
search space (:data:`DEFAULT_SPACE`), the trainer's :class:`tlsweep.head.HeadParams` fields and
the README's ``space:`` block (:func:`space_yaml`, checked by a test) all follow from it: a new
parameter is one declaration here, plus its use in the trainer.

This module imports neither TensorFlow, Optuna nor MLflow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from tlsweep.errors import ConfigError

from ._checks import check_keys, choice, fail, field_value, is_int, is_num

OPTIMIZERS = ("adam", "sgd", "rmsprop")  # the head's, and the fine-tuning stage's


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


# --- the search space: one dimension per head parameter ---------------------------------------
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


def grid_values(p: Param) -> list[Any] | None:
    """The values a grid search tries for ``p``: its choices, every step of its range, or its
    fixed value; None for a float range without a step (it has no grid)."""
    if p.kind == "fixed":
        return [p.value]
    if p.kind == "categorical":
        return list(p.choices or ())
    if p.kind == "int":
        return list(range(int(p.low), int(p.high) + 1, int(p.step or 1)))
    if p.step is None:
        return None
    n = int(math.floor((p.high - p.low) / p.step + 1e-9)) + 1
    return [round(p.low + i * p.step, 12) for i in range(n)]


def largest(p: Param) -> Any:
    """The largest value ``p`` can take (the top of a stepped range is the last step)."""
    if p.kind == "fixed":
        return p.value
    if p.kind == "categorical":
        return max(p.choices or ())
    if p.step is not None:
        return p.low + math.floor((p.high - p.low) / p.step + 1e-9) * p.step
    return p.high


_PARAM_KEYS = ("low", "high", "log", "step", "choices")


def _parse_param(where: str, decl: HeadParam, spec: Any) -> Param:
    name = decl.name
    fname = f"search.space.{name}"
    kind = decl.kind
    bounds = decl.bounds

    def check_value(v: Any, label: str) -> Any:
        if kind == "str":
            if decl.choices:
                return choice(where, label, v, decl.choices)
            if not isinstance(v, str):
                raise fail(where, label, v, "expected a string")
            return v
        if kind == "int" and not is_int(v):
            raise fail(where, label, v, "expected an integer")
        if kind == "float" and not is_num(v):
            raise fail(where, label, v, "expected a number")
        if bounds and not bounds[0] <= v <= bounds[1]:
            raise fail(where, label, v, f"expected a value from {bounds[0]} to {bounds[1]}")
        return float(v) if kind == "float" else int(v)

    if not isinstance(spec, dict):
        if isinstance(spec, list):
            raise fail(where, fname, spec, "write a list of options as {choices: [...]}")
        return Param(name=name, value=check_value(spec, fname), kind="fixed")
    check_keys(where, fname, spec, _PARAM_KEYS)
    if "choices" in spec:
        if set(spec) - {"choices"}:
            raise ConfigError(f"{where}: {fname}: 'choices' cannot be combined with low/high/log")
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise fail(where, f"{fname}.choices", choices, "expected a non-empty list")
        values = tuple(check_value(c, f"{fname}.choices") for c in choices)
        if len(set(values)) != len(values):
            raise fail(where, f"{fname}.choices", choices, "expected distinct values")
        if len(values) == 1:
            return Param(name=name, value=values[0], kind="fixed")
        return Param(name=name, choices=values, kind="categorical")
    if "low" not in spec or "high" not in spec:
        raise ConfigError(
            f"{where}: {fname}: a range needs both 'low' and 'high' "
            "(or give 'choices', or a plain value)"
        )
    if kind == "str":
        raise fail(where, fname, spec, "expected a value or {choices: [...]}")
    low = check_value(spec["low"], f"{fname}.low")
    high = check_value(spec["high"], f"{fname}.high")
    if low > high:
        raise ConfigError(f"{where}: {fname}: low ({low}) is greater than high ({high})")
    log = field_value(spec, Param, "log")
    if not isinstance(log, bool):
        raise fail(where, f"{fname}.log", log, "expected true or false")
    if log and low <= 0:
        raise fail(where, f"{fname}.low", low, "a log range needs low > 0")
    step = field_value(spec, Param, "step")
    if step is not None:
        if not is_num(step) or step <= 0 or (kind == "int" and not is_int(step)):
            raise fail(where, f"{fname}.step", step, "expected a positive number")
        if log:
            raise ConfigError(f"{where}: {fname}: 'step' cannot be combined with 'log: true'")
    if low == high:
        return Param(name=name, value=low, kind="fixed")
    return Param(name=name, low=low, high=high, log=log, step=step, kind=kind)


def parse_space(where: str, space_raw: Any) -> dict[str, Param]:
    """The ``search.space`` section: one :class:`Param` per head parameter, defaults filled in."""
    if space_raw is None:
        space_raw = {}
    if not isinstance(space_raw, dict):
        raise fail(where, "search.space", space_raw, "expected a mapping of parameter names")
    check_keys(where, "search.space", space_raw, tuple(p.name for p in HEAD_PARAMETERS))
    return {
        p.name: _parse_param(where, p, space_raw.get(p.name, p.default)) for p in HEAD_PARAMETERS
    }
