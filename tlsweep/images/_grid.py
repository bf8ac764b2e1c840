"""Images to look at rather than read: a PNG grid of image files with a caption each
(matplotlib, no display needed). The audit's copies and suspects and the winner's mistakes are
drawn with it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def image_grid(
    root: str | Path, items: Sequence[tuple[str, str]], out: str | Path, cols: int = 4
) -> bool:
    """Write a PNG of ``items`` (a file relative to ``root``, its caption), ``cols`` a row.
    Captions are plain text (a ``$`` in a file name is not mathematics); a file that cannot be
    read is drawn as "unreadable". False (nothing written) when there is nothing to draw."""
    if not items:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    cols = min(cols, len(items))
    rows = -(-len(items) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (path, caption) in zip(axes.flat, items, strict=False):
        try:
            with Image.open(Path(root) / path) as im:
                ax.imshow(im.convert("RGB"))
        except OSError:
            ax.text(0.5, 0.5, "unreadable", ha="center", parse_math=False)
        ax.set_title(caption, fontsize=7, parse_math=False)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return True
