"""What the ``tlsweep`` commands show: progress bars, the study summary, the winner's scores.

Part of the command line (with :mod:`tlsweep.cli`, :mod:`tlsweep.cli._commands` and
:mod:`tlsweep.cli._winner`): printing and progress bars live here and in those modules only,
never in the library. Bars go to stderr, results to stdout.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tlsweep.config import SweepConfig
    from tlsweep.features import CachedEntry
    from tlsweep.winner import FinetuneResult, Winner


def bar_factory(disable: bool = False) -> Any:
    from tqdm import tqdm

    def factory(bb: Any) -> Any:
        bar: dict[str, Any] = {}

        def progress(done: int, total: int) -> None:
            if "bar" not in bar:
                bar["bar"] = tqdm(
                    total=total,
                    desc=f"extract {bb.name} {bb.input_size}px {bb.pooling}"
                    + (f" x{bb.augment.views} views" if bb.augment else ""),
                    unit="img",
                    disable=disable,
                    dynamic_ncols=True,
                    file=sys.stderr,
                )
            b = bar["bar"]
            b.update(done - b.n)
            if done >= total:
                b.close()

        return progress

    return factory


def finetune_bar(disable: bool = False) -> Any:
    """A progress bar per fine-tuning epoch: images/s and the epoch's ETA."""
    from tqdm import tqdm

    bars: dict[int, Any] = {}

    def progress(epoch: int, epochs: int, done: int, total: int) -> None:
        if epoch not in bars:
            bars[epoch] = tqdm(
                total=total,
                desc=f"fine-tune epoch {epoch}/{epochs}",
                unit="img",
                disable=disable,
                dynamic_ncols=True,
                file=sys.stderr,
            )
        b = bars[epoch]
        b.update(done - b.n)
        if done >= total:
            b.close()

    return progress


def print_finetune(ft: FinetuneResult) -> None:
    if ft is None:
        return
    kept = (
        "kept: it replaces the frozen winner"
        if ft.accepted
        else "not kept: the frozen winner stays"
    )
    test = f", test accuracy {ft.test['accuracy']:.4f}" if ft.test else ""
    print(
        f"\nfine-tuning: {ft.epochs_run} epoch(s), best validation {ft.metric} {ft.best:.4f} "
        f"(epoch {ft.best_epoch}) vs frozen {ft.baseline:.4f} on the same images{test}, "
        f"{ft.seconds:.0f}s; {kept}"
    )


def views_cost(entry: CachedEntry) -> str:
    """``, 4 views of train: 5600 forward passes (2.80x)``: what augmented views cost."""
    views = entry.manifest.get("views")
    if not views:
        return ""
    passes = views["base"] + (views["count"] - 1) * views["rows"]
    return (
        f", {views['count']} views of {'/'.join(views['splits'])}: {passes} forward passes "
        f"({passes / max(views['base'], 1):.2f}x one view)"
    )


def _fmt(v: Any) -> str:
    if v is None:  # e.g. the best of a backbone with no finished trial yet
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def short_params(params: dict[str, Any], cfg: Any) -> str:
    fixed = {n for n, p in cfg.search.space.items() if p.kind == "fixed"}
    items = [(k, v) for k, v in params.items() if k not in fixed]
    if len(cfg.backbones) == 1:
        items = [(k, v) for k, v in items if k != "backbone"]
    return " ".join(f"{k}={_fmt(v)}" for k, v in items)


def _with_ci(test: dict[str, Any]) -> str:
    """``accuracy 0.9420 (95% CI 0.927-0.956)``, and the same for the objective's metric."""
    ci = test.get("ci", {})
    parts = []
    for name in ci or ["accuracy"]:
        part = f"{name.replace('_', ' ')} {test[name]:.4f}"
        if name in ci:
            lo, hi = ci[name]
            part += f" (95% CI {lo:.3f}-{hi:.3f})"
        parts.append(part)
    return ", ".join(parts)


def print_summary(summary: Any, cfg: Any) -> None:
    c = summary.counts
    print(
        f"study {summary.study}: {summary.finished}/{summary.n_trials} finished "
        f"({c.get('COMPLETE', 0)} complete, {c.get('PRUNED', 0)} pruned), "
        f"{c.get('FAIL', 0)} failed, {c.get('RUNNING', 0)} running, {c.get('WAITING', 0)} queued"
    )
    if len(summary.per_backbone) > 1 or summary.per_backbone:
        w = max(48, *(len(b["backbone"]) for b in summary.per_backbone))  # fused labels are long
        print(f"\n{'backbone':<{w}} {'trials':>6} {'best':>8} {'median':>8} {'s/trial':>8}")
        for b in summary.per_backbone:
            print(
                f"{b['backbone']:<{w}} {b['trials']:>6} {_fmt(b['best']):>8} "
                f"{_fmt(b['median']):>8} {_fmt(b['seconds_per_trial']):>8}"
            )
    print_finetune(summary.finetune)
    if summary.test is not None:
        t = summary.test
        b = summary.best[0]
        tuned = " fine-tuned" if summary.finetune is not None and summary.finetune.accepted else ""
        print(
            f"\nwinner (trial {b['number']}{tuned}): validation {summary.metric} {b['value']:.4f} "
            f"(the best of {summary.finished} trials, so optimistic); on the held-out test "
            f"split: {_with_ci(t)}, loss {t['loss']:.4f} ({t['n']} images)"
        )
        if "tta_accuracy" in t:
            print(
                "  (the test score is the plain image's, which the exported model computes; with "
                f"test-time augmentation over {t['tta_views']} cached views: test accuracy "
                f"{t['tta_accuracy']:.4f})"
            )
    elif summary.test_note:
        print(f"\nwinner: {summary.test_note}; no test score reported")
    if summary.best:
        print(f"\nbest trials ({summary.metric}, {summary.direction}):")
        print(f"{'trial':>5} {summary.metric:>12} {'seconds':>8}  parameters")
        for b in summary.best:
            print(
                f"{b['number']:>5} {b['value']:>12.4f} {_fmt(b['seconds']):>8}  "
                f"{short_params(b['params'], cfg)}"
            )


def print_test(w: Winner, cfg: SweepConfig) -> None:
    print(f"winner: trial {w.number}, validation {cfg.search.metric} {w.value:.4f}")
    if cfg.search.cv_folds or cfg.search.repeats > 1:  # the trial's value is a mean of heads
        heads = (cfg.search.cv_folds or 1) * cfg.search.repeats
        rebuilt = w.head.history[-1].as_dict()[cfg.search.metric]
        print(
            f"(the mean of the trial's {heads} heads; the head exported is retrained on the whole "
            f"training split: validation {cfg.search.metric} {rebuilt:.4f})"
        )
    if w.test is None:
        print("no test split (no test/ folder, or test_split: 0): no test score reported")
        return
    t = w.test
    print(f"test {_with_ci(t)}, loss {t['loss']:.4f} on {t['n']} held-out images")
    if w.backbone.augment is not None:
        single = w.validation_single_view
        print(
            "the test score is the plain image's, which the exported model computes (no "
            "test-time augmentation)"
            + (f"; its validation {cfg.search.metric} {single:.4f}" if single is not None else "")
        )
    if "tta_accuracy" in t:
        print(
            f"with test-time augmentation (mean of {t['tta_views']} cached views; not in the "
            f"exported model): test accuracy {t['tta_accuracy']:.4f}"
        )
    names = t["class_names"]
    print(f"{'class':<20} {'precision':>9} {'recall':>7}")
    for n, p, r in zip(names, t["precision"], t["recall"], strict=True):
        print(f"{n:<20} {p:>9.4f} {r:>7.4f}")
    print("confusion matrix (rows true, columns predicted):")
    for n, row in zip(names, t["confusion_matrix"], strict=True):
        print(f"  {n:<18} " + " ".join(f"{v:>6}" for v in row))


def print_ui_pages(
    server_url: str, experiment_id: str, parent: str | None, order: tuple[str, str] | None = None
) -> None:
    """The runs page, the study's own run and, with ``order`` (metric, direction), the trials
    best first (the UI otherwise opens them by start time, 100 a page)."""
    from tlsweep.tracking import best_first_url, runs_page_url

    print(runs_page_url(server_url, experiment_id))
    if parent:
        print("the study's own run, with the winner's test metrics and the table of all trials:")
        print(runs_page_url(server_url, experiment_id, parent))
    if order:
        metric, direction = order
        first = "highest" if direction == "maximize" else "lowest"
        print(f"the trials, best first (by {metric}, {first} first):")
        print(best_first_url(server_url, experiment_id, metric, direction))
    sys.stdout.flush()
