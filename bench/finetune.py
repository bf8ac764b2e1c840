"""Benchmark a fine-tuning epoch: tlsweep's stage vs. plain Keras ``Model.fit`` on
``image_dataset_from_directory``, the same model, in one run.

The model is the one tlsweep fine-tunes: MobileNetV2 a0.35 (the shared ImageNet weights) at
``--size`` px with a trained head on top (``build_export_model``), its top ``--unfreeze`` layers
trainable, BatchNorm frozen and in inference mode, Adam 1e-5, batch ``--batch``, horizontal flips.
Both contenders train a freshly built copy of it for ``--epochs`` epochs on the 2000 training
photos of cats_vs_dogs; each epoch is timed by a callback (first epoch: with tracing):

  (t) tlsweep: batches read from the decoded-once uint8 memory-mapped images
      (``finetune.image_cache``, its one-off decoding timed separately), flips as a
      ``tf.data`` map, ``Model.fit``;
  (k) ``keras.utils.image_dataset_from_directory(train, image_size=(size, size),
      batch_size=batch)`` (decoding every JPEG every epoch), the same flip map, ``prefetch``,
      ``Model.fit``.

Usage (from the repository root)::

    python bench/finetune.py --epochs 2 --json /tmp/bench_finetune.json

Target: tlsweep's warm epoch at least as fast as Keras's (ratio >= 1).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_data_args, mobilenet_v2, setup  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_args(p)
    p.add_argument("--size", type=int, default=160, help="input size (default 160)")
    p.add_argument("--unfreeze", type=int, default=20, help="top backbone layers to train")
    p.add_argument("--batch", type=int, default=32, help="batch size (default 32)")
    p.add_argument("--epochs", type=int, default=2, help="timed epochs per contender")
    p.add_argument("--json", type=Path, help="also write the results here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data, weights = setup(args)
    import dataclasses

    import keras
    import numpy as np
    import tensorflow as tf

    from tlsweep.config._schema import DataConfig, FinetuneConfig
    from tlsweep.features._cache import FeatureCache
    from tlsweep.head._train import HeadParams, train_head
    from tlsweep.images._find import find_images
    from tlsweep.winner._export import build_export_model
    from tlsweep.winner._finetune import compile_model, set_trainable
    from tlsweep.winner._finetune_data import augmentation, dataset, image_cache
    from tlsweep.winner._rebuild import Winner

    bb = dataclasses.replace(mobilenet_v2(weights), input_size=args.size)
    entry, _ = FeatureCache(args.cache_dir).ensure(bb, find_images(DataConfig(dir=data)))
    xt, yt = entry.split("train")
    xv, yv = entry.split("validation")
    head = train_head(
        xt,
        yt,
        xv,
        yv,
        2,
        HeadParams(units=256, dropout=0.5, learning_rate=1e-4, batch_size=64, epochs=10, seed=1),
    )
    ft = FinetuneConfig(batch_size=args.batch, unfreeze=args.unfreeze)
    winner = Winner(0, 0.0, {}, bb, entry, head, None)

    def model() -> keras.Model:
        m = build_export_model(winner)
        set_trainable(m, ft.unfreeze)
        compile_model(m, ft)
        return m

    class Timer(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.times: list[float] = []

        def on_epoch_begin(self, epoch: int, logs: object = None) -> None:
            self.t0 = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: object = None) -> None:
            self.times.append(time.perf_counter() - self.t0)

    t0 = time.perf_counter()
    images, files = image_cache(args.cache_dir, entry, args.size)
    cache_s = time.perf_counter() - t0
    labels = np.array([f["label"] for f in files], np.int64)
    rows = np.array([i for i, f in enumerate(files) if f["split"] == "train"], np.int64)
    n = len(rows)
    aug = augmentation(ft, 0)

    # (t) tlsweep: one dataset per epoch, as the stage builds it (seeded shuffle per epoch)
    m, timer = model(), Timer()
    for e in range(args.epochs):
        ds = dataset(images, labels, rows, args.batch, shuffle_seed=e, augment=aug)
        m.fit(ds, epochs=1, verbose=0, callbacks=[timer], shuffle=False)
    t_times = timer.times

    # (k) Keras: image_dataset_from_directory, decoding every epoch
    flip = keras.layers.RandomFlip("horizontal", seed=0)
    kds = keras.utils.image_dataset_from_directory(
        data / "train", image_size=(args.size, args.size), batch_size=args.batch, seed=0
    )
    kds = kds.map(lambda x, y: (flip(x, training=True), y)).prefetch(tf.data.AUTOTUNE)
    m, timer = model(), Timer()
    m.fit(kds, epochs=args.epochs, verbose=0, callbacks=[timer])
    k_times = timer.times

    out = {
        "machine": platform.processor() or platform.machine(),
        "size": args.size,
        "batch": args.batch,
        "unfreeze": args.unfreeze,
        "train_images": n,
        "image_cache_s": round(cache_s, 2),
        "tlsweep_epoch_s": [round(t, 2) for t in t_times],
        "keras_epoch_s": [round(t, 2) for t in k_times],
        "tlsweep_warm_images_per_s": round(n / t_times[-1], 1),
        "keras_warm_images_per_s": round(n / k_times[-1], 1),
        "speedup_warm": round(k_times[-1] / t_times[-1], 2),
    }
    print(f"{'contender':<34} " + " ".join(f"epoch {i + 1:>2} s" for i in range(args.epochs)))
    print(f"{'(t) tlsweep, decoded-once memmap':<34} " + " ".join(f"{t:>10.1f}" for t in t_times))
    print(f"{'(k) image_dataset_from_directory':<34} " + " ".join(f"{t:>10.1f}" for t in k_times))
    print(
        f"decode-once cache: {cache_s:.1f} s (0 when already cached); warm epoch: tlsweep "
        f"{out['tlsweep_warm_images_per_s']} img/s, Keras {out['keras_warm_images_per_s']} img/s, "
        f"speed-up {out['speedup_warm']}x (target >= 1)"
    )
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
