"""Plots: the figures hold the logged numbers (read back from the matplotlib objects, not only a PNG on disk), for
finished runs, runs not evaluated yet and resumed runs; curves.png never stops a run; top-1 against MACs."""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("matplotlib", reason="the plots need matplotlib: pip install -e '.[dev]'")

from mambaout import plots  # noqa: E402
from mambaout.models.published import PUBLISHED  # noqa: E402
from mambaout.tracking import CURVES_ENV, RunFolder  # noqa: E402
from mambaout.validation import write_results  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def log_run(folder: Path, steps: range, epochs: range, steps_per_epoch: int = 2, scale: float = 1.0) -> RunFolder:
    """A run folder's logs as train.py writes them: a row per step, a row per evaluated epoch."""
    run = RunFolder(folder, enabled=True, resume=True)
    for step in steps:
        run.log_step({"step": step, "epoch": (step - 1) // steps_per_epoch, "lr": 1e-3 * step, "loss": scale / step,
                      "grad_norm": 1.0, "img_per_s": 100.0 + step, "mfu": None})
    for epoch in epochs:
        run.log_epoch({"epoch": epoch, "step": (epoch + 1) * steps_per_epoch, "lr": 1e-3,
                       "train_loss": scale / (epoch + 1), "eval_loss": 2 * scale / (epoch + 1),
                       "top1": 10.0 * epoch, "top5": 20.0 * epoch, "img_per_s": 50.0})
    run.close()
    return run


def panel(figure, title: str):
    return next(ax for ax in figure.axes if ax.get_title() == title)


def curve(figure, title: str, run: str, column: str) -> tuple[list[float], list[float]]:
    line = next(line for line in panel(figure, title).lines if (line.get_label(), line.get_gid()) == (run, column))
    return list(line.get_xdata()), list(line.get_ydata())


def test_runs_overlaid_with_their_numbers(tmp_path):
    """A finished run and one not evaluated yet, in one figure: one colour and legend entry per run."""
    log_run(tmp_path / "long", range(1, 7), range(3))
    log_run(tmp_path / "fresh", range(1, 4), range(0), scale=3.0)
    figure = plots.plot_runs([plots.read_run(tmp_path / "long"), plots.read_run(tmp_path / "fresh")])

    assert [text.get_text() for text in figure.legends[0].get_texts()] == ["long", "fresh"]
    assert curve(figure, "train loss (logged steps)", "long", "loss") == ([1, 2, 3, 4, 5, 6],
                                                                           [1 / s for s in range(1, 7)])
    assert curve(figure, "train loss (logged steps)", "fresh", "loss") == ([1, 2, 3], [3 / s for s in (1, 2, 3)])
    assert curve(figure, "learning rate", "long", "lr")[1] == pytest.approx([1e-3 * s for s in range(1, 7)])
    assert curve(figure, "training img/s", "fresh", "img_per_s")[1] == [101, 102, 103]
    assert curve(figure, "eval top-1 % (dashed: EMA)", "long", "top1") == ([1, 2, 3], [0, 10, 20])
    assert curve(figure, "eval top-5 %", "long", "top5") == ([1, 2, 3], [0, 20, 40])
    train, evaluation = (curve(figure, "loss per epoch (solid: train, dashed: eval)", "long", column)
                         for column in ("train_loss", "eval_loss"))
    assert train == ([1, 2, 3], [1, 1 / 2, 1 / 3]) and evaluation == ([1, 2, 3], [2, 1, 2 / 3])
    top1 = panel(figure, "eval top-1 % (dashed: EMA)")
    assert [line.get_label() for line in top1.lines] == ["long"]  # nothing for the run not evaluated yet
    assert {line.get_color() for line in panel(figure, "learning rate").lines} == {"C0", "C1"}

    alone = plots.plot_runs([plots.read_run(tmp_path / "fresh")])
    assert [text.get_text() for text in panel(alone, "eval top-5 %").texts] == ["no evaluation yet"]
    assert not panel(alone, "eval top-5 %").lines
    (tmp_path / "fresh" / "metrics.csv").write_text("epoch,step,map\n0,2,0.5\n")  # a run with other metrics
    other = plots.plot_runs([plots.read_run(tmp_path / "fresh")])
    assert [text.get_text() for text in panel(other, "eval top-5 %").texts] == ["not logged by these runs"]


def test_resumed_history_is_the_one_the_run_followed(tmp_path):
    """train.py truncates its logs on resume; logs that were not truncated (copied earlier, or written by a run
    that crashed between) read the same way: a row at or before an earlier step replaces what followed it."""
    run = log_run(tmp_path / "resumed", range(1, 7), range(3))
    run.truncate_logs_after(3)  # a resume from the checkpoint of step 3 ...
    log_run(tmp_path / "resumed", range(4, 9), range(1, 4), scale=5.0)  # ... then its own rows from step 4
    log_run(tmp_path / "raw", range(1, 7), range(3))
    log_run(tmp_path / "raw", range(4, 9), range(1, 4), scale=5.0)  # the same, never truncated

    for name in ("resumed", "raw"):
        history = plots.read_run(tmp_path / name)
        assert [row["step"] for row in history.steps] == [1, 2, 3, 4, 5, 6, 7, 8]
        assert [row["loss"] for row in history.steps] == [1, 1 / 2, 1 / 3, *[5 / s for s in range(4, 9)]]
        figure = plots.plot_runs([history])
        assert curve(figure, "eval top-1 % (dashed: EMA)", name, "top1") == ([1, 2, 3, 4], [0, 10, 20, 30])
        assert curve(figure, "loss per epoch (solid: train, dashed: eval)", name, "train_loss")[1] \
            == [1, 5 / 2, 5 / 3, 5 / 4]


def test_curves_png_at_each_evaluation_never_fails_a_run(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv(CURVES_ENV, raising=False)
    log_run(tmp_path / "run", range(1, 5), range(2))
    with Image.open(tmp_path / "run" / "curves.png") as image:
        assert image.size == (1500, 800)
    assert not list((tmp_path / "run").glob(".*partial"))

    def broken(folder):
        raise RuntimeError("no fonts")

    monkeypatch.setattr(plots, "write_run_curves", broken)
    with caplog.at_level(logging.WARNING, logger="mambaout"):
        log_run(tmp_path / "other", range(1, 3), range(1))  # goes on, and says why there is no figure
    assert "could not draw curves.png (RuntimeError: no fonts); training goes on" in caplog.text

    monkeypatch.setenv(CURVES_ENV, "off")
    log_run(tmp_path / "quiet", range(1, 3), range(1))
    assert not (tmp_path / "quiet" / "curves.png").exists()


def test_curves_png_is_drawn_at_most_every_30_s_and_at_the_end(tmp_path, monkeypatch):
    """A drawing costs about as much as a quickstart epoch: evaluations seconds apart share one (the first waits
    30 s from the start), and the run's end draws what the last drawing did not show."""
    from mambaout import tracking

    monkeypatch.delenv(CURVES_ENV, raising=False)
    drawn, now = [], [1000.0]
    monkeypatch.setattr(plots, "write_run_curves", lambda folder: drawn.append(now[0]))
    monkeypatch.setattr(tracking.time, "monotonic", lambda: now[0])
    run = RunFolder(tmp_path / "run", enabled=True)
    for seconds in (3, 6, 35, 40, 66, 70):  # the evaluations' times since the start
        now[0] = 1000.0 + seconds
        run.log_epoch({"epoch": seconds, "step": seconds + 1, "top1": 1.0})
    assert drawn == [1035.0, 1066.0]
    run.close()
    assert drawn == [1035.0, 1066.0, 1070.0]


def test_plot_runs_script(tmp_path, capsys):
    log_run(tmp_path / "a" / "femto", range(1, 5), range(2))
    log_run(tmp_path / "b" / "femto", range(1, 3), range(0))
    script = load_script("plot_runs")
    assert script.run_names([str(tmp_path / "a" / "femto"), str(tmp_path / "b" / "femto")]) \
        == [str(tmp_path / "a" / "femto"), str(tmp_path / "b" / "femto")]  # same names: the paths tell them apart
    assert script.main([str(tmp_path / "a" / "femto"), str(tmp_path / "b" / "femto"),
                        "--out", str(tmp_path / "runs.png")]) == 0
    assert "2 logged steps, 0 evaluated epochs" in capsys.readouterr().out
    assert Image.open(tmp_path / "runs.png").size == (1500, 800)
    with pytest.raises(SystemExit):
        script.main([str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.png")])
    assert "no such run folder" in capsys.readouterr().err


def summary(model: str, img_size: int, top1: float, gmacs: float, params: int) -> dict:
    """What validate.py reports (the keys a results file holds)."""
    return {"model": model, "checkpoint": "best.pth", "data": "/data/imagenet", "img_size": img_size,
            "crop_pct": 1.0, "interpolation": "bicubic", "use_ema": False, "top1": top1, "top5": 95.0,
            "loss": 0.9, "count": 50000, "bad_images_skipped": 0, "params": params, "gmacs": gmacs,
            "img_per_s": 900.0, "devices": 1, "device": "cuda"}


def test_accuracy_vs_macs_beside_the_paper(tmp_path):
    write_results(summary("mambaout_femto", 224, 78.5, 1.16, 7_304_536), str(tmp_path / "femto.json"))
    for row in (summary("mambaout_kobe", 224, 79.8, 1.49, 9_141_208),
                summary("mambaout_kobe", 288, 80.9, 2.46, 9_141_208)):
        write_results(row, str(tmp_path / "ours.csv"))
    script = load_script("plot_accuracy_vs_macs")
    assert script.main([str(tmp_path / "femto.json"), str(tmp_path / "ours.csv"), "--out", str(tmp_path / "a.png")]) \
        == 0
    assert Image.open(tmp_path / "a.png").size == (800, 600)

    figure = plots.plot_accuracy_vs_macs([tmp_path / "femto.json", tmp_path / "ours.csv"])
    ax = figure.axes[0]
    assert ax.get_xscale() == "log"
    assert [text.get_text() for text in ax.get_legend().get_texts()] \
        == ["MambaOut (paper, 224 px)", "femto.json", "ours.csv"]
    paper, femto, ours = ax.collections
    assert paper.get_offsets().tolist() == [[p.gmacs, p.top1] for p in PUBLISHED.values()]
    assert paper.get_sizes().tolist() == pytest.approx([p.params / 1e5 for p in PUBLISHED.values()])
    assert femto.get_offsets().tolist() == [[1.16, 78.5]]
    assert ours.get_offsets().tolist() == [[1.49, 79.8], [2.46, 80.9]]
    assert ours.get_sizes().tolist() == pytest.approx([91.41208] * 2)
    labels = [text.get_text() for text in ax.texts]
    assert labels == ["femto", "kobe", "tiny", "small", "base", "mambaout_femto @224", "mambaout_kobe @224",
                      "mambaout_kobe @288"]

    (tmp_path / "other.csv").write_text("epoch,top1\n1,50\n")
    with pytest.raises(ValueError, match="not a validate.py results file"):
        plots.plot_accuracy_vs_macs([tmp_path / "other.csv"])
