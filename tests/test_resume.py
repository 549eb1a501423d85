"""Crash-proof training: a killed or preempted job, rerun with the same command, resumes at its newest checkpoint
and is the same run; a NaN or an infinite gradient never reaches the weights; a disk that refuses a write or a
kill during one leaves the previous checkpoint."""
from __future__ import annotations

import math
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import faults
from conftest import tiny_overrides
from faults import Fault
from helpers import (
    REPO, TORCHRUN, Job, assert_identical, read_csv, run_job, train_command, wait_until, without_timing)
from mambaout.checkpoint import CheckpointFolder, load_training_checkpoint
from mambaout.config import load_config
from mambaout.engine import NonFiniteLossError
from mambaout.tracking import RunFolderError
from mambaout.trainer import NONFINITE_EXIT_CODE, PREEMPTED_EXIT_CODE, ResumeError, train

# Mixup/CutMix, drop path and random erasing are on (the schema's recipe defaults), EMA too, 2 data workers. 48
# images, global batch 8 in micro-batches of 4: 6 optimizer steps an epoch (evaluated and checkpointed at its end),
# a checkpoint every 2 steps, 8 steps in all.
RUN = {"train.max_steps": 8, "data.num_workers": 2, "train.checkpoint_every_steps": 2,
       "aug.random_erase_prob": 0.5, "train.ema": True}
END = 8
# The jobs: one process with timm's pipeline, started as `python train.py`; two processes under torchrun with the
# tensor pipeline augmenting on the device (the GPUs' default path, run on the CPU).
JOBS = {"python": (1, {}), "torchrun": (2, {"data.pipeline": "tensor", "data.augment_on": "device"})}


def command(image_root: Path, out: Path, kind: str, **extra) -> list[str]:
    nproc, settings = JOBS[kind]
    return train_command(nproc, tiny_overrides(image_root, out, **{**RUN, **settings, **extra}))


@pytest.fixture(scope="module")
def uninterrupted(image_root, tmp_path_factory):
    """``uninterrupted(kind)``: the run folder of that kind of job run to its end at once (made on first use)."""
    folders: dict[str, Path] = {}

    def get(kind: str = "python") -> Path:
        if kind not in folders:
            out = tmp_path_factory.mktemp("uninterrupted") / kind
            status, output = run_job(command(image_root, out, kind), out.parent / f"{kind}.log")
            assert status == 0, output[-4000:]
            folders[kind] = out
        return folders[kind]

    return get


def assert_same_run(reference: Path, out: Path) -> None:
    """The same final checkpoint in every tensor and number (weights, Adam's moments and step counts, EMA, the loss
    record, best top-1; its config aside: another output_dir), and the same log rows, timings aside."""
    a, b = (load_training_checkpoint(folder / "last.pth") for folder in (reference, out))
    assert a["train_state"]["step"] == END
    assert_identical({k: v for k, v in a.items() if k != "config"}, {k: v for k, v in b.items() if k != "config"})
    for log in ("steps.csv", "metrics.csv"):
        assert without_timing(reference / log) == without_timing(out / log), log


def resumed_at(output: str, out: Path) -> int:
    """The step of the rerun's `resuming OUT at optimizer step N` line (there must be one)."""
    found = re.findall(rf"resuming {re.escape(str(out))} at optimizer step (\d+)", output)
    assert len(found) == 1, output[-4000:]
    return int(found[0])


def logged_steps(out: Path) -> int:
    path = out / "steps.csv"
    return len(read_csv(path)) if path.exists() else 0


def checkpoints(out: Path) -> dict[int, dict]:
    """The run's step checkpoints by step (each written whole or not at all)."""
    return {int(p.stem.split("_")[1]): load_training_checkpoint(p) for p in (out / "checkpoints").glob("step_*.pth")}


# --- kills and preemption ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", JOBS)
def test_a_killed_job_resumes_at_its_newest_checkpoint_bit_identically(image_root, uninterrupted, tmp_path, kind):
    """SIGKILL to every process of the job at once (torchrun, its workers and their data workers, found by walking
    the process tree) after step 4's checkpoint: the same command resumes at the newest saved step N, 4 <= N < 8,
    and ends with the uninterrupted run's checkpoint and log rows, bit for bit."""
    reference = uninterrupted(kind)
    out = tmp_path / "run"
    job = Job(command(image_root, out, kind), tmp_path / "killed.log")
    try:
        wait_until((out / "checkpoints" / "step_00000004.pth").exists, "step 4's checkpoint", (job,))
        workers = [job.worker(rank) for rank in range(JOBS[kind][0])] if kind == "torchrun" else []
        assert set(workers) <= set(job.kill())
    finally:
        job.close()
    assert job.proc.returncode == -signal.SIGKILL  # killed, not finished
    newest = max(checkpoints(out))
    assert 4 <= newest < END

    status, output = run_job(command(image_root, out, kind), tmp_path / "resumed.log")
    assert status == 0, output[-4000:]
    assert resumed_at(output, out) == newest
    assert_same_run(reference, out)


def test_sigterm_checkpoints_the_next_step_exits_75_and_the_rerun_resumes_there(image_root, uninterrupted, tmp_path):
    """SIGTERM to the job's process group mid-epoch, no periodic checkpoint due: train.py checkpoints at the next
    step boundary and exits with status 75; the same command resumes at that step and ends as the uninterrupted
    run."""
    out = tmp_path / "run"
    no_periodic = {"train.checkpoint_every_steps": None}
    job = Job(command(image_root, out, "python", **no_periodic), tmp_path / "preempted.log")
    try:
        wait_until(lambda: logged_steps(out) >= 1, "the first step", (job,))
        os.killpg(job.proc.pid, signal.SIGTERM)
        assert job.wait() == PREEMPTED_EXIT_CODE, job.output[-4000:]
    finally:
        job.close()
    saved = load_training_checkpoint(out / "last.pth")["train_state"]["step"]
    assert 0 < saved < 6  # inside the first epoch

    status, output = run_job(command(image_root, out, "python", **no_periodic), tmp_path / "resumed.log")
    assert status == 0, output[-4000:]
    assert resumed_at(output, out) == saved
    assert_same_run(uninterrupted("python"), out)


def test_train_until_done_relaunches_a_preempted_torchrun_job_to_the_end(image_root, uninterrupted, tmp_path):
    """scripts/train_until_done.sh around torchrun, SIGTERM to the rank-1 worker alone: rank 0, never signalled,
    stops at the same step and checkpoints it, both exit with status 75 (torchrun itself reports 1: the script sees
    the run's marker file), and the script relaunches the command once; the relaunch resumes at that step, both
    ranks exit with status 0 and the run ends as the uninterrupted one, bit for bit."""
    reference = uninterrupted("torchrun")
    out = tmp_path / "run"
    nproc, settings = JOBS["torchrun"]
    overrides = tiny_overrides(image_root, out, **{**RUN, **settings, "train.checkpoint_every_steps": None})
    # --standalone: each launch finds a free port; torchrun looks at its workers every 2 s (not 0.1): a worker
    # that ends first does not have the other stopped before it has exited on its own
    launch = [*TORCHRUN, "--standalone", "--monitor-interval", "2", "--nproc_per_node", str(nproc), "train.py"]
    exit_log = tmp_path / "exit.log"
    job = Job(["bash", str(REPO / "scripts" / "train_until_done.sh"), *launch, *overrides], tmp_path / "job.log",
              **faults.env(exit_log=exit_log))
    try:
        wait_until(lambda: logged_steps(out) >= 1, "the first step", (job,))
        os.kill(job.worker(1), signal.SIGTERM)
        assert job.wait() == 0, job.output[-6000:]
    finally:
        job.close()
    preempted, relaunched = job.output.split("train_until_done: preempted, restart 1: ")
    assert "restart 2" not in relaunched
    assert faults.exit_statuses(exit_log) == [{0: PREEMPTED_EXIT_CODE, 1: PREEMPTED_EXIT_CODE}, {0: 0, 1: 0}]
    saved = resumed_at(relaunched, out)
    assert f"preempted: checkpoint of step {saved} saved" in preempted and 0 < saved < END
    assert_same_run(reference, out)


# --- non-finite steps --------------------------------------------------------------------------------------------

EVERY_STEP = {**RUN, "data.num_workers": 0, "train.max_steps": 6, "train.checkpoint_every_steps": 1,
              "train.keep_checkpoints": 10}


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


def differs(a: dict, b: dict) -> bool:
    return any(not torch.equal(a[key], b[key]) for key in a)


@pytest.mark.parametrize("defer", [False, True], ids=["read-now", "read-a-step-later"])
def test_a_skipped_step_leaves_weights_optimizer_and_ema_exactly_as_they_were(image_root, tmp_path, monkeypatch,
                                                                            defer):
    """A NaN loss at step 4 with train.skip_nonfinite=true, a checkpoint every step: the step is skipped on the
    device (fused AdamW's found_inf, the EMA's weight 0), so step 4's checkpoint equals step 3's in every tensor
    (weights, Adam's moments and step counts, EMA); steps 3 and 5 train; metrics.csv counts the skip, and its
    epoch loss is the mean of the steps taken."""
    if defer:
        deferred_reads(monkeypatch)
    faults.inject(monkeypatch, Fault("nan-loss", steps=(4,), accum_steps=2))
    out = tmp_path / "run"
    outcome = train(load_config(None, tiny_overrides(image_root, out, **EVERY_STEP, **{"train.skip_nonfinite": True})))
    assert outcome.step == 6
    saved = checkpoints(out)
    assert [saved[step]["train_state"]["nonfinite_skips"] for step in (3, 4, 5)] == [0, 1, 1]
    for part in ("model", "optimizer", "state_dict_ema"):
        assert_identical(saved[3][part], saved[4][part], part)
    for step in (3, 5):  # the neighbours moved the weights and the EMA
        assert differs(saved[step - 1]["model"], saved[step]["model"])
        assert differs(saved[step - 1]["state_dict_ema"], saved[step]["state_dict_ema"])
    [epoch] = read_csv(out / "metrics.csv")  # steps 1-6
    assert epoch["nonfinite_skips"] == "1" and math.isfinite(float(epoch["train_loss"]))


def hold_what_train_builds(monkeypatch) -> dict:
    """The model, optimizer and EMA that train() builds, kept for the test to look at after it ends."""
    import mambaout.trainer as trainer

    held = {}

    def keeping(name, attribute):
        builder = getattr(trainer, attribute)

        def build(*args, **kwargs):
            held[name] = builder(*args, **kwargs)
            return held[name]
        monkeypatch.setattr(trainer, attribute, build)

    keeping("model", "create_model")
    keeping("optimizer", "create_optimizer")
    keeping("ema", "build_ema")
    return held


@pytest.mark.parametrize("kind", ["nan-loss", "inf-gradient"])
def test_a_nonfinite_step_stops_the_run_before_it_reaches_the_weights(image_root, tmp_path, monkeypatch, kind):
    """Step 5 poisoned (a NaN loss; an infinite gradient under a finite loss), a checkpoint every step: the run
    stops naming step 5, its micro-batch losses, the gradient norm and the last good checkpoint (step 4's); the
    weights, optimizer state and EMA that it holds when it stops are step 4's, bit for bit; nothing is written
    after step 4."""
    faults.inject(monkeypatch, Fault(kind, steps=(5,), accum_steps=2))
    held = hold_what_train_builds(monkeypatch)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError) as stopped:
        train(load_config(None, tiny_overrides(image_root, out, **{**EVERY_STEP, "train.max_steps": 8})))
    losses, norm = (r"\[nan, nan\]", "nan") if kind == "nan-loss" else (r"\[\d+\.\d+, \d+\.\d+\]", "inf")
    assert re.fullmatch(rf"non-finite training values at optimizer step 5: micro-batch losses {losses}, gradient "
                        rf"norm {norm}; .*\. Last good checkpoint: {re.escape(str(out / 'last.pth'))}",
                        str(stopped.value)), str(stopped.value)
    assert sorted(checkpoints(out)) == [1, 2, 3, 4]
    last = load_training_checkpoint(out / "last.pth")
    assert last["train_state"]["step"] == 4
    assert_identical(held["model"].state_dict(), last["model"], "model")
    assert_identical(held["optimizer"].state_dict(), last["optimizer"], "optimizer")
    assert_identical(held["ema"].module.state_dict(), last["state_dict_ema"], "EMA")


def test_an_overflowing_fp16_step_with_a_nonfinite_loss_leaves_weights_and_step_count():
    """The fp16 path's verdict (the loss scaler's found_inf joined with the agreed finite flag) on CPU's fused AdamW,
    with a CPU GradScaler standing in for CUDA's: gradients that overflow under a non-finite loss, the usual pair,
    leave the weights and the step count as they were. (The flags were summed to 2, and fused AdamW skips on
    exactly 1: the weights became NaN, the step count -1.)"""
    from mambaout.optim import create_optimizer
    from mambaout.runtime import create_runtime

    runtime = create_runtime("cpu")
    runtime.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    model = torch.nn.Linear(4, 2)
    optimizer = create_optimizer(model, 1e-3, 0.05, 1e-8, (0.9, 0.999))
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    runtime.backward(model(torch.full((1, 4), float("inf"))).sum())
    runtime.unscale_and_clip(optimizer, list(model.parameters()), None)
    applied = runtime.optimizer_step(optimizer, torch.tensor(False))
    assert not bool(applied)
    assert_identical(before, model.state_dict())
    assert [int(state["step"]) for state in optimizer.state.values()] == [0, 0]


def test_train_py_exits_3_naming_the_step_its_true_losses_and_the_last_good_checkpoint(image_root, uninterrupted,
                                                                                       tmp_path):
    """train.py with an infinite gradient under a finite loss at step 5: status 3 and an error naming step 5,
    its two micro-batch losses (their mean is the uninterrupted run's step-5 loss: the step's true losses), the
    infinite gradient norm and the last good checkpoint, step 4's."""
    out = tmp_path / "run"
    status, output = run_job(command(image_root, out, "python"), tmp_path / "job.log",
                             **faults.env(Fault("inf-gradient", steps=(5,), accum_steps=2)))
    assert status == NONFINITE_EXIT_CODE, output[-4000:]
    error = re.search(r"train\.py: error: non-finite training values at optimizer step 5: micro-batch losses "
                      r"\[(\S+), (\S+)\], gradient norm inf; .*\. Last good checkpoint: (\S+)\n", output)
    assert error, output[-4000:]
    true_loss = float(read_csv(uninterrupted("python") / "steps.csv")[4]["loss"])
    assert (float(error[1]) + float(error[2])) / 2 == pytest.approx(true_loss, abs=1e-6)
    assert error[3] == str(out / "last.pth") and load_training_checkpoint(error[3])["train_state"]["step"] == 4


def test_reading_a_step_later_changes_nothing_and_still_stops_at_the_failing_step(image_root, tmp_path, monkeypatch):
    """CUDA's deferred host reads, run on CPU: the same weights and log rows as reading at once, and a NaN stops
    the run naming its own step, with no checkpoint written after it."""
    overrides = {**RUN, "data.num_workers": 0, "train.max_steps": 6, "train.ema": False}
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

    faults.inject(monkeypatch, Fault("nan-loss", steps=(5,), accum_steps=2))
    with pytest.raises(NonFiniteLossError, match=r"step 5: micro-batch losses \[nan, nan\]"):
        train(load_config(None, tiny_overrides(image_root, tmp_path / "nan", **overrides)))
    assert load_training_checkpoint(tmp_path / "nan" / "last.pth")["train_state"]["step"] == 4


# --- writing checkpoints -----------------------------------------------------------------------------------------

def test_a_disk_that_refuses_a_checkpoint_stops_the_run_and_keeps_the_previous_one(image_root, tmp_path):
    """train.py continuing a run under a file-size limit below a checkpoint's size (RLIMIT_FSIZE, SIGXFSZ ignored:
    the kernel refuses the write as a full disk would): torch.save fails mid-write, the run stops with status 2 and
    a message that says the disk refused the write, the previous checkpoint (step 2's) is intact, and no temporary
    file is left."""
    out = tmp_path / "run"
    settings = {**RUN, "data.num_workers": 0}
    train(load_config(None, tiny_overrides(image_root, out, **{**settings, "train.max_steps": 2})))
    previous = (out / "last.pth").read_bytes()
    limit = len(previous) // 2

    def under_a_file_size_limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    job = Job(train_command(1, tiny_overrides(image_root, out, **{**settings, "train.max_steps": 4})),
              tmp_path / "job.log", preexec_fn=under_a_file_size_limit)
    try:
        status = job.wait()
    finally:
        job.close()
    assert status == 2, job.output[-4000:]
    target = out / "checkpoints" / "step_00000004.pth"
    refused = (rf"train\.py: error: could not write checkpoint {re.escape(str(target))}: the disk refused the write "
               r"\(File too large\)\. The previous checkpoint is intact")
    assert re.search(refused, job.output), job.output[-4000:]
    assert (out / "last.pth").read_bytes() == previous
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000002.pth"]
    assert [p.name for p in out.rglob("*tmp*")] == []


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


# --- what may change on a resume ---------------------------------------------------------------------------------

def test_resume_refuses_a_breaking_change_and_allows_a_harmless_one(image_root, uninterrupted, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(uninterrupted(), out, copy_function=os.link)  # every write to a run folder replaces files
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
    assert without_timing(out / "metrics.csv") == without_timing(uninterrupted() / "metrics.csv")


def test_resume_from_a_path_refuses_to_write_into_another_run(image_root, uninterrupted, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("someone else's run")
    with pytest.raises(ResumeError, match="already holds another run"):
        train(load_config(None, tiny_overrides(image_root, other, **RUN)),
              resume=str(uninterrupted() / "checkpoints" / "step_00000008.pth"))
