"""``tlsweep init DATA_DIR``: look at an image folder and write a first sweep file that runs as
written; prints what it found, what it chose and why, and how long the sweep should take.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from tlsweep.errors import TlsweepError

MEASURE_IMAGES = 32  # images pushed through each backbone to time extraction


def register_init(sub: Any) -> None:
    """The ``init`` subcommand."""
    i = sub.add_parser(
        "init", help="look at an image folder and write a sweep file that runs as written"
    )
    i.add_argument("data_dir", metavar="DATA_DIR", help="the image folder")
    i.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        default="sweep.yaml",
        help="the sweep file to write (default %(default)s)",
    )
    i.add_argument("--force", action="store_true", help="replace the file if it exists")
    i.set_defaults(func=cmd_init)


def cmd_init(args: argparse.Namespace) -> int:
    from tlsweep.config import duration
    from tlsweep.sweep import init_sweep

    if not args.data_dir.strip() or not args.output.strip():
        raise TlsweepError("init: got an empty path; give the image folder and -o FILE")
    out = Path(args.output)
    print(f"looking at {args.data_dir} ...", flush=True)
    s, p, t, _ = init_sweep(Path(args.data_dir), out, force=args.force, measure=MEASURE_IMAGES)
    split = ", ".join(f"{k} {n}" for k, n in s.split_counts.items() if n)
    if s.layout == "A":
        print(f"layout A (train/validation folders): {split}")
    else:
        print(f"layout B (one folder per class), split by tlsweep: {split}")
    print(f"{len(s.class_names)} classes: " + ", ".join(f"{c} {n}" for c, n in s.counts.items()))
    w, h = s.typical_size
    print(f"typical image {w}x{h} px")
    if s.unreadable:
        path, why = s.unreadable[0]
        more = f" (and {len(s.unreadable) - 1} more)" if len(s.unreadable) > 1 else ""
        print(f"{len(s.unreadable)} unreadable file(s), skipped: {path}: {why}{more}")
    for b in p.backbones:
        args_text = "".join(f" {k}={v}" for k, v in b["args"].items())
        print(f"backbone {b['name']}{args_text} at {b['input_size']} px")
    for note in p.notes:
        print(f"  {note}")
    if t is not None:
        print(
            f"measured here on {t.images_measured} images: extraction about "
            f"{duration(t.extraction_s)} (once), the study about {duration(t.study_s)} "
            f"({p.n_trials} trials, ~{t.seconds_per_trial:.1f} s each)"
        )
    print(f"wrote {out}; next:")
    print(f"  tlsweep run {out} && tlsweep ui {out}")
    return 0
