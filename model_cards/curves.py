"""A card's accuracy curves: the table and the plot. A curve is one task, or one (task, noise, dtype) where the
results measured a task on several noise corpora or in several dtypes."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _key(entry: dict[str, Any]) -> tuple[str, str, str]:
    return entry["task"], entry["noise"], entry.get("dtype", "")


def series_of(results: dict[str, Any], tasks: list[str]) -> list[str]:
    """The curves' labels, tasks in `tasks` order: `qa1`, or `qa1, milton, bfloat16` where a task was measured on
    several noises or in several dtypes."""
    keys = sorted({_key(e) for e in results["evaluation"]}, key=lambda k: (tasks.index(k[0]), k[1], k[2]))
    return list(dict.fromkeys(_label(key, keys) for key in keys))


def _label(key: tuple[str, str, str], keys: list[tuple[str, str, str]]) -> str:
    task, noise, dtype = key
    same_task = [k for k in keys if k[0] == task]
    parts = [task]
    if len({k[1] for k in same_task}) > 1:
        parts.append(noise)
    if len({k[2] for k in same_task}) > 1:
        parts.append(dtype)
    return ", ".join(parts)


def series_label(entry: dict[str, Any], labels: list[str]) -> str:
    """The label of the curve `entry` belongs to (one of `labels`, from `series_of`)."""
    task, noise, dtype = _key(entry)
    for candidate in (f"{task}, {noise}, {dtype}", f"{task}, {noise}", f"{task}, {dtype}", task):
        if candidate in labels:
            return candidate
    raise KeyError(f"no curve for {entry}")


def _cell(entry: dict[str, Any]) -> str:
    """`96.5% (n=200)`, with the 95% interval when the results give one: `96.5% (n=200; 93.0-98.3%)`."""
    interval = entry.get("ci95")
    if not interval:
        return f"{entry['accuracy']:.1%} (n={entry['samples']})"
    return f"{entry['accuracy']:.1%} (n={entry['samples']}; {interval[0]:.1%}-{interval[1]:.1%})"


def accuracy_table(results: dict[str, Any], tasks: list[str]) -> str:
    """Markdown table: one row per length (tokens, segments), one column per curve: accuracy, samples and
    the 95% interval where measured."""
    labels = series_of(results, tasks)
    cells = {(e["num_tokens"], series_label(e, labels)): e for e in results["evaluation"]}
    lengths = sorted({e["num_tokens"] for e in results["evaluation"]})
    lines = ["| tokens | segments | " + " | ".join(labels) + " |", "|---:|---:|" + "---:|" * len(labels)]
    for tokens in lengths:
        segments = sorted({e["segments"] for e in results["evaluation"] if e["num_tokens"] == tokens})
        row = [_cell(cells[tokens, label]) if (tokens, label) in cells else "-" for label in labels]
        lines.append(f"| {tokens:,} | {'/'.join(map(str, segments))} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot_accuracy(results: dict[str, Any], path: str | Path) -> Path:
    """Draw accuracy against document length (log tokens), one line per curve, to `path` (PNG)."""
    try:
        from matplotlib.figure import Figure  # lazy: only the plot needs matplotlib
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError("plotting needs matplotlib: `pip install matplotlib` (or pass --no-plot)") from error
    tasks = list(
        dict.fromkeys([*results.get("training", {}).get("tasks", []), *(e["task"] for e in results["evaluation"])])
    )
    labels = series_of(results, tasks)
    figure = Figure(figsize=(6.4, 4.0))
    axes = figure.subplots()
    for label in labels:
        points = sorted((e["num_tokens"], e["accuracy"]) for e in results["evaluation"]
                        if series_label(e, labels) == label)  # fmt: skip
        axes.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    axes.set_xscale("log")
    axes.set_ylim(0, 1.05)
    axes.set_xlabel("document length (tokens)")
    axes.set_ylabel("accuracy")
    axes.set_title(f"{results['name']}: accuracy by length")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    return path
