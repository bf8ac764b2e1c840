"""``tlsweep audit``: duplicates, copies across splits and likely label errors of the sweep's
data, from its cached features; a short summary here, everything in ``--json``."""

from __future__ import annotations

import argparse
from typing import Any

from ._commands import _stop_on_signals, load
from ._display import bar_factory

TOP = 5  # lines shown of each kind


def cmd_audit(args: argparse.Namespace) -> int:
    from tlsweep.config import check_can_write
    from tlsweep.sweep import audit_sweep

    _stop_on_signals()
    cfg = load(args)
    if args.json is not None:
        check_can_write(args.json, "--json")
    report = audit_sweep(cfg, args.backbone, bar_factory(args.quiet))
    print_report(report)  # first: a report that cannot be written is still seen
    if args.json is not None:
        try:
            report.write_json(args.json)
        except OSError as e:
            from tlsweep.errors import ServiceError

            raise ServiceError(
                f"--json {args.json}: cannot write the report ({e.strerror or e}); "
                "the summary is above: fix the path and run again (the features are cached)"
            ) from None
        print(f"full report: {args.json}")
    return 0


def print_report(report: Any) -> None:
    c = report.counts()
    print(
        f"audit of {c['images']} images in {report.data_dir} on {report.backbone} features:\n"
        f"  exact duplicates: {c['exact_groups']} groups ({c['exact_files']} files), "
        f"{c['exact_cross_split']} across splits, {c['exact_cross_class']} across classes"
    )
    for g in report.exact_duplicates[:TOP]:
        print(f"    {', '.join(g['files'])}  [{'/'.join(g['splits'])}; {'/'.join(g['classes'])}]")
    print(f"  near duplicates across splits (cosine >= {report.threshold:g}): {c['near_pairs']}")
    for p in report.near_duplicates[:TOP]:
        print(f"    {p['similarity']:.3f}  {p['a']}  ~  {p['b']}")
    for split, files in report.copies_of_train.items():
        if files:
            print(
                f"  {len(files)} {split} images are copies of training images: the "
                f"{split} score may be inflated"
            )
    print(f"  likely label errors: {c['label_issues']}")
    for i in report.label_issues[:TOP]:
        print(
            f"    #{i['rank']} {i['file']}: given {i['given']}, heads say {i['suggested']} "
            f"(p(given) {i['score']:.3f})"
        )
