"""How long extracting features takes on this machine, measured on a few real images (for the
estimates ``tlsweep init`` prints): decoding and resizing them, then the backbone's forward
pass, as a long extraction sees it (the first, tracing pass is not timed).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tlsweep.backbones import build_extractor
from tlsweep.config import BackboneConfig

log = logging.getLogger(__name__)


def _decoded(paths: Sequence[Path], size: int) -> Any:
    import numpy as np
    from PIL import Image

    out = []
    for p in paths:
        with Image.open(p) as im:
            out.append(np.asarray(im.convert("RGB").resize((size, size)), dtype="float32"))
    return np.stack(out)


def extraction_timing(paths: Sequence[Path], bb: BackboneConfig) -> tuple[float, int]:
    """(seconds per image, feature width) of ``bb`` on ``paths`` here. Weights do not change the
    cost: a backbone whose ImageNet weights are not on this machine is timed with random ones."""
    size = bb.input_size or 224
    model = build_extractor(bb)
    t0 = time.perf_counter()
    x = _decoded(paths, size)
    decode_s = time.perf_counter() - t0
    width = int(model.predict(x, batch_size=len(x), verbose=0).shape[-1])  # traces the graph
    t0 = time.perf_counter()
    model.predict(x, batch_size=len(x), verbose=0)
    per_image = (time.perf_counter() - t0 + decode_s) / len(paths)
    log.debug("%s: %.1f ms per image", bb.label, 1000 * per_image)
    return per_image, width
