"""How alike (cosine of cached features) a re-encoded or resized copy of a photo is to it,
against the closest *different* photo: the measurement behind ``audit``'s near-duplicate
threshold (:data:`tlsweep.audit.NEAR_THRESHOLD`).

For each dataset, ``--n`` photos are drawn (seeded) as originals and put in ``train/``; more
distinct photos of the same classes join them there (``--others``); ``test/`` holds, for every
original, its copies: JPEG re-encoded at quality 60, 75 and 90, and resized to 0.5x, 0.75x and
1.5x (saved at JPEG quality 90). The features come from tlsweep's own extraction (the real
cache, MobileNetV2 a0.35, avg pooling, at ``--size`` px). Reported: the copies' similarity to
their original (lowest, 1st and 5th percentile), each copy's closest *other* training photo
(byte-identical ones left out: the shared flowers holds real duplicates), and the recall and
false pairs at several thresholds.

    python bench/audit_threshold.py --n 150 --others 300 --size 96

Measured on this machine (2 cores), --n 150 --others 300, seed 0, at 96 px:

    flowers: 450 training photos, 900 copies, 96 px
      copy   q60: min 0.7935  p1 0.8355  p5 0.8991  median 0.9542
      copy   q75: min 0.9971  p1 0.9982  p5 0.9992  median 0.9999
      copy   q90: min 0.9890  p1 0.9892  p5 0.9937  median 0.9982
      copy  x0.5: min 0.8778  p1 0.9160  p5 0.9370  median 0.9697
      copy x0.75: min 0.9567  p1 0.9708  p5 0.9783  median 0.9910
      copy  x1.5: min 0.9845  p1 0.9854  p5 0.9901  median 0.9968
      closest other photo: median 0.7347  p95 0.8506  p99 0.8931  max 0.9195
      threshold 0.85: copies found  99.7%   copies with another photo above it   5.2%
      threshold 0.90: copies found  99.0%   copies with another photo above it   0.9%
      threshold 0.92: copies found  98.1%   copies with another photo above it   0.0%
      threshold 0.93: copies found  95.8%   copies with another photo above it   0.0%
      threshold 0.94: copies found  93.1%   copies with another photo above it   0.0%
      threshold 0.95: copies found  90.6%   copies with another photo above it   0.0%
      threshold 0.96: copies found  84.8%   copies with another photo above it   0.0%
      threshold 0.97: copies found  78.1%   copies with another photo above it   0.0%
      threshold 0.98: copies found  68.6%   copies with another photo above it   0.0%

    cats_vs_dogs: 450 training photos, 900 copies, 96 px
      copy   q60: min 0.9263  p1 0.9472  p5 0.9706  median 0.9900
      copy   q75: min 0.9698  p1 0.9801  p5 0.9877  median 0.9960
      copy   q90: min 0.9768  p1 0.9851  p5 0.9924  median 0.9974
      copy  x0.5: min 0.7456  p1 0.7914  p5 0.8658  median 0.9504
      copy x0.75: min 0.8748  p1 0.9145  p5 0.9384  median 0.9818
      copy  x1.5: min 0.9676  p1 0.9775  p5 0.9872  median 0.9958
      closest other photo: median 0.6564  p95 0.7479  p99 0.7892  max 0.8080
      threshold 0.85: copies found  99.6%   copies with another photo above it   0.0%
      threshold 0.90: copies found  97.6%   copies with another photo above it   0.0%
      threshold 0.92: copies found  95.8%   copies with another photo above it   0.0%
      threshold 0.93: copies found  94.4%   copies with another photo above it   0.0%
      threshold 0.94: copies found  92.8%   copies with another photo above it   0.0%
      threshold 0.95: copies found  90.4%   copies with another photo above it   0.0%
      threshold 0.96: copies found  86.3%   copies with another photo above it   0.0%
      threshold 0.97: copies found  81.4%   copies with another photo above it   0.0%
      threshold 0.98: copies found  74.3%   copies with another photo above it   0.0%

Chosen: 0.92, the lowest threshold at which no copy of either dataset had a different photo
as close; below it flowers (small, alike photos) starts to pair strangers (0.90: 0.9%).
"""

from __future__ import annotations

import argparse
import hashlib
import random
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
WEIGHTS = (
    SHARED / "keras_home/models/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5"
)
DATASETS = {
    "flowers": SHARED / "datasets/flowers",
    "cats_vs_dogs": SHARED / "datasets/cats_vs_dogs/train",
}
KINDS = ("q60", "q75", "q90", "x0.5", "x0.75", "x1.5")
THRESHOLDS = (0.85, 0.9, 0.92, 0.93, 0.94, 0.95, 0.96, 0.97, 0.98)


def variant(src: Path, kind: str, dst: Path) -> None:
    from PIL import Image

    im = Image.open(src).convert("RGB")
    if kind.startswith("q"):
        im.save(dst, "JPEG", quality=int(kind[1:]))
    else:
        f = float(kind[1:])
        im.resize((max(8, round(im.width * f)), max(8, round(im.height * f))), Image.BILINEAR).save(
            dst, "JPEG", quality=90
        )


def build(src: Path, root: Path, n: int, others: int, seed: int) -> list[tuple[str, str, str]]:
    """The layout-A folder; (test path, its original's train path, kind) per copy."""
    classes = sorted(p for p in src.iterdir() if p.is_dir())
    pool = [f for c in classes for f in sorted(c.iterdir())]
    rng = random.Random(seed)
    picked = rng.sample(pool, n + others)
    copies = []
    for i, f in enumerate(picked):
        cls = f.parent.name
        (root / "train" / cls).mkdir(parents=True, exist_ok=True)
        (root / "validation" / cls).mkdir(parents=True, exist_ok=True)
        train_rel = f"train/{cls}/{f.name}"
        (root / train_rel).write_bytes(f.read_bytes())
        if i >= n:
            continue
        (root / "test" / cls).mkdir(parents=True, exist_ok=True)
        for kind in KINDS:
            rel = f"test/{cls}/{f.stem}-{kind}.jpg"
            variant(f, kind, root / rel)
            copies.append((rel, train_rel, kind))
    for cls in classes:  # validation must hold every class: one photo each, never a copy
        v = next(f for f in sorted(cls.iterdir()) if f not in picked)
        (root / "validation" / cls.name / v.name).write_bytes(v.read_bytes())
    return copies


def measure(name: str, src: Path, a: argparse.Namespace, tmp: Path) -> None:
    from tlsweep.config import load_sweep
    from tlsweep.features import extract_all

    root = tmp / name
    copies = build(src, root, a.n, a.others, a.seed)
    sweep = tmp / f"{name}.yaml"
    sweep.write_text(
        f"study: t\ndata: {{dir: {root}}}\nbackbones:\n  - {{name: MobileNetV2, weights: {WEIGHTS},"
        f" input_size: {a.size}, pooling: avg, args: {{alpha: 0.35}}}}\ncache_dir: {tmp}/cache\n"
    )
    ((_, entry, _),) = extract_all(load_sweep(sweep))
    row = {f["path"]: f["row"] for f in entry.manifest["files"]}
    feats = np.array(entry.features(), np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    train = [p for p in row if p.startswith("train/")]
    digest = {p: hashlib.sha256((root / p).read_bytes()).hexdigest() for p in train}
    xt = feats[[row[p] for p in train]]
    same, stranger, kinds = [], [], []
    for rel, orig, kind in copies:
        sims = xt @ feats[row[rel]]
        j = train.index(orig)
        same.append(float(sims[j]))
        mask = np.array([digest[p] != digest[orig] for p in train])
        stranger.append(float(sims[mask].max()))
        kinds.append(kind)
    same_a, str_a = np.array(same), np.array(stranger)
    print(f"\n{name}: {len(train)} training photos, {len(copies)} copies, {a.size} px")
    for k in KINDS:
        s = same_a[np.array(kinds) == k]
        print(
            f"  copy {k:>5}: min {s.min():.4f}  p1 {np.percentile(s, 1):.4f}  "
            f"p5 {np.percentile(s, 5):.4f}  median {np.median(s):.4f}"
        )
    print(
        f"  closest other photo: median {np.median(str_a):.4f}  p95 {np.percentile(str_a, 95):.4f}"
        f"  p99 {np.percentile(str_a, 99):.4f}  max {str_a.max():.4f}"
    )
    for t in THRESHOLDS:
        print(
            f"  threshold {t:.2f}: copies found {np.mean(same_a >= t):6.1%}   copies with "
            f"another photo above it {np.mean(str_a >= t):6.1%}"
        )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=150, help="originals per dataset")
    p.add_argument("--others", type=int, default=300, help="other training photos per dataset")
    p.add_argument("--size", type=int, default=96, help="input size (px)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.datasets:
            measure(name, DATASETS[name], a, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
