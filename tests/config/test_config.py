"""The sweep file: resolution of paths and defaults, and one-line errors for every bad field.

No TensorFlow here: these tests only need a folder and a (dummy) weights file.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import readme_sweep, write_sweep

from tlsweep.config import _params as P
from tlsweep.config import _resolved as R
from tlsweep.config import _schema as C
from tlsweep.config import _sweepfile as S
from tlsweep.config._sweepfile import load_sweep
from tlsweep.errors import ConfigError

DELETE = object()


@pytest.fixture
def base(tmp_path: Path) -> dict[str, Any]:
    """A valid sweep document: MobileNetV2 with a (dummy) weights file."""
    (tmp_path / "images").mkdir()
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "w.h5").write_bytes(b"not really weights; only its existence counts")
    backbones = [
        {
            "name": "MobileNetV2",
            "weights": str(tmp_path / "weights" / "w.h5"),
            "input_size": 96,
            "pooling": "avg",
            "args": {"alpha": 0.35},
        }
    ]
    path = write_sweep(tmp_path / "sweep.yaml", tmp_path / "images", backbones=backbones)
    return yaml.safe_load(path.read_text())


def _set(doc: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    *parents, last = dotted.split(".")
    node: Any = doc
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
    if isinstance(node, list):
        node[int(last)] = value
    elif value is DELETE:
        node.pop(last, None)
    else:
        node[last] = value
    return doc


def _write(tmp_path: Path, doc: Any, name: str = "sweep.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _error(path: Path, **kw: Any) -> str:
    with pytest.raises(ConfigError) as e:
        load_sweep(path, **kw)
    msg = str(e.value)
    assert "\n" not in msg, f"not one line: {msg!r}"
    assert msg.startswith(str(path)), msg
    return msg


# --- valid sweeps ------------------------------------------------------------------------------
def test_valid_sweep_resolves(tmp_path: Path, base: dict[str, Any]) -> None:
    cfg = load_sweep(_write(tmp_path, _set(base, "backbones.0.weights", "weights/w.h5")))
    assert cfg.path == (tmp_path / "sweep.yaml").resolve()
    assert cfg.study == base["study"]
    assert cfg.data.dir == (tmp_path / "images").resolve()
    assert cfg.data.validation_split == C.DEFAULT_VALIDATION_SPLIT
    assert cfg.data.test_split == C.DEFAULT_TEST_SPLIT
    assert cfg.data.seed == C.DEFAULT_SEED
    (bb,) = cfg.backbones
    assert (bb.name, bb.input_size, bb.pooling, dict(bb.args)) == (
        "MobileNetV2",
        96,
        "avg",
        {"alpha": 0.35},
    )
    assert bb.weights == str((tmp_path / "weights" / "w.h5").resolve())  # relative to the sweep
    assert bb.label == "MobileNetV2-alpha0.35-96-avg"
    s = cfg.search
    assert (s.n_trials, s.sampler, s.pruner) == (base["search"]["n_trials"], "random", "none")
    assert (s.direction, s.metric, s.seed) == ("maximize", C.DEFAULT_METRIC, C.DEFAULT_SEED)
    assert set(s.space) == set(P.HEAD_PARAMS)  # the defaults fill in what the file leaves out
    assert s.space["units"].kind == "int" and s.space["units"].log
    assert (s.space["units"].low, s.space["units"].high) == (16, 128)
    assert s.space["dropout"].kind == "float" and not s.space["dropout"].log
    assert s.space["batch_size"].kind == "categorical"
    assert s.space["batch_size"].choices == (32, 64)
    assert s.space["epochs"].kind == "fixed" and s.space["epochs"].value == 5
    assert s.space["optimizer"].value == P.DEFAULT_SPACE["optimizer"]
    assert s.space["hidden_layers"].value == P.DEFAULT_SPACE["hidden_layers"]
    assert cfg.storage == base["storage"]
    assert cfg.tracking_uri == base["tracking_uri"]
    assert "MobileNetV2" in cfg.text
    assert cfg.to_json()["study"] == base["study"]


def test_relative_paths_resolve_against_the_sweep_file(
    tmp_path: Path, base: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    conf = tmp_path / "conf"
    conf.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    doc = _set(base, "data.dir", "../images")
    doc = _set(doc, "backbones.0.weights", "../weights/w.h5")
    doc = _set(doc, "storage", DELETE)
    doc = _set(doc, "cache_dir", DELETE)
    cfg = load_sweep(_write(conf, doc))
    assert cfg.data.dir == (tmp_path / "images").resolve()
    assert cfg.backbones[0].weights == str((tmp_path / "weights" / "w.h5").resolve())
    # storage defaults to a SQLite file next to the sweep file ...
    assert cfg.storage == f"sqlite:///{(conf / 'tlsweep.db').resolve()}"
    assert C.DEFAULT_STORAGE == "sqlite:///tlsweep.db"
    # ... while the cache defaults to a folder under the working directory
    assert cfg.cache_dir == (elsewhere / C.DEFAULT_CACHE_DIR).resolve()


def test_relative_cache_dir_is_relative_to_cwd_and_storage_to_the_file(
    tmp_path: Path, base: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    conf = tmp_path / "conf"
    conf.mkdir()
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    doc = _set(base, "cache_dir", "my-cache")
    doc = _set(doc, "storage", "sqlite:///dbs/optuna.db")
    cfg = load_sweep(_write(conf, doc))
    assert cfg.cache_dir == (cwd / "my-cache").resolve()
    assert cfg.storage == f"sqlite:///{(conf / 'dbs' / 'optuna.db').resolve()}"
    cfg = load_sweep(_write(conf, _set(doc, "storage", "journal:j/optuna.log")))
    assert cfg.storage == f"journal:{(conf / 'j' / 'optuna.log').resolve()}"
    cfg = load_sweep(_write(conf, _set(doc, "storage", "postgresql://u:p@host/db")))
    assert cfg.storage == "postgresql://u:p@host/db"
    cfg = load_sweep(_write(conf, _set(doc, "storage", "mysql+pymysql://u:p@host/db")))
    assert cfg.storage == "mysql+pymysql://u:p@host/db"  # server URLs are kept as given
    cfg = load_sweep(_write(conf, _set(doc, "storage", "postgres://u:p@host/db")))
    assert cfg.storage == "postgresql://u:p@host/db"  # an alias SQLAlchemy 2 no longer takes
    assert "secret" not in _error(_write(conf, _set(doc, "storage", "foo://u:secret@host/db")))


def test_overrides_win_and_are_relative_to_cwd(
    tmp_path: Path, base: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    conf = tmp_path / "conf"
    conf.mkdir()
    cwd = tmp_path / "cwd"
    (cwd / "other-images").mkdir(parents=True)
    monkeypatch.chdir(cwd)
    doc = _set(base, "data.dir", "does/not/exist")  # the override makes this irrelevant
    cfg = load_sweep(
        _write(conf, doc),
        data_dir="other-images",
        cache_dir="c2",
        study="override",
        storage="sqlite:///o.db",
        tracking_uri="sqlite:///m.db",
        n_trials=7,
    )
    assert cfg.data.dir == (cwd / "other-images").resolve()
    assert cfg.cache_dir == (cwd / "c2").resolve()
    assert cfg.study == "override"
    assert cfg.storage == f"sqlite:///{(cwd / 'o.db').resolve()}"
    assert cfg.tracking_uri == "sqlite:///m.db"
    assert cfg.search.n_trials == 7
    # without the override the missing folder is an error, unless the check is turned off
    assert "data.dir" in _error(_write(conf, doc))
    assert load_sweep(_write(conf, doc), check_data_dir=False).data.dir.name == "exist"
    # a bad override is as much an error as a bad field
    msg = _error(_write(conf, base), n_trials=0)
    assert "--n-trials: got 0" in msg and "search.n_trials" not in msg  # names the flag


def test_short_forms(tmp_path: Path, base: dict[str, Any]) -> None:
    doc = _set(base, "data", str(tmp_path / "images"))  # data: DIR
    doc = _set(doc, "backbones", ["MobileNetV2", {"name": "InceptionV3", "weights": None}])
    doc = _set(doc, "search.space.batch_size", {"choices": [64]})  # one choice: fixed
    doc = _set(doc, "search.space.units", {"low": 32, "high": 32})  # low == high: fixed
    cfg = load_sweep(_write(tmp_path, doc))
    assert cfg.data.dir == (tmp_path / "images").resolve()
    mn, inc = cfg.backbones
    assert (mn.weights, mn.input_size, mn.pooling) == ("imagenet", 224, C.DEFAULT_POOLING)
    assert (inc.weights, inc.input_size) == ("none", 299)  # the registry's default size
    assert inc.label.endswith("-random")
    assert cfg.search.space["batch_size"].kind == "fixed"
    assert cfg.search.space["batch_size"].value == 64
    assert cfg.search.space["units"].kind == "fixed"
    assert cfg.search.space["units"].value == 32


def test_two_backbones_differing_only_by_weights_file_get_distinct_labels(
    tmp_path: Path, base: dict[str, Any]
) -> None:
    (tmp_path / "weights" / "v2.h5").write_bytes(b"other")
    second = {**base["backbones"][0], "weights": "weights/v2.h5"}
    cfg = load_sweep(_write(tmp_path, _set(base, "backbones", [base["backbones"][0], second])))
    a, b = (bb.label for bb in cfg.backbones)
    assert a != b
    assert a.endswith("-w") and b.endswith("-v2")


# --- unknown keys ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("container", "key", "shown", "suggestion"),
    [
        ("", "studdy", "studdy", "study"),
        ("", "zzzzzz", "zzzzzz", None),
        ("data", "vaildation_split", "data.vaildation_split", "validation_split"),
        ("data", "seeed", "data.seeed", "seed"),
        ("backbones.0", "poolng", "backbones[0].poolng", "pooling"),
        ("backbones.0", "input_sizes", "backbones[0].input_sizes", "input_size"),
        ("search", "n_trial", "search.n_trial", "n_trials"),
        ("search", "samplr", "search.samplr", "sampler"),
        ("search.space", "unit", "search.space.unit", "units"),
        ("search.space", "momentum", "search.space.momentum", None),
        ("search.space.units", "hgh", "search.space.units.hgh", "high"),
        ("search.space.batch_size", "choice", "search.space.batch_size.choice", "choices"),
    ],
)
def test_unknown_keys_are_errors_naming_the_key(
    tmp_path: Path,
    base: dict[str, Any],
    container: str,
    key: str,
    shown: str,
    suggestion: str | None,
) -> None:
    doc = _set(base, f"{container}.{key}" if container else key, 1)
    msg = _error(_write(tmp_path, doc))
    assert f"{shown}: unknown key" in msg
    if suggestion:
        assert f"did you mean '{suggestion}'" in msg
    else:
        assert "did you mean" not in msg


# --- bad values --------------------------------------------------------------------------------
_BB = "backbones[0]"
_SP = "search.space"
BAD_VALUES: list[tuple[str, Any, str]] = [
    ("study", "", "study"),
    ("study", "   ", "study"),
    ("study", 42, "study"),
    ("study", None, "study"),
    ("study", "x" * 201, "study"),
    ("data", DELETE, "data"),
    ("data", 5, "data"),
    ("data.dir", "no/such/folder", "data.dir"),
    ("data.dir", "", "data.dir"),
    ("data.dir", 5, "data.dir"),
    ("data.dir", DELETE, "data.dir"),
    ("data.validation_split", 0, "data.validation_split"),
    ("data.validation_split", -0.1, "data.validation_split"),
    ("data.validation_split", 1.0, "data.validation_split"),
    ("data.validation_split", 1.5, "data.validation_split"),
    ("data.validation_split", "0.2", "data.validation_split"),
    ("data.validation_split", True, "data.validation_split"),
    ("data.validation_split", 0.85, "validation_split + test_split"),
    ("data.test_split", -0.1, "data.test_split"),
    ("data.test_split", 1.0, "data.test_split"),
    ("data.test_split", "none", "data.test_split"),
    ("data.test_split", 0.75, "validation_split + test_split"),
    ("data.seed", -1, "data.seed"),
    ("data.seed", 1.5, "data.seed"),
    ("data.seed", "abc", "data.seed"),
    ("data.seed", True, "data.seed"),
    ("backbones", [], "backbones"),
    ("backbones", None, "backbones"),
    ("backbones", "MobileNetV2", "backbones"),
    ("backbones", {"name": "MobileNetV2"}, "backbones"),
    ("backbones.0", 5, _BB),
    ("backbones.0.name", "MobilNetV2", f"{_BB}.name"),
    ("backbones.0.name", "NoSuchNet", f"{_BB}.name"),
    ("backbones.0.name", "", f"{_BB}.name"),
    ("backbones.0.name", 5, f"{_BB}.name"),
    ("backbones.0.name", DELETE, f"{_BB}.name"),
    ("backbones.0.pooling", "mean", f"{_BB}.pooling"),
    ("backbones.0.pooling", None, f"{_BB}.pooling"),
    ("backbones.0.input_size", 16, f"{_BB}.input_size"),
    ("backbones.0.input_size", 4096, f"{_BB}.input_size"),
    ("backbones.0.input_size", "big", f"{_BB}.input_size"),
    ("backbones.0.input_size", 96.5, f"{_BB}.input_size"),
    ("backbones.0.input_size", True, f"{_BB}.input_size"),
    ("backbones.0.weights", "missing.h5", f"{_BB}.weights"),
    ("backbones.0.weights", "", f"{_BB}.weights"),
    ("backbones.0.weights", 5, f"{_BB}.weights"),
    ("backbones.0.args", [1, 2], f"{_BB}.args"),
    ("backbones.0.args", "alpha=0.35", f"{_BB}.args"),
    ("backbones.0.args.weights", "imagenet", f"{_BB}.args.weights"),
    ("backbones.0.args.include_top", True, f"{_BB}.args.include_top"),
    ("backbones.0.args.input_shape", [96, 96, 3], f"{_BB}.args.input_shape"),
    ("backbones.0.args.pooling", "avg", f"{_BB}.args.pooling"),
    ("backbones.0.args.input_tensor", None, f"{_BB}.args.input_tensor"),
    ("cache_dir", 5, "cache_dir"),
    ("cache_dir", "", "cache_dir"),
    ("search", "fast", "search"),
    ("search.n_trials", 0, "search.n_trials"),
    ("search.n_trials", -3, "search.n_trials"),
    ("search.n_trials", 2.5, "search.n_trials"),
    ("search.n_trials", "ten", "search.n_trials"),
    ("search.n_trials", True, "search.n_trials"),
    ("search.timeout", 0, "search.timeout"),
    ("search.timeout", -5, "search.timeout"),
    ("search.timeout", "1h", "search.timeout"),
    ("search.sampler", "bayes", "search.sampler"),
    ("search.sampler", 3, "search.sampler"),
    ("search.pruner", "asha", "search.pruner"),
    ("search.pruner", True, "search.pruner"),
    ("search.direction", "up", "search.direction"),
    ("search.metric", "accuracy", "search.metric"),
    ("search.metric", "val_loss", "search.direction"),  # val_loss with the default maximize
    ("search.direction", "minimize", "search.direction"),  # with the default val_accuracy
    ("search.seed", -1, "search.seed"),
    ("search.seed", "s", "search.seed"),
    ("search.heartbeat_interval", 0, "search.heartbeat_interval"),
    ("search.grace_period", 1, "search.grace_period"),
    ("search.grace_period", 5, "search.grace_period"),  # not longer than the heartbeat (5)
    ("search.max_retry", -1, "search.max_retry"),
    ("search.space", [1, 2], "search.space"),
    ("search.space", "units", "search.space"),
    (f"{_SP}.units", {"low": 100, "high": 10}, f"{_SP}.units"),
    (f"{_SP}.dropout", {"low": 0.6, "high": 0.1}, f"{_SP}.dropout"),
    (f"{_SP}.learning_rate", {"low": 0.0, "high": 0.1, "log": True}, f"{_SP}.learning_rate"),
    (f"{_SP}.l2", {"low": 0.0, "high": 0.1, "log": True}, f"{_SP}.l2.low"),
    (f"{_SP}.units", {"low": 0, "high": 64}, f"{_SP}.units.low"),
    (f"{_SP}.dropout", {"low": -1, "high": 0.5}, f"{_SP}.dropout.low"),
    (f"{_SP}.dropout", {"low": 0.0, "high": 1.5}, f"{_SP}.dropout.high"),
    (f"{_SP}.units", {"low": 16}, f"{_SP}.units"),
    (f"{_SP}.units", {"high": 16}, f"{_SP}.units"),
    (f"{_SP}.units", {"low": 16, "high": 64, "log": "yes"}, f"{_SP}.units.log"),
    (f"{_SP}.units", {"low": 16, "high": 64, "step": -1}, f"{_SP}.units.step"),
    (f"{_SP}.units", {"low": 16, "high": 64, "step": 0.5}, f"{_SP}.units.step"),
    (f"{_SP}.units", {"low": 16, "high": 64, "step": 2, "log": True}, f"{_SP}.units"),
    (f"{_SP}.batch_size", {"choices": []}, f"{_SP}.batch_size.choices"),
    (f"{_SP}.batch_size", {"choices": 32}, f"{_SP}.batch_size.choices"),
    (f"{_SP}.batch_size", {"choices": [32, 32]}, f"{_SP}.batch_size.choices"),
    (f"{_SP}.batch_size", {"choices": ["a", "b"]}, f"{_SP}.batch_size.choices"),
    (f"{_SP}.batch_size", {"choices": [32, 0]}, f"{_SP}.batch_size.choices"),
    (f"{_SP}.batch_size", {"choices": [32, 64], "low": 1}, f"{_SP}.batch_size"),
    (f"{_SP}.batch_size", [32, 64], f"{_SP}.batch_size"),
    (f"{_SP}.optimizer", {"choices": ["adam", "nadam"]}, f"{_SP}.optimizer.choices"),
    (f"{_SP}.optimizer", "nadam", f"{_SP}.optimizer"),
    (f"{_SP}.optimizer", {"low": 1, "high": 2}, f"{_SP}.optimizer"),
    (f"{_SP}.dropout", "high", f"{_SP}.dropout"),
    (f"{_SP}.dropout", float("nan"), f"{_SP}.dropout"),
    (f"{_SP}.learning_rate", float("inf"), f"{_SP}.learning_rate"),
    (f"{_SP}.units", {"low": "a", "high": 64}, f"{_SP}.units.low"),
    (f"{_SP}.units", 1.5, f"{_SP}.units"),
    (f"{_SP}.units", True, f"{_SP}.units"),
    (f"{_SP}.epochs", 0, f"{_SP}.epochs"),
    (f"{_SP}.hidden_layers", 9, f"{_SP}.hidden_layers"),
    (f"{_SP}.label_smoothing", 1.0, f"{_SP}.label_smoothing"),
    ("storage", "sqlite:///:memory:", "storage"),
    ("storage", "sqlite:///", "storage"),
    ("storage", "tlsweep.db", "storage"),
    ("storage", 5, "storage"),
    ("storage", "", "storage"),
    ("storage", "foo://x", "storage"),
    ("storage", "http://localhost:5000", "storage"),
    # databases Optuna takes but tlsweep has no worker lock for
    ("storage", "oracle://u:p@host/db", "storage"),
    ("storage", "mssql+pyodbc://u:p@host/db", "storage"),
    ("storage", "cockroachdb://u:p@host/db", "storage"),
    ("search.max_failures", 0, "search.max_failures"),
    ("search.max_failures", "many", "search.max_failures"),
    ("tracking_uri", 5, "tracking_uri"),
    ("tracking_uri", "", "tracking_uri"),
]


@pytest.mark.parametrize(
    ("dotted", "value", "field_name"),
    BAD_VALUES,
    ids=[f"{d}={'<deleted>' if v is DELETE else repr(v)}"[:60] for d, v, _ in BAD_VALUES],
)
def test_bad_values_raise_one_line_config_error_naming_the_field(
    tmp_path: Path, base: dict[str, Any], dotted: str, value: Any, field_name: str
) -> None:
    assert load_sweep(_write(tmp_path, base))  # the base is valid: the change alone is bad
    msg = _error(_write(tmp_path, _set(base, dotted, value)))
    assert field_name in msg


@pytest.mark.parametrize(
    ("backbone", "field_name", "wanted"),
    [
        ({"name": "MobilNetV2"}, "backbones[0].name", "MobileNetV2"),
        ({"name": "mobilenetv2"}, "backbones[0].name", "did you mean 'MobileNetV2'"),
        ({"name": "ResNet5"}, "backbones[0].name", "ResNet50"),
        ({"name": "EfficientNetB8"}, "backbones[0].name", "EfficientNetB7"),
        (
            {"name": "InceptionV3", "weights": "none", "input_size": 64},
            "backbones[0].input_size",
            "75",
        ),
        (
            {"name": "Xception", "weights": "none", "input_size": 70},
            "backbones[0].input_size",
            "71",
        ),
        ({"name": "NASNetMobile", "input_size": 160}, "backbones[0].input_size", "224"),
    ],
)
def test_backbone_registry_errors_are_config_errors(
    tmp_path: Path, base: dict[str, Any], backbone: dict[str, Any], field_name: str, wanted: str
) -> None:
    """Unknown names (with close matches) and sizes the backbone cannot take."""
    msg = _error(_write(tmp_path, _set(base, "backbones", [backbone])))
    assert field_name in msg
    assert wanted in msg


def test_the_same_backbone_twice_is_an_error(tmp_path: Path, base: dict[str, Any]) -> None:
    doc = _set(base, "backbones", [base["backbones"][0], dict(base["backbones"][0])])
    assert "backbones[1]" in _error(_write(tmp_path, doc))


def test_grid_sampler_needs_discrete_floats(tmp_path: Path, base: dict[str, Any]) -> None:
    doc = _set(base, "search.sampler", "grid")
    assert f"{_SP}.dropout" in _error(_write(tmp_path, doc))
    doc = _set(doc, f"{_SP}.dropout", {"low": 0.0, "high": 0.5, "step": 0.25})
    doc = _set(doc, f"{_SP}.learning_rate", {"choices": [1e-3, 1e-2]})
    cfg = load_sweep(_write(tmp_path, doc))
    assert cfg.search.space["dropout"].step == 0.25


# --- unreadable files --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "wanted"),
    [
        ("study: [unclosed\ndata: x\n", "not valid YAML at line"),
        ("study: test\n  data: : :\n", "not valid YAML"),
        ("\tstudy: tab\n", "not valid YAML"),
        ("", "empty"),
        ("# only a comment\n", "empty"),
        ("- a\n- list\n", "expected a mapping"),
        ("just a string\n", "expected a mapping"),
    ],
)
def test_invalid_yaml_and_empty_files(tmp_path: Path, text: str, wanted: str) -> None:
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    assert wanted in _error(path)


def test_missing_and_binary_sweep_files(tmp_path: Path) -> None:
    assert "no such sweep file" in _error(tmp_path / "nope.yaml")
    bad = tmp_path / "bin.yaml"
    bad.write_bytes(b"\xff\xfe\x00study")
    assert "cannot read" in _error(bad)


# --- the search-space fingerprint --------------------------------------------------------------
def test_space_fingerprint_follows_the_space_only(tmp_path: Path, base: dict[str, Any]) -> None:
    def fp(doc: dict[str, Any], **kw: Any) -> str:
        return load_sweep(_write(tmp_path, doc), **kw).space_fingerprint()

    ref = fp(base)
    assert ref == fp(base)  # stable
    same = [
        _set(base, "search.n_trials", 99),
        _set(base, "search.timeout", 60),
        _set(base, "study", "another-name"),
        _set(base, "storage", f"sqlite:///{tmp_path / 'other.db'}"),
        _set(base, "tracking_uri", DELETE),
        _set(base, "cache_dir", str(tmp_path / "elsewhere")),
    ]
    for doc in same:
        assert fp(doc) == ref
    assert fp(base, n_trials=1000) == ref
    changed = [
        _set(base, f"{_SP}.units.high", 256),
        _set(base, f"{_SP}.units.log", False),
        _set(base, f"{_SP}.batch_size", {"choices": [32, 64, 128]}),
        _set(base, f"{_SP}.epochs", 6),
        _set(base, f"{_SP}.optimizer", "sgd"),
        _set(base, f"{_SP}.hidden_layers", {"low": 1, "high": 2}),
        _set(base, "backbones.0.input_size", 128),
        _set(base, "backbones.0.pooling", "max"),
        _set(_set(base, "search.metric", "val_loss"), "search.direction", "minimize"),
    ]
    fps = [fp(doc) for doc in changed]
    assert ref not in fps
    assert len(set(fps)) == len(fps)


# --- study names and tracking URIs ---------------------------------------------------------------
@pytest.mark.parametrize(
    "name", ["it's", 'say "hi"', "team/exp 1", "chat été ☃ 猫", "x" * 200, "`tick` and 'both\""]
)
def test_study_names_that_work(tmp_path: Path, base: dict[str, Any], name: str) -> None:
    assert load_sweep(_write(tmp_path, _set(base, "study", name))).study == name
    assert load_sweep(_write(tmp_path, base), study=f"  {name} ").study == name  # --study


@pytest.mark.parametrize("name", ["", "   ", "a\nb", "tab\there", "nul\x00", "x" * 201, 42])
def test_study_names_refused(tmp_path: Path, base: dict[str, Any], name: Any) -> None:
    msg = _error(_write(tmp_path, _set(base, "study", name)))
    assert "study" in msg and "printable characters" in msg
    if isinstance(name, str):
        assert "--study" in _error(_write(tmp_path, base), study=name)


@pytest.mark.parametrize(
    ("uri", "kept"),
    [
        ("mlruns", "mlruns"),
        ("file:///tmp/mlruns", "file:///tmp/mlruns"),
        ("sqlite:///mlflow.db", "sqlite:///mlflow.db"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("https://mlflow.example.org", "https://mlflow.example.org"),
        ("postgresql://u:pw@db:5432/mlflow", "postgresql://u:pw@db:5432/mlflow"),
        ("postgresql+psycopg://u@db/mlflow", "postgresql+psycopg://u@db/mlflow"),
        ("postgres://u:pw@db/mlflow", "postgresql://u:pw@db/mlflow"),
        ("mysql+pymysql://u:pw@db/mlflow", "mysql+pymysql://u:pw@db/mlflow"),
        ("mssql+pyodbc://u:pw@db/mlflow", "mssql+pyodbc://u:pw@db/mlflow"),
        ("databricks", "databricks"),
    ],
)
def test_tracking_uris_accepted(tmp_path: Path, base: dict[str, Any], uri: str, kept: str):
    assert load_sweep(_write(tmp_path, _set(base, "tracking_uri", uri))).tracking_uri == kept
    assert load_sweep(_write(tmp_path, base), tracking_uri=uri).tracking_uri == kept


@pytest.mark.parametrize(
    "uri",
    [
        "",
        "bogus://x",
        "bogus:x",
        "sqlite://",
        "sqlite:///:memory:",
        "http://",
        "http://host:port",
        "postgresql:///nohost",
        "ftp://u:s3cret@host/x",
        42,
    ],
)
def test_tracking_uris_refused(tmp_path: Path, base: dict[str, Any], uri: Any) -> None:
    msg = _error(_write(tmp_path, _set(base, "tracking_uri", uri)))
    assert "tracking_uri" in msg and "s3cret" not in msg
    if isinstance(uri, str):
        assert "--tracking-uri" in _error(_write(tmp_path, base), tracking_uri=uri)


# --- one declaration of the head's parameters, and every default written once ------------------
README = Path(__file__).resolve().parents[2] / "README.md"
_readme_sweep = readme_sweep  # shared with tests/features (conftest)


def test_readme_space_block_is_generated_from_the_declaration() -> None:
    text = README.read_text(encoding="utf-8")
    assert P.space_yaml() in text, (
        "README's search.space block is stale; paste this in:\n" + P.space_yaml()
    )
    assert _readme_sweep()["search"]["space"] == P.DEFAULT_SPACE


def test_readme_shows_every_default_of_the_schema() -> None:
    doc = _readme_sweep()
    for key, value in doc["data"].items():
        if key != "dir":
            assert value == C.DataConfig.__dataclass_fields__[key].default, f"data.{key}"
    bb = doc["backbones"][0]
    for key in ("weights", "pooling"):
        assert bb[key] == C.BackboneConfig.__dataclass_fields__[key].default, f"backbones.{key}"
    for key, value in doc["search"].items():
        if key != "space":
            assert value == C.SearchConfig.__dataclass_fields__[key].default, f"search.{key}"
    assert set(doc["search"]) == set(S._SEARCH_KEYS)
    assert doc["cache_dir"] == C.DEFAULT_CACHE_DIR
    assert doc["storage"] == C.DEFAULT_STORAGE


def test_a_sweep_without_search_gets_the_schema_defaults(
    tmp_path: Path, base: dict[str, Any]
) -> None:
    doc = _set(_set(base, "search", DELETE), "data", {"dir": base["data"]["dir"]})
    cfg = load_sweep(_write(tmp_path, doc))
    assert cfg.data == C.DataConfig(dir=cfg.data.dir)
    assert cfg.search == C.SearchConfig(space=cfg.search.space)
    for p in P.HEAD_PARAMETERS:
        got = cfg.search.space[p.name]
        if isinstance(p.default, dict) and "choices" in p.default:
            assert list(got.choices) == p.default["choices"]
        elif isinstance(p.default, dict):
            assert (got.low, got.high, got.log) == (
                p.default["low"],
                p.default["high"],
                p.default.get("log", False),
            )
            assert got.kind == p.kind
        else:
            assert got.value == p.default


def test_head_params_fields_are_the_declaration() -> None:
    import dataclasses

    from tlsweep.head._graph import SLOTS
    from tlsweep.head._train import HeadParams

    fields = dataclasses.fields(HeadParams)
    assert [f.name for f in fields] == [p.name for p in P.HEAD_PARAMETERS] + ["seed"]
    for f, p in zip(fields, P.HEAD_PARAMETERS, strict=False):
        assert f.type is p.type
        fixed = not isinstance(p.default, dict)
        assert f.default == (p.default if fixed else dataclasses.MISSING), p.name
    assert fields[-1].default == C.SearchConfig().seed == C.DEFAULT_SEED
    assert set(SLOTS) == set(P.HEAD_PARAM["optimizer"].choices)  # the trainer knows every choice


def test_a_new_head_parameter_is_one_declaration(
    tmp_path: Path, base: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """What issue 11 asks: a new parameter is declared once; validation, default space and the
    trainer's fields follow (its use in the trainer is the only other change)."""
    import dataclasses

    from tlsweep.head import _train as head

    new = P.HeadParam("momentum", float, 0.9, "SGD momentum", bounds=(0.0, 0.999))
    declared = (*P.HEAD_PARAMETERS, new)
    monkeypatch.setattr(P, "HEAD_PARAMETERS", declared)
    assert load_sweep(_write(tmp_path, base)).search.space["momentum"].value == 0.9
    ok = load_sweep(_write(tmp_path, _set(base, f"{_SP}.momentum", {"low": 0.5, "high": 0.99})))
    assert ok.search.space["momentum"].kind == "float"
    msg = _error(_write(tmp_path, _set(base, f"{_SP}.momentum", 2.0)))
    assert "search.space.momentum: got 2.0; expected a value from 0.0 to 0.999" in msg
    cls = head._head_params_class(declared)
    assert "momentum" in {f.name for f in dataclasses.fields(cls)}
    assert cls(units=8, dropout=0.0, learning_rate=0.1, batch_size=4).momentum == 0.9
    assert "momentum:" in P.space_yaml() and "SGD momentum" in P.space_yaml()


# --- the resolved sweep ---------------------------------------------------------------------------
def test_resolved_sweep_is_a_sweep_file_that_loads_back_the_same(
    tmp_path: Path, base: dict[str, Any]
) -> None:
    import dataclasses

    import tlsweep

    doc = _set(base, "storage", "postgresql://me:secret@db.example/optuna")
    cfg = load_sweep(_write(tmp_path, doc), n_trials=7, data_dir=tmp_path / "images")
    record = R.resolved_record(cfg)
    assert record["versions"]["tlsweep"] == tlsweep.__version__
    text = R.resolved_yaml(record)
    assert text.startswith(
        f"# the resolved sweep, every default filled in (tlsweep {tlsweep.__version__}"
    )
    assert "secret" not in text and "me:***@db.example" in text
    resolved = yaml.safe_load(text)
    assert resolved["search"]["n_trials"] == 7  # the override, applied
    assert set(resolved["search"]) == set(S._SEARCH_KEYS)  # every default, filled in
    assert set(resolved["search"]["space"]) == {p.name for p in P.HEAD_PARAMETERS}
    assert set(resolved["data"]) == set(S._DATA_KEYS)
    again = load_sweep(_write(tmp_path, {**resolved, "storage": base["storage"]}, "again.yaml"))
    ours = dataclasses.replace(cfg, storage=base["storage"], path=again.path, text="")
    assert dataclasses.replace(again, text="") == ours


def test_changes_name_each_changed_key_once(tmp_path: Path, base: dict[str, Any]) -> None:
    old = R.resolved_record(load_sweep(_write(tmp_path, base)))
    (tmp_path / "other").mkdir()
    new = R.resolved_record(
        load_sweep(_write(tmp_path, base), n_trials=9, data_dir=tmp_path / "other")
    )
    assert R.changes(old, old) == []
    lines = R.changes(old, new)
    assert lines == [
        f"data.dir: {str(tmp_path / 'images')!r} -> {str(tmp_path / 'other')!r}",
        f"search.n_trials: {base['search']['n_trials']!r} -> 9",
    ]
    newer = {**new, "versions": {**new["versions"], "optuna": "99.0"}}
    assert R.changes(new, newer) == [f"versions.optuna: {new['versions']['optuna']!r} -> '99.0'"]


def test_resolved_sweep_with_fused_and_expanded_backbones_loads_back(
    tmp_path: Path, base: dict[str, Any]
) -> None:
    """A fused entry is written back as ``{fuse: [...]}`` and size choices as their expansion."""
    import dataclasses

    tiny = {"name": "TinyConvNet", "weights": "none", "pooling": "avg"}
    doc = _set(
        base,
        "backbones",
        [
            {**tiny, "input_size": {"choices": [64, 96]}},
            {"fuse": [{**tiny, "input_size": 64}, {**tiny, "input_size": 96, "pooling": "max"}]},
        ],
    )
    cfg = load_sweep(_write(tmp_path, doc))
    resolved = yaml.safe_load(R.resolved_yaml(R.resolved_record(cfg)))
    assert [set(b) for b in resolved["backbones"]][-1] == {"fuse"}
    again = load_sweep(_write(tmp_path, {**resolved, "storage": base["storage"]}, "again.yaml"))
    assert [b.label for b in again.backbones] == [b.label for b in cfg.backbones]
    assert dataclasses.replace(again, text="", path=cfg.path) == dataclasses.replace(
        cfg, text="", storage=again.storage
    )


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://me:se/cr:et@db:5432/x", "postgresql://me:***@db:5432/x"),
        ("postgresql://me:a@b/c:d@db/x", "postgresql://me:***@db/x"),  # a raw "@" and "/"
        ("mysql+pymysql://me:p%40ss%2Fw@db/x", "mysql+pymysql://me:***@db/x"),
        ("http://me:tok:en@mlflow.example:5000", "http://me:***@mlflow.example:5000"),
        (
            "postgresql://me@db/x?sslmode=require&password=a/b",
            "postgresql://me@db/x?sslmode=require&password=***",
        ),
        ("postgresql://me@db/x", "postgresql://me@db/x"),  # no password: unchanged
        ("sqlite:////tmp/a:b@c.db", "sqlite:////tmp/a:b@c.db"),
    ],
)
def test_redact_url_hides_every_password(url: str, shown: str) -> None:
    from tlsweep.config._urls import redact_url

    assert redact_url(url) == shown
    # in a sweep file or a message, every URL in it
    text = f"storage: {url}\ntracking_uri: '{url}'  # note: {url}"
    assert redact_url(text) == f"storage: {shown}\ntracking_uri: '{shown}'  # note: {shown}"


def test_redact_url_hides_a_password_a_driver_quotes_decoded() -> None:
    from tlsweep.config._urls import redact_url

    url = "postgresql://me:p%40ss%2Fw@db/x"
    msg = 'connection failed: password "p@ss/w" rejected for postgresql://me:p%40ss%2Fw@db/x'
    out = redact_url(msg, url)
    assert "p@ss/w" not in out and "p%40ss" not in out
    assert out == 'connection failed: password "***" rejected for postgresql://me:***@db/x'


@pytest.mark.parametrize("field", ["storage", "tracking_uri"])
def test_a_raw_at_in_a_password_is_refused_without_quoting_it(
    tmp_path: Path, base: dict[str, Any], field: str
) -> None:
    """SQLAlchemy would take what follows a raw "@" for the host and quote it in its errors."""
    url = "postgresql://me:pa/ss@w0rd@db.example:5432/x"
    from tlsweep.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        load_sweep(_write(tmp_path, _set(base, field, url)), data_dir=tmp_path / "images")
    msg = str(e.value)
    assert "%40" in msg and "postgresql://me:***@db.example:5432/x" in msg, msg
    assert "pa/ss" not in msg and "w0rd" not in msg
    ok = load_sweep(
        _write(tmp_path, _set(base, field, url.replace("@w0rd", "%40w0rd"))),
        data_dir=tmp_path / "images",
    )
    assert getattr(ok, field) == url.replace("@w0rd", "%40w0rd")
