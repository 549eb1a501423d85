"""Crash-proof training: a killed or preempted run, resumed with the same command, is the same run."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import tiny_overrides
from mambaout import checkpoint
from mambaout.checkpoint import CheckpointError, CheckpointFolder, load_training_checkpoint
from mambaout.config import load_config
from mambaout.engine import NonFiniteLossError
from mambaout.tracking import RunFolderError
from mambaout.trainer import PREEMPTED_EXIT_CODE, ResumeError, train

REPO = Path(__file__).resolve().parents[1]
# Mixup/CutMix, drop path and random erasing are on (the schema's recipe defaults), 2 data workers.
RUN = {"train.max_steps": 8, "data.num_workers": 2, "train.checkpoint_every_steps": 2,
       "aug.random_erase_prob": 0.5}


def launch(image_root, out, nproc: int = 1, **extra) -> subprocess.Popen:
    overrides = tiny_overrides(image_root, out, **{**RUN, **extra})
    if nproc == 1:
        command = [sys.executable, "train.py", *overrides]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                   "--master_port", str(free_port()), "train.py", *overrides]
    # A session of its own, so that a kill reaches torchrun's workers too.
    return subprocess.Popen(command, cwd=REPO, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def finish(process: subprocess.Popen, timeout: float = 240) -> int:
    output, _ = process.communicate(timeout=timeout)
    process.output = output
    return process.returncode


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, f"run ended before {path.name} appeared:\n{process.communicate()[0]}"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.005)


def assert_same_run(out_a: Path, out_b: Path) -> None:
    a, b = load_training_checkpoint(out_a / "last.pth"), load_training_checkpoint(out_b / "last.pth")
    assert a["train_state"]["step"] == b["train_state"]["step"] == 8
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for (ka, va), (kb, vb) in zip(a["optimizer"]["state"].items(), b["optimizer"]["state"].items()):
        assert ka == kb and all(torch.equal(va[name], vb[name]) for name in va)
    for log in ("steps.csv", "metrics.csv"):  # losses, lr, accuracy to the last digit; timings differ
        assert _without_timing(out_a / log) == _without_timing(out_b / log)


def _without_timing(path: Path) -> list[list[str]]:
    rows = [line.split(",") for line in path.read_text().splitlines()]
    measured = ("img_per_s", "mfu", "epoch_seconds", "peak_memory_mib")  # of the machine, not of the run
    drop = {i for i, column in enumerate(rows[0]) if column in measured}
    return [[v for i, v in enumerate(row) if i not in drop] for row in rows]


@pytest.fixture(scope="module")
def uninterrupted(image_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "uninterrupted"
    process = launch(image_root, out)
    assert finish(process) == 0, process.output
    return out


@pytest.mark.parametrize("nproc", [1, 2])
def test_sigkill_then_same_command_resumes_bit_identically(image_root, uninterrupted, tmp_path, nproc):
    out = tmp_path / "killed"
    if nproc > 1:  # the 2-process reference: the same run, as torchrun
        reference = tmp_path / "reference"
        process = launch(image_root, reference, nproc=nproc)
        assert finish(process) == 0, process.output
        uninterrupted = reference
    process = launch(image_root, out, nproc=nproc)
    wait_for(out / "checkpoints" / "step_00000004.pth", process)
    os.killpg(process.pid, signal.SIGKILL)
    assert finish(process) == -signal.SIGKILL
    assert CheckpointFolder(out).load_latest()["train_state"]["step"] >= 4

    process = launch(image_root, out, nproc=nproc)
    assert finish(process) == 0, process.output
    assert "resuming" in process.output
    assert_same_run(uninterrupted, out)


def test_tensor_pipeline_resumes_bit_identically_after_sigkill(image_root, tmp_path):
    """The tensor pipeline (augmentation on the device, 2 workers) keeps the promise too: its plans are keyed by
    (seed, epoch, index), so the killed run continues from its checkpoint exactly."""
    tensor = {"data.pipeline": "tensor", "data.augment_on": "device"}
    reference, out = tmp_path / "reference", tmp_path / "killed"
    process = launch(image_root, reference, **tensor)
    assert finish(process) == 0, process.output
    process = launch(image_root, out, **tensor)
    wait_for(out / "checkpoints" / "step_00000004.pth", process)
    os.killpg(process.pid, signal.SIGKILL)
    assert finish(process) == -signal.SIGKILL
    saved = CheckpointFolder(out).load_latest()["train_state"]["step"]
    assert 4 <= saved < 8
    process = launch(image_root, out, **tensor)
    assert finish(process) == 0, process.output
    assert f"at optimizer step {saved}" in process.output
    assert_same_run(reference, out)


def test_sigterm_saves_exits_with_preemption_code_and_resumes(image_root, uninterrupted, tmp_path):
    out = tmp_path / "preempted"
    process = launch(image_root, out, **{"train.checkpoint_every_steps": None})
    wait_for(out / "steps.csv", process)  # training has started: mid-epoch, no checkpoint yet
    os.killpg(process.pid, signal.SIGTERM)
    assert finish(process) == PREEMPTED_EXIT_CODE, process.output
    saved = load_training_checkpoint(out / "last.pth")
    assert 0 < saved["train_state"]["step"] < 6  # stopped inside the first epoch

    process = launch(image_root, out, **{"train.checkpoint_every_steps": None})
    assert finish(process) == 0, process.output
    assert_same_run(uninterrupted, out)


KILL_DURING_WRITE = """
import os, signal, sys, torch
from mambaout.checkpoint import CheckpointFolder
folder = CheckpointFolder(sys.argv[1])
folder.save({"train_state": {"step": 1}, "model": {"w": torch.ones(3)}}, step=1)
real_save = torch.save
def torn_save(obj, f):
    f.write(b"PK\\x03\\x04 half a checkpoint")
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = torn_save
folder.save({"train_state": {"step": 2}, "model": {"w": torch.zeros(3)}}, step=2)
"""


def test_kill_while_writing_a_checkpoint_leaves_the_previous_one(tmp_path):
    process = subprocess.run([sys.executable, "-c", KILL_DURING_WRITE, str(tmp_path)], cwd=REPO)
    assert process.returncode == -signal.SIGKILL
    survivor = CheckpointFolder(tmp_path).load_latest()
    assert survivor["train_state"]["step"] == 1 and torch.equal(survivor["model"]["w"], torch.ones(3))
    assert not (tmp_path / "checkpoints" / "step_00000002.pth").exists()


def test_full_disk_is_a_clear_error_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    folder = CheckpointFolder(tmp_path)
    folder.save({"train_state": {"step": 1}, "model": {}}, step=1)

    def no_space(obj, f):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", no_space)
    with pytest.raises(CheckpointError, match="No space left on device.*previous checkpoint is intact"):
        folder.save({"train_state": {"step": 2}, "model": {}}, step=2)
    monkeypatch.undo()
    assert folder.load_latest()["train_state"]["step"] == 1
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000001.pth"]  # no debris


class NanAtCall:
    """A criterion that returns NaN from its ``at``-th call on, up to its ``until``-th if given (an injected
    fault)."""

    def __init__(self, criterion, at: int, until: int | None = None) -> None:
        self.criterion, self.at, self.until, self.calls = criterion, at, until, 0

    def __call__(self, logits, targets):
        self.calls += 1
        loss = self.criterion(logits, targets)
        poisoned = self.calls >= self.at and (self.until is None or self.calls <= self.until)
        return loss * float("nan") if poisoned else loss


def inject_nan(monkeypatch, at: int, until: int | None = None) -> None:
    import mambaout.trainer as trainer

    real = trainer.create_criterion
    monkeypatch.setattr(trainer, "create_criterion", lambda *a: NanAtCall(real(*a), at, until))


def test_injected_nan_stops_with_the_step_and_an_unpoisoned_checkpoint(image_root, tmp_path, monkeypatch):
    inject_nan(monkeypatch, at=9)  # micro-batch 9 = the first of optimizer step 5 (2 micro-batches a step)
    out = tmp_path / "nan"
    with pytest.raises(NonFiniteLossError, match=r"step 5: micro-batch losses \[nan, nan\].*Last good "
                                                  r"checkpoint: .*last.pth"):
        train(load_config(None, tiny_overrides(image_root, out, **RUN)))
    saved = load_training_checkpoint(out / "last.pth")
    assert saved["train_state"]["step"] == 4
    assert all(torch.isfinite(t).all() for t in saved["model"].values())


def test_skip_nonfinite_skips_and_counts(image_root, tmp_path, monkeypatch):
    inject_nan(monkeypatch, at=15)  # steps 8 onwards
    out = tmp_path / "skip"
    outcome = train(load_config(None, tiny_overrides(image_root, out, **RUN, **{"train.skip_nonfinite": True})))
    saved = load_training_checkpoint(out / "last.pth")
    assert outcome.step == 8 and saved["train_state"]["nonfinite_skips"] == 1
    assert all(torch.isfinite(t).all() for t in saved["model"].values())


def test_resume_refuses_a_breaking_change_and_allows_a_harmless_one(image_root, uninterrupted, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(uninterrupted, out)
    with pytest.raises(ResumeError, match=r"model.drop_path_rate: 0.1 -> 0.2"):
        train(load_config(None, tiny_overrides(image_root, out, **{**RUN, "model.drop_path_rate": 0.2})))
    outcome = train(load_config(None, tiny_overrides(image_root, out, **{**RUN, "train.log_interval": 5})))
    assert outcome.step == 8
    with pytest.raises(RunFolderError, match="never overwritten"):
        train(load_config(None, tiny_overrides(image_root, out, **RUN)), resume="never")


def test_preemption_on_an_epochs_last_step_still_evaluates_that_epoch(image_root, uninterrupted, tmp_path,
                                                                       monkeypatch):
    import contextlib

    import mambaout.trainer as trainer

    polls = []  # polled once per optimizer step: ask to stop at step 6, the end of epoch 0

    @contextlib.contextmanager
    def stop_at_step_6():
        yield lambda: polls.append(1) or len(polls) == 6

    monkeypatch.setattr(trainer, "_preemption_signals", stop_at_step_6)
    out = tmp_path / "edge"
    overrides = tiny_overrides(image_root, out, **{**RUN, "data.num_workers": 0})
    assert train(load_config(None, overrides)).preempted
    assert (out / "metrics.csv").read_text().count("\n") == 2  # header + the epoch-0 row
    monkeypatch.undo()
    assert train(load_config(None, overrides)).step == 8
    assert _without_timing(out / "metrics.csv") == _without_timing(uninterrupted / "metrics.csv")


def test_resume_from_a_path_refuses_to_write_into_another_run(image_root, uninterrupted, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("someone else's run")
    with pytest.raises(ResumeError, match="already holds another run"):
        train(load_config(None, tiny_overrides(image_root, other, **RUN)),
              resume=str(uninterrupted / "checkpoints" / "step_00000008.pth"))


def deferred_reads(monkeypatch) -> None:
    """train() on a CPU runtime that reads each step's report a step later, as CUDA does."""
    import mambaout.trainer as trainer
    from mambaout.runtime import TorchRuntime

    real = trainer.runtime_from_config

    def deferring(cfg):
        runtime = real(cfg)
        assert isinstance(runtime, TorchRuntime)
        runtime.defer_reads = True
        return runtime
    monkeypatch.setattr(trainer, "runtime_from_config", deferring)


SKIP_RUN = {**RUN, "data.num_workers": 0, "train.max_steps": 6, "train.checkpoint_every_steps": 1,
            "train.keep_checkpoints": 10, "train.skip_nonfinite": True, "train.ema": True}


@pytest.mark.parametrize("defer", [False, True], ids=["read-now", "read-a-step-later"])
def test_a_skipped_step_leaves_weights_optimizer_and_ema_exactly_as_they_were(image_root, tmp_path, monkeypatch,
                                                                            defer):
    """The non-finite step 4 is skipped on the device (fused AdamW's found_inf, the EMA's weight 0): its
    checkpoint equals step 3's in every tensor, Adam's step counts included; the steps around it train."""
    if defer:
        deferred_reads(monkeypatch)
    inject_nan(monkeypatch, at=7, until=8)  # the two micro-batches of optimizer step 4
    out = tmp_path / "run"
    outcome = train(load_config(None, tiny_overrides(image_root, out, **SKIP_RUN)))
    assert outcome.step == 6
    saved = {step: load_training_checkpoint(out / "checkpoints" / f"step_{step:08d}.pth") for step in (2, 3, 4, 5)}
    assert saved[4]["train_state"]["nonfinite_skips"] == 1 and saved[3]["train_state"]["nonfinite_skips"] == 0

    def tensors(payload):
        state = payload["optimizer"]["state"]
        return ([*payload["model"].values()], [*payload["state_dict_ema"].values()],
                [value for key in sorted(state) for value in state[key].values()])
    for before, after in zip(tensors(saved[3]), tensors(saved[4])):
        assert len(before) == len(after) > 0 and all(torch.equal(a, b) for a, b in zip(before, after))
    for step in (3, 5):  # the neighbours moved the weights and the EMA
        for before, after in zip(tensors(saved[step - 1]), tensors(saved[step])):
            assert not all(torch.equal(a, b) for a, b in zip(before, after))


def test_reading_a_step_later_changes_nothing_and_still_stops_at_the_failing_step(image_root, tmp_path, monkeypatch):
    """CUDA's deferred host reads, run on CPU: the same weights and log rows as reading at once, and a NaN stops
    the run naming its own step, with no checkpoint written after it."""
    overrides = {**RUN, "data.num_workers": 0, "train.max_steps": 6}
    now = train(load_config(None, tiny_overrides(image_root, tmp_path / "now", **overrides)))
    deferred_reads(monkeypatch)
    later = train(load_config(None, tiny_overrides(image_root, tmp_path / "later", **overrides)))
    assert now.step == later.step == 6 and now.final_eval == later.final_eval
    a, b = (load_training_checkpoint(tmp_path / name / "last.pth") for name in ("now", "later"))
    assert all(torch.equal(x, y) for x, y in zip(a["model"].values(), b["model"].values()))
    assert a["train_state"] == b["train_state"]
    rows = [[row.split(",")[:5] for row in (tmp_path / name / "steps.csv").read_text().splitlines()]
            for name in ("now", "later")]
    assert rows[0] == rows[1] and len(rows[0]) == 7  # header + 6 steps, img/s aside

    inject_nan(monkeypatch, at=9)  # optimizer step 5
    with pytest.raises(NonFiniteLossError, match=r"step 5: micro-batch losses \[nan, nan\]"):
        train(load_config(None, tiny_overrides(image_root, tmp_path / "nan", **overrides)))
    assert load_training_checkpoint(tmp_path / "nan" / "last.pth")["train_state"]["step"] == 4
