"""The sweep file's ``backbones:`` list: each entry parsed, ``{choices: [...]}`` of size and
pooling expanded, fused entries built, ``augment:`` views parsed, and every backbone checked
against the registry (:func:`resolve_backbone`) before any work starts.

This module imports neither TensorFlow, Optuna nor MLflow: the registry's metadata suffices.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from tlsweep.backbones import get_spec
from tlsweep.errors import BackboneError, ConfigError

from ._checks import check_keys, choice, fail, field_value, integer, is_num, resolve_path
from ._schema import (
    DEFAULT_VIEWS,
    FUSED_NAME,
    MAX_VIEWS,
    POOLINGS,
    VIEW_TRAINING,
    BackboneConfig,
    ViewsConfig,
)

_BACKBONE_KEYS = ("name", "weights", "input_size", "pooling", "args", "augment")
_VIEWS_KEYS = tuple(DEFAULT_VIEWS)
_SEARCHABLE_BACKBONE_KEYS = ("input_size", "pooling")  # may be {choices: [...]}


def _parse_backbone(where: str, i: int, spec: Any, base: Path) -> BackboneConfig:
    sec = f"backbones[{i}]"
    if isinstance(spec, str):
        spec = {"name": spec}
    check_keys(where, sec, spec, _BACKBONE_KEYS)
    if "name" not in spec:
        raise ConfigError(f"{where}: {sec}.name: missing; give a keras.applications class name")
    name = spec["name"]
    if not isinstance(name, str) or not name:
        raise fail(where, f"{sec}.name", name, "expected a keras.applications class name")
    weights = field_value(spec, BackboneConfig, "weights")
    if weights is None:
        weights = "none"
    if not isinstance(weights, str) or not weights:
        raise fail(where, f"{sec}.weights", weights, "allowed: imagenet | none | a file path")
    if weights.lower() in ("imagenet", "none"):
        weights = weights.lower()
    else:
        wpath = resolve_path(base, weights)
        if not wpath.is_file():
            raise fail(
                where,
                f"{sec}.weights",
                weights,
                f"no such file ({wpath}); allowed: imagenet | none | a weights file path",
            )
        weights = str(wpath)
    input_size = field_value(spec, BackboneConfig, "input_size")
    if input_size is not None:
        input_size = integer(where, f"{sec}.input_size", input_size, 32, 2048)
    pooling = choice(
        where, f"{sec}.pooling", field_value(spec, BackboneConfig, "pooling"), POOLINGS
    )
    args = spec.get("args") or {}
    if not isinstance(args, dict):
        raise fail(where, f"{sec}.args", args, "expected a mapping of constructor arguments")
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
    check_keys(where, sec, raw, _VIEWS_KEYS)
    d = {**DEFAULT_VIEWS, **raw}
    for k in ("flip", "tta"):
        if not isinstance(d[k], bool):
            raise fail(where, f"{sec}.{k}", d[k], "expected true or false")
    crop = d["crop"]
    if not is_num(crop) or not 0 <= crop <= 0.5:
        raise fail(where, f"{sec}.crop", crop, "expected a number from 0 to 0.5")
    if not d["flip"] and crop == 0:
        raise ConfigError(
            f"{where}: {sec}: flip: false and crop: 0 make every view the plain image; "
            "set flip: true or crop > 0, or remove augment"
        )
    return ViewsConfig(
        views=integer(where, f"{sec}.views", d["views"], 2, MAX_VIEWS),
        flip=d["flip"],
        crop=float(crop),
        tta=d["tta"],
        train=choice(where, f"{sec}.train", d["train"], VIEW_TRAINING),
        seed=integer(where, f"{sec}.seed", d["seed"], 0),
    )


def _backbone_choices(where: str, sec: str, spec: dict[str, Any]) -> list[dict[str, Any]]:
    """One plain backbone spec per combination of ``input_size`` and ``pooling`` choices."""
    combos: list[dict[str, Any]] = [dict(spec)]
    for key in _SEARCHABLE_BACKBONE_KEYS:
        value = spec.get(key)
        if isinstance(value, list):
            raise fail(where, f"{sec}.{key}", value, "write a list of options as {choices: [...]}")
        if not isinstance(value, dict):
            continue
        check_keys(where, f"{sec}.{key}", value, ("choices",))
        choices = value.get("choices")
        if not isinstance(choices, list) or not choices:
            raise fail(where, f"{sec}.{key}.choices", choices, "expected a non-empty list")
        if any(isinstance(c, (dict, list)) for c in choices) or len(
            {json.dumps(c) for c in choices}
        ) != len(choices):
            raise fail(where, f"{sec}.{key}.choices", choices, "expected distinct plain values")
        combos = [{**c, key: v} for c in combos for v in choices]
    return combos


def _parse_fused(where: str, i: int, spec: dict[str, Any], base: Path) -> BackboneConfig:
    sec = f"backbones[{i}]"
    check_keys(where, sec, spec, (FUSED_NAME,))
    members_raw = spec[FUSED_NAME]
    if not isinstance(members_raw, list) or len(members_raw) < 2:
        raise fail(where, f"{sec}.fuse", members_raw, "expected a list of 2 or more backbones")
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
        raise fail(where, "backbones", raw, "expected a non-empty list of backbones")
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
