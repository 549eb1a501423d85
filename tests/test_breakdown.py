"""Where a run's time goes: steps.csv's data_s and compute_s per step, metrics.csv's breakdown of each row's wall
time (first batch, steps, data wait, evaluation, checkpoints, logging), and train.py's line per evaluation."""
from __future__ import annotations

import logging
import statistics
import time

import pytest
import torch

from conftest import tiny_overrides
from helpers import read_csv
from mambaout.config import load_config
from mambaout.tracking import EPOCH_TIME_COLUMNS
from mambaout.trainer import train

GLOBAL_BATCH = 8  # tiny_overrides: 2 micro-batches of 4 per optimizer step, 6 steps per epoch of 48 images
PARTS = ("first_batch_s", "train_s", "eval_s", "checkpoint_s", "log_s")


def test_the_step_clock_splits_a_steps_wall_time_into_data_wait_and_compute(monkeypatch):
    """On a fake clock: a step's data wait is the time inside the loader's ``iter``/``next`` for its batches (the
    first batch's start-up included), its compute the rest since the previous step, and time outside the steps
    (a checkpoint, a log row inside it: counted once) is in neither."""
    from mambaout import engine

    now = [0.0]
    monkeypatch.setattr(engine.time, "perf_counter", lambda: now[0])

    class Loader:
        def __iter__(self):
            now[0] += 2.0  # worker start-up
            for batch in range(3):
                now[0] += 1.0  # the wait for each batch
                yield batch
            now[0] += 0.5  # noticing the end

    clock = engine.StepClock()  # t = 0
    batches = clock.batches(Loader())
    assert next(batches) == 0  # t = 3
    now[0] += 4.0  # the step computes
    assert clock.lap() == (3.0, 4.0)  # t = 7
    with clock.outside():  # a checkpoint ...
        now[0] += 10.0
        with clock.outside():  # ... that writes a log row
            now[0] += 1.0
    assert next(batches) == 1  # two micro-batches, each after 1 s of waiting, 2 s of compute each
    now[0] += 2.0
    assert next(batches) == 2
    now[0] += 2.0
    assert clock.lap() == (2.0, 4.0)  # 17 s since the last lap, 11 of them outside
    assert list(batches) == []
    assert (clock.first_batch, clock.data) == (3.0, 5.5)


def epochs_steps(out) -> tuple[list[dict[str, float]], list[dict[str, float]]]:
    def numbers(rows):
        return [{key: float(value) for key, value in row.items() if value} for row in rows]
    return numbers(read_csv(out / "metrics.csv")), numbers(read_csv(out / "steps.csv"))


def test_the_parts_of_each_metrics_row_add_up_to_its_wall_time(image_root, tmp_path, caplog):
    """Two epochs of 6 steps with a checkpoint every 4 steps (inside epoch 0 and epoch 1): in each metrics.csv row
    first batch + train + eval + checkpoint + log = epoch_seconds within 5% (each measured on its own); the steps'
    wall times in steps.csv (data_s + compute_s = global batch / img_per_s for each) add up to the row's first batch
    + train: the checkpoints and log rows written between steps are not in them. train.py logs the breakdown."""
    caplog.set_level(logging.INFO, logger="mambaout")
    out = tmp_path / "run"
    train(load_config(None, tiny_overrides(image_root, out, **{"train.max_steps": 12,
                                                               "train.checkpoint_every_steps": 4})))
    epochs, steps = epochs_steps(out)
    assert [row["step"] for row in epochs] == [6, 12]
    for row in epochs:
        parts = sum(row[name] for name in PARTS)
        print(f"epoch {row['epoch']:.0f}: {row['epoch_seconds']:.3f} s, parts {parts:.3f} s: "
              + ", ".join(f"{name} {row[name]:.3f}" for name in EPOCH_TIME_COLUMNS))
        assert parts == pytest.approx(row["epoch_seconds"], rel=0.05)
        assert all(row[name] > 0 for name in PARTS), row  # checkpoints: step 4's, then epoch 0's and step 8's
        assert 0 < row["data_wait_s"] < row["train_s"]
        assert row["img_per_s"] == pytest.approx(6 * GLOBAL_BATCH / (row["first_batch_s"] + row["train_s"]))

        timed = [step for step in steps if step["epoch"] == row["epoch"]]
        assert len(timed) == 6
        for step in timed:
            assert (step["data_s"] + step["compute_s"]) * step["img_per_s"] == pytest.approx(GLOBAL_BATCH, rel=1e-9)
            assert step["data_s"] > 0 and step["compute_s"] > 0
        walls = sum(step["data_s"] + step["compute_s"] for step in timed)
        assert walls == pytest.approx(row["first_batch_s"] + row["train_s"], rel=0.03)
        # the first step's data wait is the epoch's first batch and the wait for its second micro-batch
        assert sum(step["data_s"] for step in timed) == pytest.approx(row["first_batch_s"] + row["data_wait_s"],
                                                                     rel=0.05, abs=2e-3)
    lines = [record.getMessage() for record in caplog.records if " took " in record.getMessage()]
    assert [line.split(" took ")[0] for line in lines] == ["epoch 0", "epoch 1"], lines
    assert "s since the steps started: train " in lines[0] and "s since the last evaluation: train " in lines[1]
    for part in ("(data wait ", "first batch ", "eval ", "checkpoint ", "logging "):
        assert part in lines[1], lines[1]


class Slowed(torch.utils.data.Dataset):
    """A dataset whose every sample takes ``seconds`` longer to load."""

    def __init__(self, dataset, seconds: float) -> None:
        self.dataset, self.seconds = dataset, seconds

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, ref):
        time.sleep(self.seconds)
        return self.dataset[ref]


def slow_training_data(monkeypatch, seconds: float) -> None:
    """The training loader's samples (not the evaluation's) slowed by ``seconds`` each, in its workers too."""
    import mambaout.trainer as trainer

    real, built = trainer.build_loader, []

    def build_loader(dataset, *args, **kwargs):
        built.append(dataset)
        return real(Slowed(dataset, seconds) if len(built) == 1 else dataset, *args, **kwargs)
    monkeypatch.setattr(trainer, "build_loader", build_loader)


@pytest.mark.parametrize("workers,sleep", [(0, 0.02), (1, 0.1)])
def test_the_data_wait_rises_when_the_loader_is_slowed(image_root, tmp_path, monkeypatch, workers, sleep):
    """One epoch (6 steps of 8 images) with every training sample slowed by ``sleep`` seconds, against the same
    epoch unslowed. In the main process (no workers) each step's data_s grows by at least its 8 sleeps; with one
    worker, which loads while the step computes, the steps wait for the 48 sleeps of the epoch less what they
    compute meanwhile. The compute column stays about what it was: the wait is not counted as compute."""
    settings = {"train.max_steps": 6, "data.num_workers": workers}
    train(load_config(None, tiny_overrides(image_root, tmp_path / "fast", **settings)))
    slow_training_data(monkeypatch, sleep)
    train(load_config(None, tiny_overrides(image_root, tmp_path / "slow", **settings)))
    (fast_epoch,), fast = epochs_steps(tmp_path / "fast")
    (slow_epoch,), slow = epochs_steps(tmp_path / "slow")

    def mean(rows, column):
        return statistics.mean(row[column] for row in rows)
    print(f"\n{workers} workers, {sleep} s per sample: data_s {mean(fast, 'data_s'):.3f} -> "
          f"{mean(slow, 'data_s'):.3f}, compute_s {mean(fast, 'compute_s'):.3f} -> {mean(slow, 'compute_s'):.3f}; "
          "metrics.csv data_wait_s "
          f"{fast_epoch['data_wait_s']:.3f} -> {slow_epoch['data_wait_s']:.3f}, first_batch_s "
          f"{fast_epoch['first_batch_s']:.3f} -> {slow_epoch['first_batch_s']:.3f}")
    per_step = GLOBAL_BATCH * sleep
    # (a step computes somewhat slower after a wait: colder caches; counting the wait as compute would add it all)
    assert mean(slow, "compute_s") < 2 * mean(fast, "compute_s") + 0.05
    if workers == 0:
        assert all(row["data_s"] >= per_step for row in slow)
        assert mean(slow, "data_s") >= mean(fast, "data_s") + per_step
        assert slow_epoch["first_batch_s"] + slow_epoch["data_wait_s"] >= 6 * per_step
    else:
        # the worker starts with the epoch, inside the first batch's wait: every sleep of the epoch is waited for
        waited = sum(row["data_s"] for row in slow)
        assert waited >= 6 * per_step - sum(row["compute_s"] for row in slow)
        assert mean(slow, "data_s") >= mean(fast, "data_s") + per_step / 2
        assert slow_epoch["first_batch_s"] >= GLOBAL_BATCH / 2 * sleep  # a micro-batch of 4 samples
    waits = [row["first_batch_s"] + row["data_wait_s"] for row in (fast_epoch, slow_epoch)]
    assert waits[1] >= waits[0] + 3 * per_step  # metrics.csv: at least half the epoch's sleeps
    for row in (fast_epoch, slow_epoch):
        assert sum(row[name] for name in PARTS) == pytest.approx(row["epoch_seconds"], rel=0.05)
