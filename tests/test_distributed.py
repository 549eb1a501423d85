"""torchrun on CPU (gloo): the same run whatever the process count, exact distributed evaluation, clear failures.

Every case starts real torchrun jobs as subprocesses, the way a user does; each start costs seconds on 2 cores,
so the model is femto at 32 px and the three training runs of the invariance check are shared by a
module-scoped fixture. The README's one-node command (scripts/launch_gpu.sh) runs the 2-process job.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

import pytest
import torch

import faults
import tpu_standin
from conftest import CLASSES, tiny_overrides
from faults import Fault
from helpers import (
    REPO, START_TIMEOUT_S, TORCHRUN, Job, assert_identical, free_port, read_csv, run_job, torchrun, train_command,
    wait_until)
from mambaout.checkpoint import load_training_checkpoint

LAUNCH = ["bash", str(REPO / "scripts" / "launch_gpu.sh")]

# Global batch 16 = micro batch 4 x processes x accumulation steps; 48 training images: 3 steps per epoch.
# lr 5e-4 from the first step moves the weights by ~1e-3 in 6 steps: a micro-batch that is lost, doubled or
# differently augmented, mixed or dropped on some process count would show far above the 1e-5 tolerance.
INVARIANCE = {"optim.global_batch_size": 16, "train.micro_batch_size": 4, "train.max_steps": 6,
              "sched.epochs": 2, "sched.warmup_epochs": 0, "optim.lr": 5e-4,
              "aug.mixup_alpha": 0.8, "aug.cutmix_alpha": 1.0, "model.drop_path_rate": 0.1}
ACCUMULATION = {1: 4, 2: 2, 4: 1}
README_CONFIG = ["--config", "configs/mambaout_small.yaml"]  # the README's commands, shrunk by the overrides


def torchrun_train(nproc: int, overrides: list[str], log: Path, **env: str) -> tuple[int, str]:
    return run_job(torchrun(nproc, "train.py", *overrides), log, **env)


def wait_for_steps(path: Path, steps: int, jobs: list[Job], timeout: float = START_TIMEOUT_S) -> None:
    wait_until(lambda: path.exists() and len(read_csv(path)) >= steps, f"{steps} steps in {path}", tuple(jobs),
               timeout)


# --- the same run on 1, 2 and 4 processes ------------------------------------------------------------------------

PIPELINES = {"timm": {"data.pipeline": "timm"},
             # the GPUs' default path, on the CPU: augmentation batched in the main process, by op groups
             "tensor": {"data.pipeline": "tensor", "data.augment_on": "device"}}
# 4 processes (no accumulation left) are the loop's case, shown once; a pipeline's draws are keyed per sample, and
# 2 processes show that its run does not depend on the split.
PROCESS_COUNTS = {"timm": (1, 2, 4), "tensor": (1, 2)}


@pytest.fixture(scope="module")
def runs(image_root, tmp_path_factory):
    """``runs(pipeline)``: the run folders of one training run on 1 process (`python train.py`), 2 (the README's
    launch script) and, for timm's pipeline, 4 (torchrun); made on first use."""
    made: dict[str, dict[int, Path]] = {}

    def get(pipeline: str) -> dict[int, Path]:
        if pipeline in made:
            return made[pipeline]
        base = tmp_path_factory.mktemp(f"dist-{pipeline}")
        folders = {}
        for nproc in PROCESS_COUNTS[pipeline]:
            out = base / f"p{nproc}"
            overrides = [*README_CONFIG, *tiny_overrides(image_root, out, **INVARIANCE, **PIPELINES[pipeline])]
            if nproc == 2:  # the README's one-node command, as written, on CPU
                status, output = run_job([*LAUNCH, "--nproc_per_node", "2", *overrides], base / "p2.log")
                assert "--nproc_per_node=2 --standalone train.py --config configs/mambaout_small.yaml" in output, \
                    output[-3000:]
            else:
                status, output = run_job(train_command(nproc, overrides), base / f"p{nproc}.log")
            assert status == 0, output[-4000:]
            announced = rf"global batch 16 = micro batch 4 x {nproc} \w+ x {ACCUMULATION[nproc]} accumulation steps"
            assert len(re.findall(announced, output)) == 1, output[-3000:]  # printed at start, by rank 0 alone
            assert output.count("epoch 1 step 6") == 1, output[-3000:]
            folders[nproc] = out
        made[pipeline] = folders
        return folders

    return get


def max_weight_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_processes_record_their_split(runs, pipeline):
    for nproc, out in runs(pipeline).items():
        manifest = json.loads((out / "manifest.json").read_text())
        derived = manifest["derived"]
        assert (derived["micro_batch_size"], derived["num_shards"], derived["accum_steps"]) == (
            4, nproc, ACCUMULATION[nproc])
        runtime = manifest["runtime"]
        assert runtime["world_size"] == nproc and runtime["device"] == "cpu"
        assert runtime["backend"] == ("gloo" if nproc > 1 else None)  # one process needs no process group
        assert runtime["nodes"] == 1 and runtime["processes_per_node"] == nproc
        assert (out / "tensorboard").is_dir() and (out / "last.pth").is_file()


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_same_weights_and_losses_on_1_2_4_processes(runs, pipeline):
    folders = runs(pipeline)
    reference_steps = read_csv(folders[1] / "steps.csv")
    reference = load_training_checkpoint(folders[1] / "last.pth")
    assert [int(r["step"]) for r in reference_steps] == [1, 2, 3, 4, 5, 6]
    report = []
    for nproc in PROCESS_COUNTS[pipeline][1:]:
        steps = read_csv(folders[nproc] / "steps.csv")
        assert [int(r["step"]) for r in steps] == [1, 2, 3, 4, 5, 6]
        loss_error = max(abs(float(a["loss"]) - float(b["loss"])) / abs(float(a["loss"]))
                         for a, b in zip(reference_steps, steps))
        norm_error = max(abs(float(a["grad_norm"]) - float(b["grad_norm"])) / float(a["grad_norm"])
                         for a, b in zip(reference_steps, steps))
        assert [r["lr"] for r in steps] == [r["lr"] for r in reference_steps]
        state = load_training_checkpoint(folders[nproc] / "last.pth")
        assert state["train_state"]["step"] == reference["train_state"]["step"] == 6
        weight_error = max_weight_difference(reference["model"], state["model"])
        report.append(f"{nproc} processes vs 1: weights {weight_error:.3g} max abs, losses {loss_error:.3g} "
                      f"max rel, grad norms {norm_error:.3g} max rel")
        assert weight_error < 1e-5, report[-1]
        assert loss_error < 1e-5, report[-1]
        assert norm_error < 1e-4, report[-1]
        assert all(math.isfinite(float(r["loss"])) for r in steps)
    print("\n" + "\n".join(report))


def test_the_tpu_runtime_trains_the_same_run_on_1_and_2_processes(runs, image_root, tmp_path):
    """runtime.device=tpu with TorchTPU's device calls answered on the CPU (tests/tpu_standin.py): the tpu runtime's
    own path (its process group, deferred reads, fused-eager setting, its optimizer step) trains the run of the cpu
    runtime bit for bit, on 1 and 2 processes. No TPU ran: the device is the CPU."""
    folders = runs("timm")
    for nproc in (1, 2):
        out = tmp_path / f"tpu{nproc}"
        overrides = [*README_CONFIG, *tiny_overrides(image_root, out, **INVARIANCE, **PIPELINES["timm"],
                                                     **{"runtime.device": "tpu"})]
        status, output = run_job(train_command(nproc, overrides), tmp_path / f"tpu{nproc}.log", **tpu_standin.env())
        assert status == 0, output[-4000:]
        runtime = json.loads((out / "manifest.json").read_text())["runtime"]
        assert (runtime["device"], runtime["device_name"], runtime["world_size"]) == (
            "tpu", "cpu (TorchTPU stand-in)", nproc)
        assert runtime["backend"] == ("gloo" if nproc > 1 else None)
        assert runtime["eager_mode"] == "DEFER_AND_FUSE" and runtime["tpu_precision"] == "HIGHEST"
        assert [r["loss"] for r in read_csv(out / "steps.csv")] == [
            r["loss"] for r in read_csv(folders[nproc] / "steps.csv")]
        state, reference = load_training_checkpoint(out / "last.pth"), load_training_checkpoint(folders[nproc] /
                                                                                                "last.pth")
        assert max_weight_difference(reference["model"], state["model"]) == 0


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_evaluation_during_training_counts_every_image_once(runs, pipeline):
    """The odd-sized validation set (21 images) gives the same top-1 on 1, 2 and 4 processes."""
    folders = runs(pipeline)
    reference = read_csv(folders[1] / "metrics.csv")
    assert [int(r["step"]) for r in reference] == [3, 6]
    for nproc in PROCESS_COUNTS[pipeline][1:]:
        rows = read_csv(folders[nproc] / "metrics.csv")
        assert [(r["top1"], r["top5"]) for r in rows] == [(r["top1"], r["top5"]) for r in reference]
        for a, b in zip(rows, reference):
            assert float(a["eval_loss"]) == pytest.approx(float(b["eval_loss"]), rel=1e-5)


def test_validation_on_3_processes_equals_single_process(runs, tmp_path):
    """The same weights evaluated by 3 processes (7 images each): exactly the single-process run's top-1.
    (2 and 4 processes: the evaluation during training above.)"""
    nproc = 3
    run = runs("timm")[1]
    final = read_csv(run / "metrics.csv")[-1]
    results = tmp_path / "results.json"
    command = [*TORCHRUN, "--nproc_per_node", str(nproc), "--master_port", str(free_port()), "validate.py",
               "--config", str(run / "config.yaml"), "--checkpoint", str(run / "last.pth"), "--results",
               str(results), "--device", "cpu", "--workers", "0"]
    status, output = run_job(command, tmp_path / "validate.log")
    assert status == 0, output[-4000:]
    result = json.loads(results.read_text())
    assert result["count"] == 21
    assert result["top1"] == float(final["top1"]) and result["top5"] == float(final["top5"])
    assert result["loss"] == pytest.approx(float(final["eval_loss"]), rel=1e-6)


# --- clear failures ----------------------------------------------------------------------------------------------

def test_global_batch_that_does_not_split_fails_with_the_valid_choices(image_root, tmp_path):
    out = tmp_path / "run"
    status, output = torchrun_train(2, tiny_overrides(image_root, out, **{
        "optim.global_batch_size": 16, "train.micro_batch_size": 3}), tmp_path / "job.log")
    assert status != 0
    assert re.search(r"exitcode\s*:\s*2\b", output), output[-3000:]  # train.py's status for bad input
    assert "train.py: error: optim.global_batch_size=16 does not split into train.micro_batch_size=3" in output
    assert "valid train.micro_batch_size for 2 shards: 1, 2, 4, 8" in output
    assert not (out / "steps.csv").exists()


def test_rendezvous_failure_names_the_address_and_rank(image_root, tmp_path):
    port = free_port()  # nobody listens there
    command = [sys.executable, "train.py", *tiny_overrides(image_root, tmp_path / "run"),
               "runtime.dist_timeout_s=2"]
    status, output = run_job(command, tmp_path / "worker.log", timeout=120, RANK="1", WORLD_SIZE="2",
                             LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    assert status == 2, output[-3000:]
    assert re.search(rf"train\.py: error: rank 1/2 .*could not join the gloo process group at 127\.0\.0\.1:{port} "
                     r"within runtime\.dist_timeout_s=2s", output), output[-3000:]


def test_missing_node_fails_the_rendezvous_in_bounded_time(tmp_path):
    """--nnodes 2 but only node 0 starts: torchrun gives up after the rendezvous timeout, and the launcher has
    said where it waited."""
    port = free_port()
    start = time.monotonic()
    status, output = run_job([*LAUNCH, "--nproc_per_node", "1", "--nnodes", "2", "--node_rank", "0",
                              "--rdzv-endpoint", f"127.0.0.1:{port}"], tmp_path / "node0.log",
                             timeout=120, RDZV_TIMEOUT="3")
    assert status != 0
    assert time.monotonic() - start < 90
    assert f"node 0 of 2, rendezvous at 127.0.0.1:{port}" in output
    assert re.search(r"[Tt]imed out.*1/2 clients joined", output), output[-3000:]


def start_two_nodes(image_root, tmp_path, **overrides) -> tuple[list[Job], Path]:
    """A 2-node job on this host (one process per node), started with the README's multi-node commands."""
    out = tmp_path / "run"
    settings = {"train.max_steps": 100000, "sched.epochs": 10000, "eval.every_epochs": 10000,
                "aug.mixup_alpha": 0, "aug.cutmix_alpha": 0, **overrides}
    train_args = tiny_overrides(image_root, out, **settings)
    endpoint = f"127.0.0.1:{free_port()}"
    jobs = [Job([*LAUNCH, "--nproc_per_node", "1", "--nnodes", "2", "--node_rank", str(node), "--rdzv-endpoint",
                 endpoint, *train_args], tmp_path / f"node{node}.log", RDZV_TIMEOUT="120") for node in (0, 1)]
    return jobs, out


def test_a_rank_that_dies_stops_every_node(image_root, tmp_path):
    """SIGKILL the rank-1 worker mid-run: its node reports the signal, and rank 0 on the other node stops on the
    broken collective with a message naming itself instead of waiting for the lost rank."""
    jobs, out = start_two_nodes(image_root, tmp_path)
    try:
        wait_for_steps(out / "steps.csv", 2, jobs)
        os.kill(jobs[1].worker(rank=1), signal.SIGKILL)
        killed = time.monotonic()
        statuses = [job.wait(timeout=90) for job in jobs]
        elapsed = time.monotonic() - killed
        node0, node1 = jobs[0].output, jobs[1].output
    finally:
        for job in jobs:
            job.close()
    assert statuses[0] != 0 and statuses[1] != 0
    assert elapsed < 60, f"the job took {elapsed:.0f} s to stop"
    assert re.search(r"rank 0/2 .*: a gloo collective failed \(another rank stopped", node0), node0[-3000:]
    assert "Signal 9 (SIGKILL)" in node1 or re.search(r"exitcode\s*:\s*-9", node1), node1[-3000:]


def test_a_rank_that_hangs_times_out(image_root, tmp_path):
    """SIGSTOP the rank-1 worker: rank 0 gives up after runtime.dist_timeout_s, saying so."""
    jobs, out = start_two_nodes(image_root, tmp_path, **{"runtime.dist_timeout_s": 15})
    try:
        wait_for_steps(out / "steps.csv", 2, jobs)
        worker = jobs[1].worker(rank=1)
        os.kill(worker, signal.SIGSTOP)
        stopped = time.monotonic()
        status = jobs[0].wait(timeout=120)
        elapsed = time.monotonic() - stopped
        node0 = jobs[0].output
        os.kill(worker, signal.SIGKILL)
        jobs[1].wait(timeout=60)
    finally:
        for job in jobs:
            job.close()
    assert status != 0
    assert 10 < elapsed < 75, f"rank 0 stopped {elapsed:.0f} s after rank 1 hung"
    assert re.search(r"rank 0/2 .*: a gloo collective failed \(no answer within runtime\.dist_timeout_s=15s",
                     node0), node0[-3000:]


def test_slurm_script_starts_one_torchrun_per_node(tmp_path):
    """scripts/slurm_train.sbatch with stand-ins for srun/scontrol: node ranks follow SLURM_NODEID and every
    node meets at the first node of the job."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/usr/bin/env bash\nprintf 'gpu-a\\ngpu-b\\n'\n")
    (bin_dir / "srun").write_text(  # one task per node, in node order; srun's own options are skipped
        "#!/usr/bin/env bash\nwhile [[ $1 == --* ]]; do shift; done\n"
        "for node in $(seq 0 $((SLURM_NNODES - 1))); do SLURM_NODEID=$node \"$@\" || exit $?; done\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu-[a-b]", "SLURM_NNODES": "2",
           "SLURM_SUBMIT_DIR": str(REPO), "SLURM_GPUS_ON_NODE": "8", "DRY_RUN": "1"}
    status, output = run_job(["bash", str(REPO / "scripts" / "slurm_train.sbatch"), "--config",
                              "configs/mambaout_small.yaml", "data.root=/data/imagenet"], tmp_path / "sbatch.log",
                             timeout=60, **env)
    assert status == 0, output
    for node in (0, 1):
        assert (f"--nproc_per_node=8 --nnodes=2 --node_rank={node} --rdzv-backend=static "
                "--rdzv-endpoint=gpu-a:29500") in output, output
    assert output.count("train.py --config configs/mambaout_small.yaml data.root=/data/imagenet") == 2


COLLECTIVES = '''
import json, sys
from pathlib import Path
import torch
from mambaout.runtime import DistributedRuntimeError, create_runtime

runtime = create_runtime("cpu", timeout_s=60)
out = {}
with runtime.session():
    out["sum"] = runtime.sum_across(torch.tensor([runtime.rank + 1.0])).tolist()
    out["any"] = runtime.any_across([runtime.rank == 1, False])
    out["gather"] = runtime.gather_objects(runtime.rank * 10)
    runtime.assert_same("the seed", 42)
    try:
        runtime.assert_same("the resumed step", 100 if runtime.rank == 0 else 0)
    except DistributedRuntimeError as error:
        out["disagree"] = str(error)
    out["describe"] = runtime.describe()
Path(f"{sys.argv[1]}.{runtime.rank}.json").write_text(json.dumps(out))
'''


def test_runtime_collectives_on_two_processes(tmp_path):
    script = tmp_path / "collectives.py"
    script.write_text(COLLECTIVES)
    command = [*TORCHRUN, "--nproc_per_node", "2", "--master_port", str(free_port()), str(script),
               str(tmp_path / "out")]
    status, output = run_job(command, tmp_path / "job.log", timeout=120, PYTHONPATH=str(REPO))
    assert status == 0, output[-3000:]
    for rank in (0, 1):
        out = json.loads((tmp_path / f"out.{rank}.json").read_text())
        assert out["sum"] == [3.0] and out["any"] == [True, False] and out["gather"] == [0, 10]
        assert out["disagree"].startswith("the processes disagree on the resumed step (rank 0: 100; rank 1: 0)")
        described = out["describe"]
        assert described["world_size"] == 2 and described["backend"] == "gloo"
        assert described["processes_per_node"] == 2 and described["hosts"] == [socket.gethostname()]


def test_a_single_process_needs_no_process_group():
    """A world of one needs no process group: the runtime describes itself without torch.distributed."""
    from mambaout.runtime import create_runtime

    runtime = create_runtime("cpu")
    with runtime.session():
        info = runtime.describe()
    assert info["world_size"] == 1 and info["backend"] is None and info["nodes"] == 1
    assert not torch.distributed.is_initialized()


COUNTED_TRAINING = '''
import json, os, sys
from pathlib import Path
import torch.distributed as dist
import mambaout.trainer as trainer
from mambaout.config import load_config

calls = []
all_reduce = dist.all_reduce
dist.all_reduce = lambda *args, **kwargs: (calls.append(1), all_reduce(*args, **kwargs))[1]
train_one_epoch, counted = trainer.train_one_epoch, []

def epoch(*args, **kwargs):
    state, before, calls_before = args[7], args[7].step, len(calls)
    result = train_one_epoch(*args, **kwargs)
    counted.append({"steps": state.step - before, "all_reduces": len(calls) - calls_before})
    return result

trainer.train_one_epoch = epoch
trainer.train(load_config(None, sys.argv[2:]))
Path(f"{sys.argv[1]}.{os.environ['RANK']}.json").write_text(json.dumps(counted))
'''


def test_one_small_all_reduce_per_optimizer_step(image_root, tmp_path):
    """Per optimizer step the loop runs one all-reduce of its own (the flags, the loss and the unreadable-image
    count together) besides DDP's gradient buckets (which do not go through torch.distributed.all_reduce)."""
    script = tmp_path / "counted.py"
    script.write_text(COUNTED_TRAINING)
    overrides = tiny_overrides(image_root, tmp_path / "run", **{"train.max_steps": 4, "train.micro_batch_size": 2})
    command = [*TORCHRUN, "--nproc_per_node", "2", "--master_port", str(free_port()), str(script),
               str(tmp_path / "counts"), *overrides]
    status, output = run_job(command, tmp_path / "job.log", PYTHONPATH=str(REPO))
    assert status == 0, output[-3000:]
    for rank in (0, 1):
        epochs = json.loads((tmp_path / f"counts.{rank}.json").read_text())
        assert sum(e["steps"] for e in epochs) == 4
        assert all(e["all_reduces"] == e["steps"] for e in epochs), epochs


# --- a fault on one rank -----------------------------------------------------------------------------------------

# rank 1's loss alone reads NaN (its gradients are finite: the gradient all-reduce does not spread it)
NAN_ON_RANK_1 = {"kind": "nan-loss-value", "accum_steps": 1, "rank": 1}
UNREADABLE = [f"{CLASSES[0]}_{i:03d}.png" for i in range(0, 12, 2)]  # 6 of the 48 training images


@pytest.fixture(scope="module")
def rank1_fault(image_root, tmp_path_factory) -> Path:
    """The run folder of one epoch (6 steps) on 2 processes, a checkpoint every step, train.skip_nonfinite=true, a
    NaN loss on rank 1 alone at step 3, and the ``UNREADABLE`` images corrupt."""
    base = tmp_path_factory.mktemp("rank1-fault")
    root = base / "data"
    shutil.copytree(image_root, root)
    for name in UNREADABLE:
        (root / "train" / CLASSES[0] / name).write_bytes(b"not an image")
    out = base / "run"
    overrides = tiny_overrides(root, out, **{"train.max_steps": 6, "train.checkpoint_every_steps": 1,
                                             "train.keep_checkpoints": 10, "train.skip_nonfinite": True})
    status, output = torchrun_train(2, overrides, base / "job.log", **faults.env(Fault(steps=(3,), **NAN_ON_RANK_1)))
    assert status == 0, output[-4000:]
    return out


def differs(a: dict, b: dict) -> bool:
    return any(not torch.equal(a[key], b[key]) for key in a)


def test_a_nonfinite_loss_on_one_rank_is_skipped_by_every_rank(rank1_fault):
    """Rank 0's loss and gradients are finite at step 3, yet it skips the step with rank 1: rank 0's checkpoint of
    step 3 equals step 2's in every tensor (weights, Adam's moments and step counts), the skip is counted once (in
    metrics.csv too, whose epoch loss is the mean of the steps taken), and steps 2 and 4 train."""
    saved = {step: load_training_checkpoint(rank1_fault / "checkpoints" / f"step_{step:08d}.pth")
             for step in (1, 2, 3, 4)}
    assert [saved[step]["train_state"]["nonfinite_skips"] for step in (2, 3, 4)] == [0, 1, 1]
    assert_identical(saved[2]["model"], saved[3]["model"], "model")
    assert_identical(saved[2]["optimizer"], saved[3]["optimizer"], "optimizer")
    assert differs(saved[1]["model"], saved[2]["model"]) and differs(saved[3]["model"], saved[4]["model"])
    [epoch] = read_csv(rank1_fault / "metrics.csv")
    assert epoch["nonfinite_skips"] == "1" and math.isfinite(float(epoch["train_loss"]))


def test_unreadable_training_images_are_counted_over_every_process(rank1_fault, image_root):
    """The 6 unreadable images are shared out between the 2 processes by the epoch's keyed order (each reads some):
    metrics.csv's bad_images and the checkpoint count all 6."""
    from mambaout.data import MicroBatchSampler
    from mambaout.data import scan_split

    samples, _ = scan_split(image_root, "train")
    for rank in (0, 1):
        sampler = MicroBatchSampler(len(samples), 8, 4, 2, [rank], seed=42)
        sampler.set_epoch(0)
        read = {Path(samples[index][0]).name for batch in sampler for index, _ in batch}
        assert read & set(UNREADABLE), f"rank {rank} reads none of the unreadable images"
    assert [row["bad_images"] for row in read_csv(rank1_fault / "metrics.csv")] == [str(len(UNREADABLE))]
    assert load_training_checkpoint(rank1_fault / "last.pth")["train_state"]["bad_images"] == len(UNREADABLE)


def test_a_nonfinite_loss_on_one_rank_stops_every_rank_at_that_step(image_root, tmp_path):
    """train.skip_nonfinite=false and rank 1's loss alone NaN at step 2: both ranks stop there, each with status 3
    and the error naming step 2, and nothing is checkpointed after step 1."""
    out = tmp_path / "run"
    overrides = tiny_overrides(image_root, out, **{"train.max_steps": 3, "train.checkpoint_every_steps": 1})
    # torchrun looks at its workers every 2 s (not 0.1): the rank that ends first does not have the other
    # stopped before it has exited on its own
    command = [*TORCHRUN, "--monitor-interval", "2", "--nproc_per_node", "2", "--master_port", str(free_port()),
               "train.py", *overrides]
    exit_log = tmp_path / "exit.log"
    status, output = run_job(command, tmp_path / "job.log",
                             **faults.env(Fault(steps=(2,), **NAN_ON_RANK_1), exit_log=exit_log))
    assert status != 0
    assert output.count("train.py: error: non-finite training values at optimizer step 2: ") == 2, output[-4000:]
    assert faults.exit_statuses(exit_log) == [{0: 3, 1: 3}], output[-4000:]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000001.pth"]
