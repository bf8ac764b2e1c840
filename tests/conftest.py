"""Shared fixtures: the real data in ../shared, small copies of it, and one feature cache.

Tests that need ../shared skip when it is missing on a developer machine, and fail in CI
(``CI=true``), where it must be there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TLSWEEP_SHARED", REPO.parent / "shared"))
CATS_DOGS = SHARED / "datasets" / "cats_vs_dogs"
FLOWERS = SHARED / "datasets" / "flowers"
MODELS = SHARED / "keras_home" / "models"
MNV2_WEIGHTS = MODELS / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5"
MN_WEIGHTS = MODELS / "mobilenet_2_5_224_tf_no_top.h5"
# The two real ImageNet backbones at 96 px, as a sweep file's backbones list.
# the test stand-in backbone: three seeded random convolutions, built in milliseconds
TINY = [{"name": "TinyConvNet", "weights": "none", "input_size": 64, "pooling": "avg"}]
TWO_MOBILENETS = [
    {
        "name": "MobileNetV2",
        "weights": str(MNV2_WEIGHTS),
        "input_size": 96,
        "pooling": "avg",
        "args": {"alpha": 0.35},
    },
    {
        "name": "MobileNet",
        "weights": str(MN_WEIGHTS),
        "input_size": 96,
        "pooling": "avg",
        "args": {"alpha": 0.25},
    },
]

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--slow",
        action="store_true",
        help="also run the slow end-to-end tests (always on in CI, CI=true)",
    )


MAX_TEST_WORKERS = 4  # each test process holds TensorFlow (~0.5 GB)


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto` (pyproject's addopts): the default run spreads over the cores, up to
    MAX_TEST_WORKERS; the slow run (CI=true, --slow, -m) stays in one process, serial, because
    its tests time kills and signals against a machine they expect to have to themselves."""
    if _in_ci() or config.getoption("--slow") or config.getoption("-m"):
        return 0
    return max(1, min(MAX_TEST_WORKERS, os.cpu_count() or 1))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Slow real-data tests run in CI (CI=true), with --slow, or when selected with -m."""
    if _in_ci() or config.getoption("--slow") or config.getoption("-m"):
        return
    skip = pytest.mark.skip(reason="slow: runs in CI (CI=true) or with --slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    """The random order's seed at the end too, where a failure is read (and with -q)."""
    if config.pluginmanager.hasplugin("randomly"):
        seed = config.getoption("randomly_seed")
        terminalreporter.write_line(
            f"tests ran in a random order: --randomly-seed={seed} repeats it "
            "(-p no:randomly: file order)"
        )


def need_shared() -> Path:
    """The shared folder, or skip (fail in CI) when it is missing."""
    if not (CATS_DOGS.is_dir() and MNV2_WEIGHTS.is_file()):
        msg = f"{SHARED} with datasets/ and keras_home/ is missing"
        if _in_ci():
            pytest.fail(msg + " (required in CI)")
        pytest.skip(msg)
    return SHARED


def small_copy(src: Path, dst: Path, per_class: int, splits: tuple[str, ...] | None) -> Path:
    """Copy ``per_class`` images of every class (of every split, for layout A) to ``dst``."""
    if splits:
        for s in splits:
            for cls in sorted(p for p in (src / s).iterdir() if p.is_dir()):
                out = dst / s / cls.name
                out.mkdir(parents=True, exist_ok=True)
                for f in sorted(cls.iterdir())[:per_class]:
                    shutil.copy(f, out / f.name)
    else:
        for cls in sorted(p for p in src.iterdir() if p.is_dir()):
            out = dst / cls.name
            out.mkdir(parents=True, exist_ok=True)
            for f in sorted(cls.iterdir())[:per_class]:
                shutil.copy(f, out / f.name)
    return dst


def write_sweep(path: Path, data_dir: Path, **extra: object) -> Path:
    """A sweep file on MobileNetV2 a0.35 (real weights) at 96 px, for fast tests."""
    import yaml

    doc: dict = {
        "study": extra.pop("study", "test"),
        "data": {"dir": str(data_dir)},
        "backbones": extra.pop(
            "backbones",
            [
                {
                    "name": "MobileNetV2",
                    "weights": str(MNV2_WEIGHTS),
                    "input_size": 96,
                    "pooling": "avg",
                    "args": {"alpha": 0.35},
                }
            ],
        ),
        "cache_dir": str(extra.pop("cache_dir", path.parent / "cache")),
        "search": extra.pop(
            "search",
            {
                "n_trials": 3,
                "sampler": "random",
                "pruner": "none",
                "space": {
                    "units": {"low": 16, "high": 128, "log": True},
                    "dropout": {"low": 0.0, "high": 0.5},
                    "learning_rate": {"low": 1e-4, "high": 1e-2, "log": True},
                    "batch_size": {"choices": [32, 64]},
                    "epochs": 5,
                },
            },
        ),
        "storage": extra.pop("storage", f"sqlite:///{path.parent / 'optuna.db'}"),
        "tracking_uri": extra.pop("tracking_uri", f"sqlite:///{path.parent / 'mlflow.db'}"),
    }
    doc.update(extra)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def run_cli(
    *args: str, cwd: Path | None = None, timeout: float = 600, wrap: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    """The real ``tlsweep`` command line in a subprocess (``wrap``: a command to run it under)."""
    return subprocess.run(
        [*wrap, sys.executable, "-m", "tlsweep", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )


# What tlsweep sets in its own process's environment (os.environ.setdefault: the user's setting
# wins) and library calls in earlier tests leave set here; a fresh process starts without them.
_SET_BY_TLSWEEP = (
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
    "MLFLOW_HTTP_REQUEST_TIMEOUT",
    "MLFLOW_ENABLE_ASYNC_LOGGING",
    "GRPC_VERBOSITY",
)
_SESSION_ENV = {k: os.environ[k] for k in _SET_BY_TLSWEEP if k in os.environ}


class CliInProcess:
    """``tlsweep.cli.main(argv)`` called in this process, answered like :func:`run_cli`.

    For refusals (exit code, one error line, nothing created) a fresh process costs about a
    second of CPU (Python, then MLflow or TensorFlow imported again) and tests nothing more; the
    tests that need a real process (no traceback from ``python -m tlsweep``, TensorFlow's start-up
    lines filtered, signals, a file this process may not read as root) keep :func:`run_cli`.
    What a call changes in this process is put back afterwards: the signal handlers ``extract``
    and ``run`` install, the logging set-up, warning filters, environment variables, the working
    directory; the variables tlsweep sets for itself start as in a fresh process. Descriptors 1
    and 2 (what Python and native code write) go to files for the call and come back;
    ``native_stderr.install`` sees the flag a parent tlsweep sets and leaves descriptor 2 alone.
    Usable from fixtures of any scope.
    """

    def __call__(self, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
        import io
        import logging
        import signal
        import tempfile
        import warnings

        from tlsweep.cli import _native_stderr as native_stderr
        from tlsweep.cli._main import main

        signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        handlers = {s: signal.getsignal(s) for s in signals}
        root = logging.getLogger()
        root_state = (root.handlers[:], root.level)
        names = ("tlsweep", "absl", "tensorflow", "optuna", "mlflow", "alembic", "urllib3", "h5py")
        levels = {n: logging.getLogger(n).level for n in names}
        environ = dict(os.environ)
        here = os.getcwd()
        streams = (sys.stdout, sys.stderr)
        for f in streams:
            f.flush()
        saved = (os.dup(1), os.dup(2))
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            try:
                os.dup2(out.fileno(), 1)
                os.dup2(err.fileno(), 2)
                sys.stdout = io.TextIOWrapper(
                    open(1, "wb", closefd=False), encoding="utf-8", line_buffering=True
                )
                sys.stderr = io.TextIOWrapper(
                    open(2, "wb", closefd=False),
                    encoding="utf-8",
                    errors="backslashreplace",
                    line_buffering=True,
                )
                for k in _SET_BY_TLSWEEP:  # as a fresh process has them
                    if k in _SESSION_ENV:
                        os.environ[k] = _SESSION_ENV[k]
                    else:
                        os.environ.pop(k, None)
                os.environ[native_stderr.ENV_FLAG] = "1"
                os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"  # as run_cli gives its process
                if cwd is not None:
                    os.chdir(cwd)
                with warnings.catch_warnings():
                    try:
                        code = main(list(args))
                    except SystemExit as e:  # argparse's refusals, as the interpreter exits
                        code = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
            finally:
                for f in (sys.stdout, sys.stderr):
                    f.flush()
                sys.stdout, sys.stderr = streams
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
                os.close(saved[0])
                os.close(saved[1])
                os.chdir(here)
                os.environ.clear()
                os.environ.update(environ)
                root.handlers[:], level = root_state
                root.setLevel(level)
                for n, lv in levels.items():
                    logging.getLogger(n).setLevel(lv)
                for s, h in handlers.items():
                    if h is not None:  # None: set outside Python, nothing to put back
                        signal.signal(s, h)
            text = []
            for f in (out, err):
                f.seek(0)
                text.append(f.read().decode("utf-8", errors="replace"))
        return subprocess.CompletedProcess(["tlsweep", *args], code, *text)


@pytest.fixture
def cli() -> CliInProcess:
    """The ``tlsweep`` command line in this process: ``cli("extract", path, cwd=...)``."""
    return CliInProcess()


def without_root_powers() -> tuple[str, ...]:
    """A command prefix under which chmod 000 keeps a file from this process, even as root.

    Root reads anything through CAP_DAC_OVERRIDE; setpriv (util-linux) drops it and
    CAP_DAC_READ_SEARCH from the bounding set, so the run meets the unreadable file as a user
    would.
    """
    if os.geteuid() != 0:
        return ()
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.fail("running as root without setpriv (util-linux): cannot test unreadable files")
    return (setpriv, "--bounding-set", "-dac_override,-dac_read_search")


@pytest.fixture(scope="session")
def cats_dogs_small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Layout A: 40 train, 20 validation and 20 test images per class of the real photos."""
    need_shared()
    dst = tmp_path_factory.mktemp("cd_small")
    small_copy(CATS_DOGS / "train", dst / "train", 40, None)
    small_copy(CATS_DOGS / "validation", dst / "validation", 20, None)
    small_copy(CATS_DOGS / "test", dst / "test", 20, None)
    return dst


@pytest.fixture(scope="session")
def flowers_small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Layout B: 30 real flower photos per class, 5 classes, no split folders."""
    need_shared()
    return small_copy(FLOWERS, tmp_path_factory.mktemp("flowers_small"), 30, None)


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One feature cache folder shared by the tests that only need features to exist."""
    return tmp_path_factory.mktemp("shared_cache")


# --- features extracted once per session (shared by test_head and test_run) -------------------
@pytest.fixture(scope="session")
def cd_features(
    cats_dogs_small: Path, shared_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> Any:
    """The cache entry of MobileNetV2 a0.35 96 px avg features of ``cats_dogs_small``.

    Extracted in this process into ``shared_cache`` with exactly the backbone of ``write_sweep``,
    so a sweep written with ``write_sweep(..., cats_dogs_small, cache_dir=shared_cache)`` hits it.
    """
    from tlsweep.config._sweepfile import load_sweep
    from tlsweep.features._cache import extract_all

    sweep = write_sweep(
        tmp_path_factory.mktemp("cd_sweep") / "sweep.yaml", cats_dogs_small, cache_dir=shared_cache
    )
    ((_, entry, _),) = extract_all(load_sweep(sweep))
    return entry


@pytest.fixture(scope="session")
def flowers_features(
    flowers_small: Path, shared_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> Any:
    """The cache entry of MobileNetV2 a0.35 96 px avg features of ``flowers_small`` (layout B)."""
    from tlsweep.config._sweepfile import load_sweep
    from tlsweep.features._cache import extract_all

    sweep = write_sweep(
        tmp_path_factory.mktemp("fl_sweep") / "sweep.yaml", flowers_small, cache_dir=shared_cache
    )
    ((_, entry, _),) = extract_all(load_sweep(sweep))
    return entry


class _Asked(BaseException):  # not an Exception: build_base turns those into BackboneError
    pass


def keras_asks_for(bb: Any, monkeypatch: pytest.MonkeyPatch) -> str:
    """The file name Keras passes to ``get_file`` while building ``bb`` with ImageNet weights
    (stopped right there: nothing is downloaded)."""
    from keras.src.utils import file_utils

    from tlsweep.backbones._build import build_base

    def stop(fname: str | None = None, *a: object, **kw: object) -> str:
        raise _Asked(fname)

    monkeypatch.setattr(file_utils, "get_file", stop)
    try:
        build_base(bb)
    except _Asked as e:
        return str(e.args[0])
    raise AssertionError(f"{bb.name}: Keras asked for no weights file")


def trial_inputs(tmp_path: Path) -> tuple[Any, dict[str, Any]]:
    """A sweep config and random 8-wide features (64 rows, 2 classes) for ``run_trial``,
    without images or a backbone."""
    from types import SimpleNamespace

    import numpy as np

    from tlsweep.config._sweepfile import load_sweep
    from tlsweep.study._objective import FeatureData

    bb = {"name": "MobileNetV2", "weights": "none", "input_size": 96, "pooling": "avg"}
    sweep = write_sweep(tmp_path / "s.yaml", tmp_path / "no_data", backbones=[bb])
    cfg = load_sweep(sweep, check_data_dir=False)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 8)).astype("float32"), rng.integers(0, 2, 64)
    sizes = {"train": 64, "validation": 64, "test": 0}
    entry = SimpleNamespace(key="k", class_names=["a", "b"])
    return cfg, {cfg.backbones[0].label: FeatureData(cfg.backbones[0], entry, x, y, x, y, 2, sizes)}


SERVERS = {"postgres": "TLSWEEP_TEST_POSTGRES_URL", "mysql": "TLSWEEP_TEST_MYSQL_URL"}


def server_url(kind: str) -> str:
    """The URL of the test database server of ``kind`` (.ci/run starts both): a failure in CI
    without it, a skip elsewhere."""
    var = SERVERS[kind]
    url = os.environ.get(var)
    if not url:
        msg = f"{var} is not set (.ci/run starts a {kind} server and sets it)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg + "; it is required in CI")
        pytest.skip(msg)
    return url


def create_database(url: str, name: str) -> str:
    """A new, empty database on the server of ``url`` (PostgreSQL or MySQL); returns its URL."""
    import sqlalchemy
    from sqlalchemy.engine import make_url

    engine = sqlalchemy.create_engine(url, isolation_level="AUTOCOMMIT")
    quote = "`" if engine.dialect.name in ("mysql", "mariadb") else '"'
    try:
        with engine.connect() as con:
            con.execute(sqlalchemy.text(f"CREATE DATABASE {quote}{name}{quote}"))
    finally:
        engine.dispose()
    return make_url(url).set(database=name).render_as_string(hide_password=False)


def readme_sweep() -> dict[str, Any]:
    """The README's commented sweep file (the block under '## The sweep file'), parsed."""
    import yaml

    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## The sweep file") :]
    block = section[section.index("```yaml\n") + len("```yaml\n") :]
    return yaml.safe_load(block[: block.index("```")])
