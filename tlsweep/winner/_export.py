"""The winner as one Keras model taking raw images, saved with its metadata and registered.

The exported model is one Keras model: ``Resizing -> preprocessing (a frozen Dense(3)) ->
backbone -> pooling -> head``, taking raw RGB images (0..255) of any size and returning class
probabilities; it uses built-in layers only, so ``keras.models.load_model`` loads it in safe
mode without tlsweep installed. The class names travel inside the ``.keras`` file as
``tlsweep.json`` (see :func:`read_metadata`). The file is written atomically, logged on the
study's parent run and, when asked, registered (the ``champion`` alias follows the validation
score).
"""

from __future__ import annotations

import contextlib
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tlsweep.config import SweepConfig
from tlsweep.errors import ServiceError, TlsweepError, first_line
from tlsweep.files import replaced_atomically

from ._rebuild import Winner, evaluate_and_log

if TYPE_CHECKING:
    import optuna

    from tlsweep.tracking import Tracker

METADATA_NAME = "tlsweep.json"


def image_branch(bb: Any, inputs: Any, suffix: str = "") -> Any:
    """``Resizing -> preprocessing -> backbone (inference mode) -> pooling`` on ``inputs``."""
    import keras

    from tlsweep import backbones as bbs

    size = bb.input_size
    x = keras.layers.Resizing(size, size, interpolation="bilinear", name=f"resize{suffix}")(inputs)
    x = bbs.preprocess_layer(bb, name=f"preprocess{suffix}")(x)
    base = bbs.build_base(bb)
    if suffix:  # two members may build the same Keras model name; layer names must be unique
        base.name = f"{base.name}{suffix}"
    x = base(x, training=False)
    return bbs.pooling_layer(bb.pooling, name=f"pool{suffix}")(x)


def build_features_model(bb: Any) -> Any:
    """Raw RGB images of any size -> the features the head was trained on.

    A fused backbone runs one branch per member on the same images and concatenates them.
    """
    import keras

    inputs = keras.Input((None, None, 3), name="image")
    if bb.members:
        branches = [image_branch(m, inputs, f"_{j}") for j, m in enumerate(bb.members)]
        x = keras.layers.Concatenate(name="features")(branches)
    else:
        x = image_branch(bb, inputs)
    return keras.Model(inputs, x, name="tlsweep_features")


def build_export_model(w: Winner) -> Any:
    """Raw RGB images of any size -> class probabilities [n, classes]."""
    import keras

    features = build_features_model(w.backbone)
    head = w.head.to_keras()
    p = head(features.output)
    if w.head.n_classes == 2:
        p = keras.layers.Concatenate(name="probabilities")([1.0 - p, p])
    return keras.Model(features.input, p, name="tlsweep_classifier")


def _input_sizes(bb: Any) -> list[int]:
    return [m.input_size for m in bb.members] if bb.members else [bb.input_size]


def metadata(cfg: SweepConfig, w: Winner) -> dict[str, Any]:
    return {
        "class_names": w.entry.class_names,
        "input": "RGB images, values 0..255, any size (resized to "
        + " and ".join(f"{s}x{s}" for s in _input_sizes(w.backbone))
        + " inside the model)",
        "output": "class probabilities, one column per class_names entry",
        "backbone": w.entry.manifest["backbone"],
        "study": cfg.study,
        "trial": w.number,
        "params": w.params,
        f"validation_{cfg.search.metric}": w.value,
        "test": w.test,
        **_views_note(cfg, w),
    }


def _views_note(cfg: SweepConfig, w: Winner) -> dict[str, Any]:
    """What an exported model trained on augmented views computes, in its metadata."""
    a = w.backbone.augment
    if a is None:
        return {}
    note = {
        "augment": {"views": a.views, "flip": a.flip, "crop": a.crop, "tta": a.tta},
        "test_time_augmentation": False,
        "scores": "the model sees one image as it is (no test-time augmentation): "
        "test.accuracy is its score"
        + (
            "; the trial's validation value and test.tta_accuracy are the mean over the cached "
            "views, which the model does not compute"
            if a.tta
            else ""
        ),
    }
    if w.validation_single_view is not None:  # the registry ranks on what the model computes
        note[f"validation_{cfg.search.metric}"] = w.validation_single_view
        note[f"validation_{cfg.search.metric}_tta"] = w.value
    return note


@dataclass
class Registration:
    """What :func:`export` did in the model registry."""

    name: str
    version: int
    promoted: bool  # the `champion` alias now points at this version
    previous: float | None  # the champion's validation score before, if it had one


def export(
    cfg: SweepConfig,
    study: optuna.Study,
    output: str | Path,
    tracker: Tracker | None,
    register: str | None = None,
    extracted: list | None = None,
) -> tuple[Winner, Registration | None]:
    """Write the winner as one ``.keras`` file (and log it to the parent run as an MLflow model).

    ``register`` (or the sweep's ``register:``): also register that MLflow model as a new
    version of this registered model, promoted to ``@champion`` on its validation score.
    """
    check_output(output)
    w = evaluate_and_log(cfg, study, tracker, extracted)
    return w, save_model(cfg, w, build_export_model(w), output, tracker, register=register)


def check_output(output: str | Path) -> None:
    if Path(output).suffix != ".keras":
        raise TlsweepError(f"--output {output}: the file name must end in .keras")


def save_model(
    cfg: SweepConfig,
    w: Winner,
    model: Any,
    output: str | Path,
    tracker: Tracker | None,
    extra: dict[str, Any] | None = None,
    register: str | None = None,
) -> Registration | None:
    """Save ``model`` (the winner's, frozen or fine-tuned) with its metadata, atomically; log it
    to the parent run and register it (``register`` or the sweep's ``register:``)."""
    check_output(output)
    output = Path(output)
    meta = {**metadata(cfg, w), **(extra or {})}
    write_atomically(model, meta, output)
    name = register or cfg.register
    reg = None
    if tracker is not None and tracker.parent_run_id:
        uri = tracker.log_parent_model(model, meta, output)
        if name and uri:
            # ranked on the validation score of the model exported (fine-tuned or frozen)
            value = meta.get(f"validation_{cfg.search.metric}", w.value)
            version, promoted, before = tracker.register(
                uri,
                name,
                value,
                cfg.search.metric,
                cfg.search.direction,
                {"tlsweep.trial": w.number, "tlsweep.backbone": w.backbone.label},
            )
            reg = Registration(name, version, promoted, before)
    elif name:
        raise TlsweepError(f"--register {name}: needs the study's MLflow parent run")
    return reg


def write_atomically(model: Any, meta: dict[str, Any], output: Path) -> None:
    """``model`` with ``meta`` inside, as ``output``: whole or absent, never half-written (a full
    disk, Ctrl-C), and never mixed with another process's export to the same file.

    Each writer has its own temporary file in the target's folder (so the rename is atomic);
    the last rename wins and the file is always one writer's whole model.
    """
    made = [d for d in (output.parent, *output.parent.parents) if not d.exists()]
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        with replaced_atomically(output, suffix=".keras") as tmp:  # Keras wants the suffix
            model.save(tmp)
            with zipfile.ZipFile(tmp, "a") as z:
                z.writestr(METADATA_NAME, json.dumps(meta, indent=1, default=str))
    except OSError as e:  # a full disk, a quota, a folder made read-only meanwhile
        _remove(made)
        raise ServiceError(
            f"--output {output}: cannot write the model ({_why(e)}); nothing was written: "
            "free some space (or pick another folder) and export again"
        ) from None
    except BaseException:  # Ctrl-C: no temporary file, no folder made for nothing
        _remove(made)
        raise


def _remove(made: list[Path]) -> None:
    for d in made:  # deepest first
        with contextlib.suppress(OSError):
            d.rmdir()


def _why(e: OSError) -> str:
    return e.strerror or first_line(e)


def read_metadata(model_path: str | Path) -> dict[str, Any]:
    """The ``tlsweep.json`` stored inside an exported ``.keras`` file."""
    try:
        with zipfile.ZipFile(model_path) as z:
            return json.loads(z.read(METADATA_NAME))
    except (OSError, KeyError, zipfile.BadZipFile, ValueError):
        return {}
