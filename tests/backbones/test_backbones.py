"""The backbone registry, preprocessing as an affine map, and real feature extractors."""

from __future__ import annotations

import functools
import importlib
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import MNV2_WEIGHTS, SHARED, keras_asks_for, need_shared

from tlsweep.backbones._build import build_extractor, output_shape, preprocess_affine
from tlsweep.backbones._registry import REGISTRY, BackboneSpec, get_spec, list_backbones
from tlsweep.config._backbones import resolve_backbone as resolve
from tlsweep.config._schema import BackboneConfig
from tlsweep.errors import BackboneError

SPECS = list_backbones()


def test_list_backbones_is_the_sorted_registry() -> None:
    assert [s.name for s in SPECS] == sorted(REGISTRY)
    assert len(SPECS) == len(REGISTRY) >= 30


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_spec_sanity(spec: BackboneSpec) -> None:
    import keras

    assert 32 <= spec.min_size <= spec.default_size
    assert spec.channels > 0
    if spec.source == "keras.applications":
        assert hasattr(keras.applications, spec.name), f"keras.applications.{spec.name}"
    else:
        assert (spec.source, spec.name, spec.has_imagenet) == ("tlsweep", "TinyConvNet", False)
    module = importlib.import_module(f"keras.applications.{spec.module}")
    assert callable(module.preprocess_input)
    assert spec.feature_shape(spec.default_size, "avg") == (spec.channels,)
    assert spec.feature_shape(spec.default_size, "max") == (spec.channels,)
    side = spec.feature_side
    assert spec.feature_shape(spec.default_size, "flatten") == (side * side * spec.channels,)
    assert resolve(BackboneConfig(spec.name, weights="none")).input_size == spec.default_size


@pytest.mark.slow  # builds all 40 models: 3-12 minutes on a 2-core machine
@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_registry_sizes_are_the_built_models(spec: BackboneSpec) -> None:
    """Every size the registry (and `tlsweep backbones`) states is the built model's output."""
    import keras

    from tlsweep.backbones._build import _constructor

    size = spec.default_size
    with keras.StatelessScope():  # the layer graph only: no weights allocated
        base = _constructor(spec)(include_top=False, weights=None, input_shape=(size, size, 3))
    _, h, w, c = base.output_shape
    assert (h, w, c) == (spec.feature_side, spec.feature_side, spec.channels)
    assert spec.feature_shape(size, "flatten") == (h * w * c,)
    assert spec.feature_shape(size, "avg") == (c,)


def test_backbones_command_prints_the_built_sizes() -> None:
    """Inception at 299 px ends in 8x8 (valid paddings), not ceil(299 / 32) = 10."""
    r = subprocess.run(
        [sys.executable, "-m", "tlsweep", "backbones"], capture_output=True, text=True, check=True
    )
    rows = {line.split()[0]: line.split() for line in r.stdout.splitlines()[1:]}
    assert len(rows) == len(SPECS)
    assert rows["InceptionV3"][1:5] == ["299", "75", "2048", str(8 * 8 * 2048)]
    assert rows["InceptionResNetV2"][1:5] == ["299", "75", "1536", str(8 * 8 * 1536)]
    assert rows["Xception"][4] == str(10 * 10 * 2048)
    assert rows["EfficientNetB7"][4] == str(19 * 19 * 2560)
    for spec in SPECS:
        assert rows[spec.name][4] == str(spec.feature_side**2 * spec.channels), spec.name


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_preprocess_affine_reproduces_preprocess_input(spec: BackboneSpec) -> None:
    module = importlib.import_module(f"keras.applications.{spec.module}")
    kernel, bias = preprocess_affine(BackboneConfig(spec.name))
    assert kernel.shape == (3, 3) and bias.shape == (3,)
    x = np.random.default_rng(hash(spec.name) % 2**32).uniform(0, 255, (3, 7, 5, 3))
    want = np.asarray(module.preprocess_input(x.astype("float32").copy()), dtype="float64")
    got = x @ kernel.astype("float64") + bias
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_preprocess_affine_knows_the_bgr_swap() -> None:
    kernel, bias = preprocess_affine(BackboneConfig("VGG16"))  # caffe mode: RGB->BGR, mean
    assert np.allclose(kernel, np.eye(3)[::-1])
    np.testing.assert_allclose(bias, [-103.939, -116.779, -123.68], atol=1e-3)
    kernel, bias = preprocess_affine(BackboneConfig("MobileNetV2"))  # tf mode: x/127.5 - 1
    np.testing.assert_allclose(kernel, np.eye(3) / 127.5, atol=1e-7)
    np.testing.assert_allclose(bias, [-1, -1, -1], atol=1e-6)


@pytest.mark.parametrize(
    ("name", "wanted"),
    [
        ("MobilNetV2", "MobileNetV2"),
        ("ResNet5", "ResNet50"),
        ("EficientNetB0", "EfficientNetB0"),
        ("mobilenetv2", "did you mean 'MobileNetV2'"),
        ("vgg16", "did you mean 'VGG16'"),
    ],
)
def test_get_spec_unknown_name_lists_close_matches(name: str, wanted: str) -> None:
    with pytest.raises(BackboneError) as e:
        get_spec(name)
    msg = str(e.value)
    assert f"'{name}'" in msg and wanted in msg and "\n" not in msg


def test_get_spec_unknown_name_without_close_match() -> None:
    with pytest.raises(BackboneError) as e:
        get_spec("Zzyzx")
    assert "did you mean" not in str(e.value)
    assert "tlsweep backbones" in str(e.value) and str(len(REGISTRY)) in str(e.value)


def test_get_spec_known() -> None:
    assert get_spec("MobileNetV2").module == "mobilenet_v2"
    assert get_spec("InceptionV3").min_size == 75


@pytest.mark.parametrize("spec", [s for s in SPECS if s.min_size > 32], ids=lambda s: s.name)
def test_resolve_rejects_too_small_input(spec: BackboneSpec) -> None:
    too_small = BackboneConfig(spec.name, weights="none", input_size=spec.min_size - 1)
    with pytest.raises(BackboneError) as e:
        resolve(too_small, "here")
    assert str(e.value).startswith("here.input_size:") and str(spec.min_size) in str(e.value)
    ok = resolve(BackboneConfig(spec.name, weights="none", input_size=spec.min_size))
    assert ok.input_size == spec.min_size


def test_resolve_nasnet_imagenet_needs_its_default_size() -> None:
    with pytest.raises(BackboneError, match="224"):
        resolve(BackboneConfig("NASNetMobile", weights="imagenet", input_size=160))
    assert resolve(BackboneConfig("NASNetMobile", weights="none", input_size=160)).input_size == 160
    assert resolve(BackboneConfig("NASNetMobile")).input_size == 224


def test_tiny_convnet_has_no_imagenet_weights() -> None:
    with pytest.raises(BackboneError) as e:
        resolve(BackboneConfig("TinyConvNet"), "bb")  # weights: imagenet, the default
    assert str(e.value).startswith("bb.weights: got 'imagenet'; TinyConvNet has no ImageNet")
    assert "weights: none" in str(e.value)


def test_tiny_convnet_is_seeded_and_shaped_like_a_real_backbone() -> None:
    """The test stand-in: same features on every build, stride 32, channels as registered."""
    spec = get_spec("TinyConvNet")
    x = np.random.default_rng(0).uniform(0, 255, (2, 96, 96, 3)).astype("float32")
    for pooling in ("avg", "flatten"):
        bb = resolve(BackboneConfig("TinyConvNet", weights="none", input_size=96, pooling=pooling))
        a = build_extractor(bb)(x).numpy()
        b = build_extractor(bb)(x).numpy()
        assert a.shape == (2, *output_shape(bb))  # 96 px / stride 32: 3 x 3 x 32 flattened
        if pooling == "flatten":
            assert a.shape == (2, 3 * 3 * spec.channels)
        np.testing.assert_array_equal(a, b)
        assert a.std() > 0


def test_resolve_unknown_name_names_the_field() -> None:
    with pytest.raises(BackboneError, match=r"^bb\.name: unknown backbone 'Foo'"):
        resolve(BackboneConfig("Foo"), "bb")


# --- real extractors ---------------------------------------------------------------------------
def _mnv2(pooling: str, size: int = 96, weights: str | None = None) -> BackboneConfig:
    need_shared()
    return BackboneConfig(
        "MobileNetV2",
        weights=weights or str(MNV2_WEIGHTS),
        input_size=size,
        pooling=pooling,
        args={"alpha": 0.35},
    )


@functools.cache
def _extractor(pooling: str, size: int = 96):  # noqa: ANN202 - a keras.Model
    return build_extractor(_mnv2(pooling, size))


@pytest.mark.parametrize("pooling", ["avg", "max", "flatten"])
def test_build_extractor_output_shape(pooling: str) -> None:
    size = 96
    model = _extractor(pooling, size)
    side = math.ceil(size / 32)
    dim = {"avg": 1280, "max": 1280, "flatten": side * side * 1280}[pooling]
    assert model.output_shape == (None, dim)
    assert output_shape(_mnv2(pooling, size)) == (dim,)
    if pooling == "flatten":  # the registry knows flatten sizes at the default size only
        with pytest.raises(BackboneError, match="built model"):
            get_spec("MobileNetV2").feature_shape(size, pooling)
    x = np.random.default_rng(0).uniform(0, 255, (2, size, size, 3)).astype("float32")
    out = model(x, training=False).numpy()
    assert out.shape == (2, dim) and out.dtype == np.float32
    assert np.isfinite(out).all() and out.std() > 0
    assert not np.allclose(out[0], out[1])  # different images, different features


def test_extractor_equals_keras_preprocess_then_backbone() -> None:
    """The frozen Dense(3) preprocessing + backbone + pooling compute what Keras's recipe does."""
    import keras

    size = 96
    x = np.random.default_rng(1).uniform(0, 255, (3, size, size, 3)).astype("float32")
    ours = _extractor("avg", size)(x, training=False).numpy()
    base = keras.applications.MobileNetV2(
        include_top=False, weights=str(MNV2_WEIGHTS), input_shape=(size, size, 3), alpha=0.35
    )
    pre = keras.applications.mobilenet_v2.preprocess_input(x.copy())
    ref = base(pre, training=False).numpy().mean(axis=(1, 2))
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)


def test_bad_weights_file_is_a_backbone_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not an HDF5 file")
    with pytest.raises(BackboneError) as e:
        build_extractor(_mnv2("avg", weights=str(bad)))
    assert str(bad) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("args", "names"),
    [
        ({"alpha": 0.5}, ("args: and weights:", "alpha': 0.5", str(MNV2_WEIGHTS))),  # wrong file
        ({"alpah": 0.35}, ("args:", "alpah")),  # a typo: not a constructor argument
    ],
)
def test_args_that_do_not_fit_name_the_fields(args: dict, names: tuple[str, ...]) -> None:
    import dataclasses

    bb = dataclasses.replace(_mnv2("avg"), args=args)
    with pytest.raises(BackboneError) as e:
        build_extractor(bb)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"backbone {bb.label}: ")
    for name in names:
        assert name in msg, msg


_IMAGENET_SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    from tlsweep.backbones import build_extractor
    from tlsweep.config import BackboneConfig

    out, weights_file = sys.argv[1], sys.argv[2]
    x = np.random.default_rng(0).uniform(0, 255, (2, 224, 224, 3)).astype("float32")
    feats = {}
    for key, weights in (("imagenet", "imagenet"), ("file", weights_file)):
        bb = BackboneConfig("MobileNetV2", weights=weights, input_size=224, pooling="avg",
                            args={"alpha": 0.35})
        feats[key] = build_extractor(bb)(x, training=False).numpy()
    np.savez(out, imagenet=feats["imagenet"], from_file=feats["file"])
    """
)


@pytest.mark.slow
def test_imagenet_weights_offline_from_keras_home(tmp_path: Path) -> None:
    """``weights: imagenet`` finds Keras's own cached file in KERAS_HOME: no download."""
    need_shared()
    home = tmp_path / "keras_home"
    shutil.copytree(SHARED / "keras_home", home)
    out = tmp_path / "feats.npz"
    env = {
        **os.environ,
        "KERAS_HOME": str(home),
        "TF_CPP_MIN_LOG_LEVEL": "2",
        # any download attempt must fail fast rather than hang
        "HTTP_PROXY": "http://127.0.0.1:9",
        "HTTPS_PROXY": "http://127.0.0.1:9",
    }
    proc = subprocess.run(
        [sys.executable, "-c", _IMAGENET_SCRIPT, str(out), str(MNV2_WEIGHTS)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    feats = np.load(out)
    assert feats["imagenet"].shape == (2, 1280)
    assert feats["imagenet"].std() > 0
    np.testing.assert_allclose(feats["imagenet"], feats["from_file"], rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # builds every registered model once (minutes on 2 cores)
@pytest.mark.parametrize(
    "spec", [s for s in list_backbones() if s.has_imagenet], ids=lambda s: s.name
)
def test_imagenet_file_name_of_every_backbone_is_the_one_keras_asks_for(
    spec: BackboneSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``weights: imagenet`` is keyed by the bytes of this file, found without TensorFlow."""
    import keras

    from tlsweep.backbones._build import imagenet_weights_file

    bb = BackboneConfig(spec.name, "imagenet", spec.default_size)
    try:
        assert imagenet_weights_file(bb) == keras_asks_for(bb, monkeypatch)
    finally:
        keras.backend.clear_session()
