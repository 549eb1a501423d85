"""Figures: a run's curves (its ``curves.png``), several runs overlaid, and top-1 against MACs beside the paper's.

Needs matplotlib (``pip install -e '.[plots]'``). Figures are built without pyplot (no global state, no display),
and every plotting function returns its ``Figure``, so what it shows can be read back (tests do).
"""
from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from .models.published import PUBLISHED

CURVES_FILE = "curves.png"
# (column of steps.csv, title): against the optimizer step
STEP_PANELS = (("loss", "train loss (logged steps)"), ("lr", "learning rate"), ("img_per_s", "training img/s"))
# (columns of metrics.csv, title): against the epoch; the first column solid, the second dashed
EPOCH_PANELS = ((("train_loss", "eval_loss"), "loss per epoch (solid: train, dashed: eval)"),
                (("top1", "ema_top1"), "eval top-1 % (dashed: EMA)"),
                (("top5",), "eval top-5 %"))
NO_DATA = {"steps": "no logged step yet", "epochs": "no evaluation yet"}


# --- runs --------------------------------------------------------------------------------------------------------

@dataclass
class RunHistory:
    """What a run folder logged: ``steps`` (steps.csv rows) and ``epochs`` (metrics.csv rows), as numbers."""

    name: str
    steps: list[dict[str, float | None]]
    epochs: list[dict[str, float | None]]


def read_run(folder: str | Path, name: str | None = None) -> RunHistory:
    """A run folder's logs; a file not written yet reads as no rows."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such run folder (train.output_dir of a train.py run)")
    return RunHistory(name or folder.name, _read_log(folder / "steps.csv"), _read_log(folder / "metrics.csv"))


def _read_log(path: Path) -> list[dict[str, float | None]]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        rows = [{key: _number(value) for key, value in row.items() if key} for row in csv.DictReader(f)]
    return resumed_history([row for row in rows if row.get("step") is not None])


def _number(text: str | None) -> float | None:
    try:
        return float(text) if text else None
    except ValueError:
        return None


def resumed_history(rows: list[dict[str, float | None]]) -> list[dict[str, float | None]]:
    """The history a run followed: a row that does not come after the previous ones was logged by a resumed run,
    and replaces what had been logged from its step on (train.py truncates its logs on resume; this also holds for
    logs copied before that, or cut off by a crash)."""
    kept: list[dict[str, float | None]] = []
    for row in rows:
        while kept and kept[-1]["step"] >= row["step"]:
            kept.pop()
        kept.append(row)
    return kept


def plot_runs(runs: Sequence[RunHistory]) -> Figure:
    """Training curves of ``runs`` overlaid, one colour per run: per logged step (loss, lr, img/s) and per
    evaluated epoch (train/eval loss, top-1, top-5)."""
    # fixed margins: a layout engine would double the drawing time, paid at every evaluation of a run
    figure = Figure(figsize=(15, 8))
    figure.subplots_adjust(left=0.05, right=0.99, bottom=0.07, top=0.88, wspace=0.2, hspace=0.3)
    step_axes, epoch_axes = figure.subplots(2, 3)
    colours = [f"C{index % 10}" for index in range(len(runs))]
    for ax, (column, title) in zip(step_axes, STEP_PANELS):
        _panel(ax, title, "steps", [(run, colour, column, "-") for run, colour in zip(runs, colours)])
    for ax, (columns, title) in zip(epoch_axes, EPOCH_PANELS):
        _panel(ax, title, "epochs", [(run, colour, column, style) for run, colour in zip(runs, colours)
                                     for column, style in zip(columns, ("-", "--"))])
    handles = [Line2D([], [], color=colour, label=run.name) for run, colour in zip(runs, colours)]
    figure.legend(handles=handles, loc="upper center", ncols=min(len(runs), 4))
    return figure


def _panel(ax: Axes, title: str, log: str, series: list[tuple[RunHistory, str, str, str]]) -> None:
    """One panel of the ``steps`` or ``epochs`` log: each (run, colour, column, line style) that has values in it,
    against the optimizer step or the epochs trained; a note where none has."""
    per_epoch = log == "epochs"
    for run, colour, column, style in series:
        rows = [row for row in getattr(run, log) if row.get(column) is not None]
        if not rows:
            continue
        # metrics.csv numbers an epoch from 0 (the epoch under way); the axis counts the epochs trained
        x = [row["epoch"] + 1 for row in rows] if per_epoch else [row["step"] for row in rows]
        ax.plot(x, [row[column] for row in rows], style, color=colour, label=run.name, gid=column,
                marker="o" if per_epoch else None, markersize=3)
    ax.set_title(title)
    ax.set_xlabel("epochs trained" if per_epoch else "optimizer step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps and epochs are whole
    ax.grid(alpha=0.3)
    if not ax.lines:  # nothing logged yet, or a run that logs other metrics (a fine-tuning run's)
        note = NO_DATA[log] if not any(getattr(run, log) for run, *_ in series) else "not logged by these runs"
        ax.text(0.5, 0.5, note, transform=ax.transAxes, ha="center", va="center", color="grey")


def write_run_curves(folder: str | Path) -> Path:
    """``curves.png`` of a run folder, replaced whole (written beside it, then renamed)."""
    target = Path(folder) / CURVES_FILE
    save_figure(plot_runs([read_run(folder)]), target)
    return target


def save_figure(figure: Figure, path: str | Path) -> None:
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    figure.savefig(partial, dpi=100, format=path.suffix.lstrip(".") or "png")
    os.replace(partial, path)


# --- accuracy against compute ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelPoint:
    """A model's ImageNet top-1 (%), GMACs per image and parameters."""

    label: str
    top1: float
    gmacs: float
    params: int


def published_points() -> list[ModelPoint]:
    """The paper's MambaOut models at 224 px."""
    return [ModelPoint(name.removeprefix("mambaout_"), p.top1, p.gmacs, p.params) for name, p in PUBLISHED.items()]


def read_results(path: str | Path) -> list[ModelPoint]:
    """The runs in a ``validate.py --results`` file: ``.json`` (one run) or ``.csv`` (a row per run)."""
    path = Path(path)
    if path.suffix == ".json":
        records = [json.loads(path.read_text())]
    else:
        with open(path, newline="") as f:
            records = list(csv.DictReader(f))
    missing = [key for key in ("model", "top1", "gmacs", "params") if records and key not in records[0]]
    if missing:
        raise ValueError(f"{path}: not a validate.py results file (no {', '.join(missing)}); write one with "
                         "validate.py --results FILE.json or FILE.csv")
    return [ModelPoint(f"{record['model']} @{record['img_size']}", float(record["top1"]), float(record["gmacs"]),
                       int(float(record["params"]))) for record in records]


def marker_area(params: int) -> float:
    """Marker area in points^2: proportional to the parameter count (MambaOut-Femto's 7.3M: 73)."""
    return params / 1e5


def plot_accuracy_vs_macs(results: Iterable[str | Path] = ()) -> Figure:
    """Top-1 against GMACs (log scale), marker area by parameters: the paper's models and each results file."""
    figure = Figure(figsize=(8, 6), layout="constrained")
    ax = figure.subplots()
    groups = [("MambaOut (paper, 224 px)", published_points())]
    groups += [(Path(path).name, read_results(path)) for path in results]
    for index, (label, points) in enumerate(groups):
        ax.scatter([p.gmacs for p in points], [p.top1 for p in points], s=[marker_area(p.params) for p in points],
                   color=f"C{index % 10}", alpha=0.7, edgecolors="black", linewidths=0.5, label=label)
        for point in points:
            ax.annotate(point.label, (point.gmacs, point.top1), textcoords="offset points", xytext=(6, -3),
                        fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("GMACs per image (log scale)")
    ax.set_ylabel("ImageNet top-1 (%)")
    ax.set_title("Top-1 against compute (marker area: parameters)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="lower right", markerscale=0.5)
    return figure
