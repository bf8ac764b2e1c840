"""The audit as something to look at: the copies found as table columns, and a PNG grid of the
closest pairs side by side (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tlsweep.images import image_grid

GRID_ROWS = 8  # pairs shown


def copies_table(report: Any) -> dict[str, list[Any]]:
    """One row per pair of copies: kind (exact / near), the two files, their splits and
    classes, the cosine similarity of their features (1.0 for byte-identical files)."""
    split_of, class_of = report.split_of, report.class_of
    rows: list[tuple[str, str, str, float]] = []
    for g in report.exact_duplicates:
        first, *rest = g["files"]
        rows += [("exact", first, other, 1.0) for other in rest]
    rows += [("near", p["a"], p["b"], p["similarity"]) for p in report.near_duplicates]
    return {
        "kind": [r[0] for r in rows],
        "a": [r[1] for r in rows],
        "b": [r[2] for r in rows],
        "splits": [f"{split_of.get(r[1], '?')}/{split_of.get(r[2], '?')}" for r in rows],
        "classes": [f"{class_of.get(r[1], '?')}/{class_of.get(r[2], '?')}" for r in rows],
        "similarity": [r[3] for r in rows],
    }


def copies_grid(report: Any, out: str | Path, rows: int = GRID_ROWS) -> bool:
    """Write a PNG of the first ``rows`` pairs of :func:`copies_table` (exact copies across
    splits first, then the closest near copies), each pair side by side with its files,
    splits, classes and similarity. False (nothing written) when there is no pair."""
    table = copies_table(report)
    order = sorted(
        range(len(table["a"])),
        key=lambda i: (
            table["splits"][i].split("/")[0] == table["splits"][i].split("/")[1],
            -table["similarity"][i],
        ),
    )[:rows]
    items = []
    for i in order:
        for c, key in enumerate(("a", "b")):
            split = table["splits"][i].split("/")[c]
            cls = table["classes"][i].split("/")[c]
            how = f"{table['kind'][i]} {table['similarity'][i]:.3f}"
            items.append((table[key][i], f"{table[key][i]}\n{split}, {cls}; {how}"))
    return image_grid(report.data_dir, items, out, cols=2)


TABLE = "audit/copies.json"


def log_on_parent(tracker: Any, report: Any) -> None:
    """The copies of ``report`` on the study's parent run (``tracker``: a
    :class:`tlsweep.tracking.Tracker`): :data:`TABLE` (an MLflow table) and ``audit/copies.png``
    (the grid), when there are any."""
    import tempfile

    table = copies_table(report)
    if not table["a"]:
        return
    tracker.log_parent_table(table, TABLE)
    with tempfile.TemporaryDirectory() as tmp:
        png = Path(tmp) / "copies.png"
        if copies_grid(report, png):
            tracker.log_parent_artifact(str(png), "audit")


SUSPECTS_SHOWN = 16  # likely label errors drawn, most likely first
SUSPECTS_TABLE = "audit/label_issues.json"


def suspects_grid(report: Any, out: str | Path, n: int = SUSPECTS_SHOWN) -> bool:
    """A PNG of the most likely label errors of ``report``, each with its file, the class it is
    filed under and the class the heads believe. False (nothing written) when there are none."""
    items = [
        (
            i["file"],
            f"#{i['rank']} {i['file']}\nfiled {i['given']}, heads say {i['suggested']} "
            f"(p {i['score']:.2f})",
        )
        for i in report.label_issues[:n]
    ]
    return image_grid(report.data_dir, items, out)


def log_audit_on_parent(tracker: Any, report: Any) -> None:
    """``tlsweep audit``'s findings on the study's parent run: the copies (:func:`log_on_parent`)
    and the likely label errors, as an MLflow table and a PNG grid, side by side in the UI."""
    import tempfile

    log_on_parent(tracker, report)
    if not report.label_issues:
        return
    columns = ("rank", "file", "given", "suggested", "score")
    tracker.log_parent_table(
        {c: [i[c] for i in report.label_issues] for c in columns}, SUSPECTS_TABLE
    )
    with tempfile.TemporaryDirectory() as tmp:
        png = Path(tmp) / "label_issues.png"
        if suspects_grid(report, png):
            tracker.log_parent_artifact(str(png), "audit")
