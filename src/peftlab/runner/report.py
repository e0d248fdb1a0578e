"""`peftlab report runs/`: the papers' table from a folder of results.json files, and a plot.

For every (k-shot setting, task, method): the learning rate with the best mean dev score over seeds is chosen, and
the test score at that learning rate is reported as mean ± std over seeds. Scores are each task's `score` (the mean
of its metrics, e.g. accuracy and F1 for MRPC), x 100. Rows: methods with their trained and stored parameter shares
(a method may train more than it stores, e.g. Residual Prompt Tuning's MLP); columns: tasks and their average.

Noise: per task, each method is compared with the task's best method (highest mean test score) by a paired t-test
over the seeds both ran (pairs share the seed, hence the data sample); p >= 0.05 marks the difference as within
noise (≈). With one seed nothing can be told apart and the marker says so.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftlab.runner.errors import InputError

REPORT_MD, REPORT_PNG = "report.md", "report.png"


@dataclass
class Cell:
    """One (k, task, method) entry of the table."""

    test_scores: list[float]
    best_lr: float
    dev_mean: float
    trainable_percent: float
    stored_percent: float | None  # None: results.json from before stored counts were recorded
    seeds: list[int]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.test_scores)

    @property
    def std(self) -> float:
        return statistics.stdev(self.test_scores) if len(self.test_scores) > 1 else 0.0


def collect(runs_dir: str | Path) -> list[dict[str, Any]]:
    root = Path(runs_dir)
    if not root.is_dir():
        raise InputError(f"report: {root} is not a folder of runs")
    results = [json.loads(p.read_text()) for p in sorted(root.rglob("results.json"))]
    if not results:
        raise InputError(f"report: no results.json under {root}")
    return results


def _k_label(k: int | None) -> str:
    return "full data" if k is None else f"k = {k} per label"


def summarise(results: list[dict[str, Any]]) -> dict[str, dict[tuple[str, str], Cell]]:
    """{k label: {(method, task): Cell}} with the learning rate chosen on dev."""
    by_key: dict[tuple, dict[float, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in results:
        by_key[(_k_label(r.get("k_shot")), r["method"], r["task"])][float(r["learning_rate"])].append(r)
    table: dict[str, dict[tuple[str, str], Cell]] = defaultdict(dict)
    for (k, method, task), by_lr in by_key.items():
        best_lr = max(by_lr, key=lambda lr: (statistics.fmean(x["dev"]["score"] for x in by_lr[lr]), -lr))
        runs = sorted(by_lr[best_lr], key=lambda x: x["seed"])
        stored = [x["stored_percent"] for x in runs if "stored_percent" in x]
        table[k][(method, task)] = Cell(
            [x["test"]["score"] for x in runs],
            best_lr,
            statistics.fmean(x["dev"]["score"] for x in runs),
            statistics.fmean(x["trainable_percent"] for x in runs),
            statistics.fmean(stored) if len(stored) == len(runs) else None,
            [x["seed"] for x in runs],
        )
    return dict(table)


NOISE_P = 0.05


def within_noise(cell: Cell, best: Cell) -> bool | None:
    """Whether `cell` differs from `best` by no more than seed noise: paired t-test over their common seeds,
    p >= NOISE_P. None: fewer than two common seeds, nothing can be told."""
    from scipy.stats import ttest_rel

    mine = dict(zip(cell.seeds, cell.test_scores, strict=True))
    theirs = dict(zip(best.seeds, best.test_scores, strict=True))
    common = sorted(set(mine) & set(theirs))
    if len(common) < 2:
        return None
    diffs = [theirs[s] - mine[s] for s in common]
    if all(d == diffs[0] for d in diffs):  # no spread: equal is noise, a constant gap is not
        return diffs[0] == 0
    p = ttest_rel([theirs[s] for s in common], [mine[s] for s in common]).pvalue
    return math.isnan(p) or p >= NOISE_P


def noise_markers(cells: dict[tuple[str, str], Cell]) -> dict[tuple[str, str], str]:
    """Per (method, task): "best", "≈" (within noise of the best), "" (worse beyond noise) or "?" (one seed)."""
    marks: dict[tuple[str, str], str] = {}
    for task in {t for _, t in cells}:
        row = {m: c for (m, t), c in cells.items() if t == task}
        best = max(row, key=lambda m: row[m].mean)
        for method, cell in row.items():
            if method == best:
                marks[(method, task)] = "best"
                continue
            verdict = within_noise(cell, row[best])
            marks[(method, task)] = "?" if verdict is None else ("≈" if verdict else "")
    return marks


def _order(names: set[str], results: list[dict[str, Any]], field: str) -> list[str]:
    first_seen = list(dict.fromkeys(r[field] for r in results))
    return [n for n in first_seen if n in names]


def _fmt_percent(p: float | None) -> str:
    if p is None:
        return "–"
    return f"{p:.3g}%" if p < 1 else f"{p:.1f}%"


def _fmt_cell(cell: Cell | None, mark: str) -> str:
    if cell is None:
        return "–"
    text = f"{cell.mean:.1f} ± {cell.std:.1f}"
    return {"best": f"**{text}**", "≈": f"{text} ≈", "?": f"{text} ?"}.get(mark, text)


def markdown(results: list[dict[str, Any]]) -> str:
    """The report: one table per k-shot setting, then the learning rates chosen on dev."""
    table = summarise(results)
    model = ", ".join(sorted({str(r["model"]) for r in results}))
    lines = [
        f"# Results ({model})",
        "",
        "Test score (mean ± std over seeds) at the learning rate with the best mean dev score; "
        "score = mean of the task's metrics x 100. trained: parameters updated in training; stored: parameters "
        "a user ships (the stock export of a prompt method, else the saved adapter or model), both as a share of "
        "the model's. **bold**: the task's best mean; "
        f"≈: within noise of it (paired t-test over the seeds both ran, p >= {NOISE_P}); no mark: worse beyond "
        "noise; ?: one seed, noise unknown.",
        "",
    ]
    for k, cells in table.items():
        methods = _order({m for m, _ in cells}, results, "method")
        tasks = _order({t for _, t in cells}, results, "task")
        lines += [
            f"## {k}",
            "",
            "| method | trained | stored | " + " | ".join(tasks) + " | avg |",
            "|---|---:|---:|" + "---:|" * (len(tasks) + 1),
        ]
        marks = noise_markers(cells)
        for method in methods:
            row = [cells.get((method, t)) for t in tasks]
            trained = statistics.fmean(c.trainable_percent for c in row if c)
            stored = [c.stored_percent for c in row if c]
            stored_share = statistics.fmean(stored) if None not in stored else None
            text = [_fmt_cell(c, marks.get((method, t), "")) for c, t in zip(row, tasks, strict=True)]
            avg = f"{statistics.fmean(c.mean for c in row):.1f}" if all(row) else "–"
            shares = f"{_fmt_percent(trained)} | {_fmt_percent(stored_share)}"
            lines.append(f"| {method} | {shares} | " + " | ".join(text) + f" | {avg} |")
        lines += [
            "",
            "Learning rate chosen on dev:",
            "",
            "| method | " + " | ".join(tasks) + " |",
            "|---|" + "---:|" * len(tasks),
        ]
        for method in methods:
            rates = [f"{cells[(method, t)].best_lr:g}" if (method, t) in cells else "–" for t in tasks]
            lines.append(f"| {method} | " + " | ".join(rates) + " |")
        seeds = sorted({r["seed"] for r in results if _k_label(r.get("k_shot")) == k})
        lines += [
            "",
            f"Seeds: {', '.join(map(str, seeds))}; runs: {sum(1 for r in results if _k_label(r.get('k_shot')) == k)}.",
            "",
        ]
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path) -> None:
    """Average test score against the parameter share (log scale), one point per method and k setting: filled at
    the trained share, hollow at the stored share (joined by a line where they differ)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = summarise(results)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for k, cells in table.items():
        methods = _order({m for m, _ in cells}, results, "method")
        xs, ys, errs, stored = [], [], [], []
        for method in methods:
            row = [c for (m, _), c in cells.items() if m == method]
            xs.append(statistics.fmean(c.trainable_percent for c in row))
            ys.append(statistics.fmean(c.mean for c in row))
            errs.append(statistics.fmean(c.std for c in row))
            shares = [c.stored_percent for c in row]
            stored.append(statistics.fmean(shares) if None not in shares else None)
        bars = ax.errorbar(xs, ys, yerr=errs, fmt="o", capsize=3, label=f"{k}: trained")
        color = bars[0].get_color()
        kept = [(x, s, y) for x, s, y in zip(xs, stored, ys, strict=True) if s is not None]
        if kept:
            ax.scatter(
                [s for _, s, _ in kept],
                [y for *_, y in kept],
                facecolors="none",
                edgecolors=color,
                label=f"{k}: stored",
            )
            for x, s, y in kept:
                ax.plot([x, s], [y, y], color=color, alpha=0.4, linewidth=1)
        for x, y, method in zip(xs, ys, methods, strict=True):
            ax.annotate(method, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("parameters (% of the model): trained (filled), stored (hollow)")
    ax.set_ylabel("average test score")
    ax.set_title("score vs trained and stored parameters")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(runs_dir: str | Path, output_dir: str | Path | None = None) -> tuple[Path, Path, str]:
    """Write report.md and report.png (into `output_dir`, default the runs folder); return paths and the text."""
    results = collect(runs_dir)
    out = Path(output_dir or runs_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(results)
    (out / REPORT_MD).write_text(text + "\n")
    plot(results, out / REPORT_PNG)
    return out / REPORT_MD, out / REPORT_PNG, text
