"""Every combination of sweep-file settings either runs or is refused with one line.

The factors: sampler x pruner x kind of each head parameter (fixed, range, log range, step range,
choices) x cross-validation folds x augmented views x fine-tuning. Which combinations are refused,
and why, is :func:`tlsweep.config._schema.check_combinations`; these tests walk them.

- The walk of sampler x pruner x kind through the sweep file's validation and a real Optuna
  study (no TensorFlow) is cheap and runs by default.
- Real ``tlsweep run`` commands on the TinyConvNet stand-in: a few by default, and a walk
  covering every sampler x pruner x kind with every pair of folds / augment / finetune
  settings, marked slow.
"""

from __future__ import annotations

import importlib.util
import itertools
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import CATS_DOGS, TINY, CliInProcess, need_shared

from tlsweep.config._schema import PRUNERS, SAMPLER_NEEDS, SAMPLERS
from tlsweep.config._sweepfile import load_sweep
from tlsweep.errors import ConfigError

# The same kind of dimension for every numeric head parameter (and the optimizer's choices).
KINDS: dict[str, dict[str, Any]] = {
    "fixed": {
        "epochs": 2,
        "units": 8,
        "dropout": 0.1,
        "learning_rate": 1e-3,
        "batch_size": 16,
    },
    "range": {
        "epochs": {"low": 1, "high": 2},
        "units": {"low": 4, "high": 16},
        "dropout": {"low": 0.0, "high": 0.5},
        "learning_rate": {"low": 1e-3, "high": 1e-2},
        "batch_size": {"low": 8, "high": 16},
    },
    "log": {
        "epochs": {"low": 1, "high": 2, "log": True},
        "units": {"low": 4, "high": 16, "log": True},
        "dropout": {"low": 0.05, "high": 0.5, "log": True},
        "learning_rate": {"low": 1e-4, "high": 1e-2, "log": True},
        "batch_size": {"low": 8, "high": 16, "log": True},
    },
    "step": {
        "epochs": {"low": 1, "high": 4, "step": 2},  # 1 or 3: the top is the last step
        "units": {"low": 4, "high": 16, "step": 4},
        "dropout": {"low": 0.0, "high": 0.5, "step": 0.25},
        "learning_rate": {"low": 1e-3, "high": 1e-2, "step": 3e-3},
        "batch_size": {"low": 8, "high": 16, "step": 8},
    },
    "choices": {
        "epochs": {"choices": [1, 2]},
        "units": {"choices": [4, 8]},
        "dropout": {"choices": [0.0, 0.25]},
        "learning_rate": {"choices": [1e-3, 1e-2]},
        "batch_size": {"choices": [8, 16]},
        "optimizer": {"choices": ["adam", "sgd"]},
    },
}
N_TRIALS = 2


def _missing_package(sampler: str) -> bool:
    needs = SAMPLER_NEEDS.get(sampler)
    return needs is not None and any(importlib.util.find_spec(m) is None for m in needs[0])


def expected_refusal(sampler: str, pruner: str, kind: str, n_trials: int = N_TRIALS) -> str | None:
    """What the error line must name for a refused combination, or None if it must run."""
    if _missing_package(sampler):
        return "search.sampler"
    if sampler == "grid" and kind in ("range", "log"):
        return "search.space.dropout"  # a float range without a step has no grid
    if sampler == "grid" and kind == "fixed" and n_trials > 1:
        return "search.n_trials"  # a grid of one point
    return None


def _doc(
    data: Path,
    root: Path,
    sampler: str,
    pruner: str,
    kind: str,
    folds: int | None = None,
    augment: bool = False,
    finetune: bool = False,
    cache: Path | None = None,
) -> dict[str, Any]:
    backbone: dict[str, Any] = dict(TINY[0])
    if augment:
        backbone["augment"] = {"views": 2}
    doc: dict[str, Any] = {
        "study": f"{sampler}-{pruner}-{kind}",
        "data": {"dir": str(data)},
        "backbones": [backbone],
        "cache_dir": str(cache or root / "cache"),
        "search": {
            "n_trials": N_TRIALS,
            "sampler": sampler,
            "pruner": pruner,
            "cv_folds": folds,
            "space": KINDS[kind],
        },
        "storage": f"sqlite:///{root / 'optuna.db'}",
        "tracking_uri": f"sqlite:///{root / 'mlflow.db'}",
    }
    if finetune:
        doc["finetune"] = {"epochs": 1, "unfreeze": 2, "batch_size": 8}
    return doc


def _write(root: Path, doc: dict[str, Any]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "sweep.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


# --- the walk through validation and Optuna (no TensorFlow) ------------------------------------
def _optuna_trials(cfg: Any, n: int) -> list[dict[str, Any]]:
    """``n`` trials of an in-memory study with the sweep's sampler and pruner, each reporting
    one value per epoch as the objective does."""
    import optuna

    from tlsweep.study._search import make_pruner, make_sampler, suggest

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        study = optuna.create_study(
            sampler=make_sampler(cfg, 1), pruner=make_pruner(cfg), direction="maximize"
        )
        out = []
        for i in range(n):
            trial = study.ask()
            params = suggest(trial, cfg)
            for epoch in range(params["epochs"]):
                trial.report(0.5 + 0.01 * (i + epoch), epoch)
                trial.should_prune()
            study.tell(trial, 0.5 + 0.01 * i)
            out.append(params)
    return out


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("pruner", PRUNERS)
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_each_combination_is_refused_in_one_line_or_samples(
    tmp_path: Path, sampler: str, pruner: str, kind: str
) -> None:
    (tmp_path / "images").mkdir()
    path = _write(tmp_path, _doc(tmp_path / "images", tmp_path, sampler, pruner, kind))
    refused = expected_refusal(sampler, pruner, kind)
    if refused is not None:
        with pytest.raises(ConfigError) as e:
            load_sweep(path)
        msg = str(e.value)
        assert "\n" not in msg and refused in msg, msg
        return
    cfg = load_sweep(path)
    trials = _optuna_trials(cfg, 3 if sampler != "grid" or kind != "fixed" else 1)
    for params in trials:
        for name, spec in KINDS[kind].items():
            if isinstance(spec, dict) and "choices" in spec:
                assert params[name] in spec["choices"], (name, params)
            elif isinstance(spec, dict):
                assert spec["low"] <= params[name] <= spec["high"], (name, params)
            else:
                assert params[name] == spec, (name, params)


def test_hyperband_takes_the_largest_epochs_the_space_can_draw(tmp_path: Path) -> None:
    from tlsweep.study._search import make_pruner

    (tmp_path / "images").mkdir()
    for kind, top in (("fixed", 2), ("range", 2), ("step", 3), ("choices", 2)):
        doc = _doc(tmp_path / "images", tmp_path, "tpe", "hyperband", kind)
        pruner = make_pruner(load_sweep(_write(tmp_path / kind, doc)))
        assert pruner._max_resource == top, kind


def test_the_pruners_take_their_settings_from_the_config_defaults(tmp_path: Path) -> None:
    import tlsweep.config as defaults
    from tlsweep.study._search import make_pruner

    (tmp_path / "images").mkdir()
    median = make_pruner(
        load_sweep(
            _write(tmp_path / "m", _doc(tmp_path / "images", tmp_path, "tpe", "median", "fixed"))
        )
    )
    assert median._n_startup_trials == defaults.MEDIAN_STARTUP_TRIALS == 5
    assert median._n_warmup_steps == defaults.MEDIAN_WARMUP_STEPS == 3
    hyperband = make_pruner(
        load_sweep(
            _write(tmp_path / "h", _doc(tmp_path / "images", tmp_path, "tpe", "hyperband", "fixed"))
        )
    )
    assert hyperband._min_resource == defaults.HYPERBAND_MIN_RESOURCE == 1


def test_a_grid_with_fewer_points_than_trials_is_refused(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    doc = _doc(tmp_path / "images", tmp_path, "grid", "none", "fixed")
    doc["search"]["space"] = {**KINDS["fixed"], "units": {"choices": [4, 8]}}
    doc["search"]["n_trials"] = 3
    with pytest.raises(ConfigError, match=r"search\.n_trials: got 3; .* only 2 point"):
        load_sweep(_write(tmp_path, doc))
    doc["search"]["n_trials"] = 2
    assert load_sweep(_write(tmp_path, doc)).search.n_trials == 2
    with pytest.raises(ConfigError, match=r"--n-trials: got 5"):
        load_sweep(_write(tmp_path, doc), n_trials=5)


# --- real runs on the TinyConvNet stand-in -----------------------------------------------------
@pytest.fixture(scope="module")
def combo_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Layout B: 12 real photos per class."""
    need_shared()
    root = tmp_path_factory.mktemp("combo_data")
    for cls in ("cats", "dogs"):
        (root / cls).mkdir()
        for f in sorted((CATS_DOGS / "train" / cls).iterdir())[:12]:
            shutil.copy(f, root / cls / f.name)
    return root


@pytest.fixture(scope="module")
def combo_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One feature cache for every run of this module (plain and augmented entries)."""
    return tmp_path_factory.mktemp("combo_cache")


def _run_combination(
    cli: CliInProcess,
    root: Path,
    data: Path,
    cache: Path,
    sampler: str,
    pruner: str,
    kind: str,
    folds: int | None,
    augment: bool,
    finetune: bool,
) -> None:
    """``tlsweep run`` on one combination: a refusal (exit 2, one line, nothing created) or a
    study of N_TRIALS finished trials."""
    doc = _doc(data, root, sampler, pruner, kind, folds, augment, finetune, cache)
    sweep = _write(root, doc)
    r = cli("run", str(sweep), "-q", cwd=root)
    refused = expected_refusal(sampler, pruner, kind)
    if refused is not None:
        assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
        errors = [x for x in r.stderr.splitlines() if x.startswith("tlsweep: error: ")]
        assert len(errors) == 1 and refused in errors[0], r.stderr[-3000:]
        assert "Traceback" not in r.stderr
        assert sorted(p.name for p in root.iterdir()) == ["sweep.yaml"]
        return
    assert r.returncode == 0, (r.returncode, r.stdout[-2000:], r.stderr[-3000:])
    import optuna

    study = optuna.load_study(study_name=doc["study"], storage=doc["storage"])
    states = [t.state.name for t in study.trials]
    assert len(states) == N_TRIALS and set(states) <= {"COMPLETE", "PRUNED"}, states
    if finetune:
        assert "fine-tuning: 1 epoch" in r.stdout, r.stdout[-2000:]


# A fast subset: the case, the grid's edges, folds with views, fine-tuning.
FAST = [
    ("tpe", "hyperband", "choices", 2, True, False),
    ("grid", "median", "step", None, False, True),
    ("grid", "none", "fixed", None, False, False),  # refused: a grid of one point, 2 trials
    ("qmc", "hyperband", "log", 2, False, False),
]


@pytest.mark.parametrize(("sampler", "pruner", "kind", "folds", "augment", "finetune"), FAST)
def test_a_combination_runs_or_is_refused(
    cli: CliInProcess,
    tmp_path: Path,
    combo_data: Path,
    combo_cache: Path,
    sampler: str,
    pruner: str,
    kind: str,
    folds: int | None,
    augment: bool,
    finetune: bool,
) -> None:
    _run_combination(
        cli, tmp_path, combo_data, combo_cache, sampler, pruner, kind, folds, augment, finetune
    )


def _walk() -> list[tuple[str, str, str, int | None, bool, bool]]:
    """Every sampler x pruner pair in a real run, the kinds of parameter taking turns, and folds,
    augment and finetune cycling through their 8 settings. Every sampler x pruner x kind is
    validated and sampled by a real Optuna study in the fast test above; a real run of each of
    the 90 took 26 minutes here, too much for CI, so the runs take the pairs."""
    out = []
    kinds = sorted(KINDS)
    for i, (s, p) in enumerate(itertools.product(SAMPLERS, PRUNERS)):
        folds, augment, finetune = (None, 2)[i % 2], bool(i // 2 % 2), bool(i // 4 % 2)
        out.append((s, p, kinds[i % len(kinds)], folds, augment, finetune))
    return out


@pytest.mark.slow
@pytest.mark.parametrize(("sampler", "pruner", "kind", "folds", "augment", "finetune"), _walk())
def test_every_combination_runs_or_is_refused(
    cli: CliInProcess,
    tmp_path: Path,
    combo_data: Path,
    combo_cache: Path,
    sampler: str,
    pruner: str,
    kind: str,
    folds: int | None,
    augment: bool,
    finetune: bool,
) -> None:
    _run_combination(
        cli, tmp_path, combo_data, combo_cache, sampler, pruner, kind, folds, augment, finetune
    )
