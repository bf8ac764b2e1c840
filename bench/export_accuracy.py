"""Re-measure an exported model's accuracy in a fresh process that uses Keras only (no tlsweep).

Loads the ``.keras`` file in safe mode, reads the class names stored inside it, and classifies
every image of a layout-A split folder (one subfolder per class) at its own size, one image at a
time, decoded by ``keras.utils.load_img`` (Pillow), as a user of the model would.

Usage::

    python bench/export_accuracy.py model.keras ../shared/datasets/cats_vs_dogs/test
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import zipfile
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", type=Path)
    p.add_argument("folder", type=Path, help="a split folder with one subfolder per class")
    args = p.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import numpy as np

    t0 = time.perf_counter()
    model = keras.models.load_model(args.model, safe_mode=True, compile=False)
    names = json.loads(zipfile.ZipFile(args.model).read("tlsweep.json"))["class_names"]
    right = total = 0
    for k, name in enumerate(names):
        for f in sorted((args.folder / name).iterdir()):
            x = keras.utils.img_to_array(keras.utils.load_img(f, color_mode="rgb"))[None]
            right += int(np.asarray(model(x, training=False))[0].argmax() == k)
            total += 1
    out = {
        "model": str(args.model),
        "folder": str(args.folder),
        "images": total,
        "accuracy": right / total,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
