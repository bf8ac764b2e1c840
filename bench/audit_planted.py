"""The recall of ``tlsweep audit`` on planted problems in a copy of a shared dataset: exact
copies of training images put in test/, re-encoded (JPEG quality 60-90) and resized (0.5x-0.9x)
copies put in test/, and training images moved to another class folder (flipped labels). Runs
the real command line (``tlsweep audit --json``) on MobileNetV2 a0.35 at ``--size`` px.

    python bench/audit_planted.py --per-kind 20 --size 96

Measured on this machine (2 cores, shared), cats_vs_dogs (layout A, 4000 photos), seed 0:

    4060 images at 96 px, 20 of each kind planted
      exact copies found      20/20
      near copies found       40/40  (41 near pairs reported in all)
      flipped labels flagged  17/20, 10 of them in the top 40 of 290 suspects

The flips the heads flag are mixed with the photos the 96 px heads get confidently wrong (the
winner scores about 0.87 there): 290 suspects in all, ranked by the probability of the given
label.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
WEIGHTS = (
    SHARED / "keras_home/models/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5"
)


def plant(root: Path, per_kind: int, seed: int) -> dict[str, list]:
    """Plant the problems in ``root`` (a layout-A copy); what was planted."""
    from PIL import Image

    rng = random.Random(seed)
    classes = sorted(p.name for p in (root / "train").iterdir())
    train = [f"train/{c}/{f.name}" for c in classes for f in sorted((root / "train" / c).iterdir())]
    picked = rng.sample(train, 4 * per_kind)
    exact, near, flips = [], [], []
    for i, rel in enumerate(picked[:per_kind]):
        dst = f"test/{rel.split('/')[1]}/planted-exact-{i}.jpg"
        shutil.copy(root / rel, root / dst)
        exact.append((rel, dst))
    for i, rel in enumerate(picked[per_kind : 3 * per_kind]):
        im = Image.open(root / rel).convert("RGB")
        if i % 2:
            f = rng.uniform(0.5, 0.9)
            im = im.resize((max(8, round(im.width * f)), max(8, round(im.height * f))))
        dst = f"test/{rel.split('/')[1]}/planted-near-{i}.jpg"
        im.save(root / dst, "JPEG", quality=rng.randint(60, 90))
        near.append((rel, dst))
    for rel in picked[3 * per_kind :]:
        _, cls, name = rel.split("/")
        other = rng.choice([c for c in classes if c != cls])
        (root / rel).rename(root / "train" / other / name)
        flips.append((f"train/{other}/{name}", cls))
    return {"exact": exact, "near": near, "flips": flips}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=SHARED / "datasets/cats_vs_dogs")
    p.add_argument("--per-kind", type=int, default=20)
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        shutil.copytree(a.data, root)
        planted = plant(root, a.per_kind, a.seed)
        sweep = Path(tmp) / "sweep.yaml"
        sweep.write_text(
            f"study: planted\ndata: {{dir: {root}}}\nbackbones:\n  - {{name: MobileNetV2, "
            f"weights: {WEIGHTS}, input_size: {a.size}, pooling: avg, args: {{alpha: 0.35}}}}\n"
            f"cache_dir: {tmp}/cache\nstorage: sqlite:///{tmp}/optuna.db\n"
        )
        out = Path(tmp) / "audit.json"
        cmd = [sys.executable, "-m", "tlsweep", "audit", str(sweep), "--json", str(out), "-q"]
        subprocess.run(cmd, check=True, capture_output=True)
        r = json.loads(out.read_text())
    groups = [set(g["files"]) for g in r["exact_duplicates"]]
    found_exact = sum(any({x, y} <= g for g in groups) for x, y in planted["exact"])
    pairs = {(q["a"], q["b"]) for q in r["near_duplicates"]}
    found_near = sum((x, y) in pairs for x, y in planted["near"])
    issues = {i["file"]: i for i in r["label_issues"]}
    n_flip = len(planted["flips"])
    flagged = [
        issues[f] for f, c in planted["flips"] if f in issues and issues[f]["suggested"] == c
    ]
    top = sum(i["rank"] <= 2 * n_flip for i in flagged)
    c = r["counts"]
    print(f"{c['images']} images at {a.size} px, {a.per_kind} of each kind planted")
    print(f"  exact copies found      {found_exact}/{len(planted['exact'])}")
    print(
        f"  near copies found       {found_near}/{len(planted['near'])}"
        f"  ({c['near_pairs']} near pairs reported in all)"
    )
    print(
        f"  flipped labels flagged  {len(flagged)}/{n_flip}, {top} of them in the top "
        f"{2 * n_flip} of {c['label_issues']} suspects"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
