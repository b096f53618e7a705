"""What the evaluations write: JSON reports, markdown tables and PNG plots, into one output folder.

Every `soft-ds eval` sub-command checks its --out with `check_out_dir` before any work, then writes
all its files at the end with `write_outputs` (files of the same name are replaced).
Plots are drawing functions (path -> None) run only when matplotlib is installed.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path


def verdict(reached: bool) -> str:
    """A goal's outcome as the reports print it (eval claims, bench overhead and inference): PASS,
    or MISS: the goal was not reached, though the run itself did not fail."""
    return "PASS" if reached else "MISS"


def check_out_dir(out: Path) -> None:
    """`out` can become the output folder: it is one already or does not exist yet."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")


def write_outputs(out: Path, files: dict[str, object], plots: list) -> None:
    """JSON (dicts and lists) and text files, then plots (callables path -> None) into out."""
    out.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        text = content if isinstance(content, str) else json.dumps(content, indent=2, ensure_ascii=False) + "\n"
        (out / name).write_text(text, encoding="utf-8")
    try:
        import matplotlib
        matplotlib.use("Agg")
    except ImportError:
        print("note: matplotlib is not installed (pip install matplotlib): no PNG written", file=sys.stderr)
        plots = []
    for name, draw in plots:
        draw(out / name)
    print(f"wrote {', '.join(list(files) + [name for name, _ in plots])} to {out}", file=sys.stderr)


def markdown_table(header: list[str], rows: list[list]) -> str:
    def cell(value):
        if isinstance(value, float):
            return "nan" if math.isnan(value) else f"{value:.4g}" if abs(value) >= 1e4 else f"{value:.4f}"
        return str(value)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def exit_table(results: dict, columns: list[tuple[str, str]]) -> str:
    """Markdown: a row per exit, a column per (model, (key, label)); empty where a model lacks the exit."""
    exits = sorted({int(n) for r in results.values() for n in r["exits"]})
    header = ["exit"] + [f"{name} {label}" for name in results for _, label in columns]
    rows = [[n] + [r["exits"][str(n)][key] if str(n) in r["exits"] else "" for r in results.values()
                   for key, _ in columns] for n in exits]
    return markdown_table(header, rows)


def exit_lines(results: dict, key: str) -> dict:
    """{model: (exits, values of key)} for line_plot."""
    return {name: ([int(n) for n in r["exits"]], [v[key] for v in r["exits"].values()]) for name, r in results.items()}


def line_plot(panels: list[tuple[str, dict]], xlabel: str, ylabel: str, log_y: bool = False):
    """A drawing function: one panel per (title, {label: (xs, ys)}), one line per label."""
    def draw(path: Path):
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
        fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
        for axis, (title, lines) in zip(axes[0], panels):
            for label, (xs, ys) in lines.items():
                axis.plot(xs, ys, "o-" if len(xs) <= 12 else "-", label=label, markersize=4)
            axis.set(xlabel=xlabel, ylabel=ylabel, title=title)
            axis.xaxis.set_major_locator(MaxNLocator(integer=True))  # exits and positions are whole numbers
            if log_y:
                axis.set_yscale("log")
            axis.grid(alpha=0.3)
            axis.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return draw


def heat_map(matrix: list[list[float]], rows: list[str], columns: list[str], title: str,
             row_label: str, column_label: str):
    def draw(path: Path):
        import matplotlib.pyplot as plt
        fig, axis = plt.subplots(figsize=(max(4.5, 2.5 + 0.9 * len(columns)), 1.5 + 0.7 * len(rows)))
        image = axis.imshow(matrix, cmap="RdYlGn", vmin=-1, vmax=1)
        axis.set_xticks(range(len(columns)), columns)
        axis.set_yticks(range(len(rows)), rows)
        for i, row in enumerate(matrix):
            for j, value in enumerate(row):
                axis.text(j, i, f"{value:+.2f}", ha="center", va="center", fontsize=8)
        axis.set(xlabel=column_label, ylabel=row_label, title=title)
        fig.colorbar(image, ax=axis, label="score (W - L) / T")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return draw
