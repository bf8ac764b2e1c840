"""Cross-validated trials against one validation split: cost, and whether the winner changes.

For each sweep file and each sampler seed, the same sweep runs twice through the real CLI, in
fresh processes, with its own storage and tracking store: once without folds (the validation
split picks the winner) and once with ``search.cv_folds: K``. Everything else is the same,
including the trial budget and the seed. With ``--sampler random`` (the default) and
``--pruner none`` both runs evaluate exactly the same parameter sets (the random sampler does
not look at the scores), so a different winner is the selection rule's doing alone.

Reported per run: wall time of ``tlsweep run`` (the same fixed costs on both sides: start-up,
cache hit, MLflow, the winner's retraining and test), the winner's trial and selection score
(validation, or the folds' mean), the winner's score on the untouched validation split after
retraining on the full training split, and its test accuracy with the 95% bootstrap interval.

    python bench/cv.py sweeps/cats_vs_dogs_offline.yaml sweeps/flowers_offline.yaml \\
        --seeds 1 2 3 --n-trials 20 --folds 5 --out /tmp/cvbench
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent


def _abs(base: Path, p: str) -> str:
    path = Path(p).expanduser()
    return str(path if path.is_absolute() else (base / path).resolve())


def write_sweep(src: Path, out: Path, name: str, seed: int, folds: int | None, a: Any) -> Path:
    doc = yaml.safe_load(src.read_text())
    base = src.resolve().parent
    data = doc["data"] if isinstance(doc["data"], dict) else {"dir": doc["data"]}
    data["dir"] = _abs(base, data["dir"])
    doc["data"] = data
    for bb in doc["backbones"]:
        if isinstance(bb, dict) and bb.get("weights") not in (None, "imagenet", "none"):
            bb["weights"] = _abs(base, bb["weights"])
    s = doc.setdefault("search", {})
    s.update(n_trials=a.n_trials, seed=seed, sampler=a.sampler, pruner=a.pruner, cv_folds=folds)
    doc.update(
        study=name,
        cache_dir=str(a.cache_dir.resolve()),
        storage=f"sqlite:///{out / 'optuna.db'}",
        tracking_uri=f"sqlite:///{out / 'mlflow.db'}",
    )
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def run_one(sweep: Path, name: str, out: Path) -> dict[str, Any]:
    from mlflow import MlflowClient

    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-m", "tlsweep", "run", str(sweep), "-q"],
        capture_output=True,
        text=True,
        env=env,
    )
    seconds = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"{sweep}: tlsweep run failed:\n{r.stderr[-3000:]}")
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name(name)
    (parent,) = client.search_runs([exp.experiment_id], "tags.`tlsweep.role` = 'study'")
    m, tags = parent.data.metrics, parent.data.tags
    trials = client.search_runs([exp.experiment_id], "tags.`tlsweep.role` = 'trial'")
    return {
        "seconds": seconds,
        "trial_seconds": sum(t.data.metrics.get("trial_seconds", 0.0) for t in trials),
        "winner": int(tags["winner_trial"]),
        "selection": m["best_val_accuracy"],
        "validation": m["rebuilt_val_accuracy"],
        "test": m["test_accuracy"],
        "test_ci": (m.get("test_accuracy_ci_low"), m.get("test_accuracy_ci_high")),
    }


def table(rows: list[dict[str, Any]], folds: int) -> str:
    """The README's Markdown table, one row per (sweep, seed)."""
    out = [
        f"| sweep | seed | winner off / cv{folds} | selection score off / cv | "
        "untouched validation off / cv | test off / cv (95% CI) | run seconds off / cv |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        o, c = r["off"], r["cv"]
        same = "same" if o["winner"] == c["winner"] else "changed"
        out.append(
            f"| {r['sweep']} | {r['seed']} | #{o['winner']} / #{c['winner']} ({same}) | "
            f"{o['selection']:.4f} / {c['selection']:.4f} | "
            f"{o['validation']:.4f} / {c['validation']:.4f} | "
            f"{o['test']:.3f} [{o['test_ci'][0]:.3f}, {o['test_ci'][1]:.3f}] / "
            f"{c['test']:.3f} [{c['test_ci'][0]:.3f}, {c['test_ci'][1]:.3f}] | "
            f"{o['seconds']:.0f} / {c['seconds']:.0f} ({c['seconds'] / o['seconds']:.1f}x) |"
        )
    return "\n".join(out)


def rows_from_log(paths: list[Path]) -> list[dict[str, Any]]:
    """Rows rebuilt from the ``NAME: {json}`` lines this script writes to stderr."""
    runs: dict[tuple[str, int], dict[str, Any]] = {}
    for path in paths:
        for line in path.read_text().splitlines():
            name, sep, payload = line.partition(": ")
            if not sep or not payload.startswith("{"):
                continue
            sweep, seed, label = name.rsplit("-", 2)
            row = runs.setdefault((sweep, int(seed)), {"sweep": sweep, "seed": int(seed)})
            row[label] = json.loads(payload)
    return [r for r in runs.values() if "off" in r and "cv" in r]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("sweeps", nargs="*", type=Path)
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--n-trials", type=int, default=20)
    p.add_argument("--sampler", default="random")
    p.add_argument("--pruner", default="none")
    p.add_argument("--out", type=Path, help="a new folder for stores and sweeps")
    p.add_argument("--cache-dir", type=Path, default=Path(".tlsweep/cache"))
    p.add_argument("--json", action="store_true", help="also print the rows as JSON")
    p.add_argument(
        "--from-log",
        nargs="+",
        type=Path,
        help="print the table from earlier runs' stderr logs instead of running",
    )
    a = p.parse_args()
    if a.from_log:
        print(table(rows_from_log(a.from_log), a.folds))
        return 0
    if a.out is None:
        p.error("--out is required (unless --from-log)")
    a.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for src in a.sweeps:
        for seed in a.seeds:
            row: dict[str, Any] = {"sweep": src.stem, "seed": seed}
            for label, folds in (("off", None), ("cv", a.folds)):
                out = a.out / f"{src.stem}-{seed}-{label}"
                out.mkdir(parents=True, exist_ok=True)
                name = f"{src.stem}-{seed}-{label}"
                row[label] = run_one(write_sweep(src, out, name, seed, folds, a), name, out)
                print(f"{name}: {json.dumps(row[label])}", file=sys.stderr, flush=True)
            rows.append(row)
    print(table(rows, a.folds))
    if a.json:
        print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
