"""`peftlab report runs/`: the papers' table from a folder of results.json files, and a plot.

For every (k-shot setting, task, method): the learning rate with the best mean dev score over seeds is chosen, and
the test score at that learning rate is reported as mean ± std over seeds. Scores are each task's `score` (the mean
of its metrics, e.g. accuracy and F1 for MRPC), x 100. Rows: methods with their trainable-parameter share; columns:
tasks and their average.
"""

from __future__ import annotations

import json
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
        table[k][(method, task)] = Cell(
            [x["test"]["score"] for x in runs],
            best_lr,
            statistics.fmean(x["dev"]["score"] for x in runs),
            statistics.fmean(x["trainable_percent"] for x in runs),
        )
    return dict(table)


def _order(names: set[str], results: list[dict[str, Any]], field: str) -> list[str]:
    first_seen = list(dict.fromkeys(r[field] for r in results))
    return [n for n in first_seen if n in names]


def _fmt_percent(p: float) -> str:
    return f"{p:.3g}%" if p < 1 else f"{p:.1f}%"


def markdown(results: list[dict[str, Any]]) -> str:
    """The report: one table per k-shot setting, then the learning rates chosen on dev."""
    table = summarise(results)
    model = ", ".join(sorted({str(r["model"]) for r in results}))
    lines = [
        f"# Results ({model})",
        "",
        "Test score (mean ± std over seeds) at the learning rate with the best mean dev score; "
        "score = mean of the task's metrics x 100.",
        "",
    ]
    for k, cells in table.items():
        methods = _order({m for m, _ in cells}, results, "method")
        tasks = _order({t for _, t in cells}, results, "task")
        lines += [
            f"## {k}",
            "",
            "| method | trainable | " + " | ".join(tasks) + " | avg |",
            "|---|---:|" + "---:|" * (len(tasks) + 1),
        ]
        for method in methods:
            row = [cells.get((method, t)) for t in tasks]
            shares = [c.trainable_percent for c in row if c]
            text = [f"{c.mean:.1f} ± {c.std:.1f}" if c else "–" for c in row]
            avg = f"{statistics.fmean(c.mean for c in row):.1f}" if all(row) else "–"
            lines.append(f"| {method} | {_fmt_percent(statistics.fmean(shares))} | " + " | ".join(text) + f" | {avg} |")
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
    """Average test score against the trainable-parameter share (log scale), one point per method and k setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = summarise(results)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for k, cells in table.items():
        methods = _order({m for m, _ in cells}, results, "method")
        xs, ys, errs = [], [], []
        for method in methods:
            row = [c for (m, _), c in cells.items() if m == method]
            xs.append(statistics.fmean(c.trainable_percent for c in row))
            ys.append(statistics.fmean(c.mean for c in row))
            errs.append(statistics.fmean(c.std for c in row))
        ax.errorbar(xs, ys, yerr=errs, fmt="o", capsize=3, label=k)
        for x, y, method in zip(xs, ys, methods, strict=True):
            ax.annotate(method, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (% of the model)")
    ax.set_ylabel("average test score")
    ax.set_title("score vs trainable parameters")
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
