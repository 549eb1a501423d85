"""runtime.device=tpu on real TPU chips (TorchTPU): skipped without them. On a TPU VM, from the repository root:

    .venv/bin/python -m pytest -q -m tpu -s

(after `bash scripts/launch_tpu.sh --backend torchtpu --setup`). A few minutes: femto on 32 px images for the
comparisons, then mambaout_small's speed. It checks, and prints for the record:
- 6 optimizer steps on 1 chip and on every chip of the host (torchrun) against the same run on the CPU: losses
  within 1e-3 relative, and the weights' mean difference under 1% of their mean movement from the start;
- a run stopped after 4 steps and resumed to 6 ends with the uninterrupted run's weights bit for bit;
- mambaout_small in bf16 at 224 px, batch 128 per chip: img/s and MFU from steps.csv (no threshold: a figure).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_overrides
from helpers import REPO, read_csv, run_job, torchrun
from mambaout.checkpoint import load_training_checkpoint
from mambaout.config import load_config
from mambaout.models import create_model
from mambaout.runtime.torch_tpu import tpu_chip_count
from mambaout.data.sampling import derive_seed

CHIPS = tpu_chip_count()
pytestmark = [pytest.mark.tpu, pytest.mark.skipif(CHIPS == 0, reason="needs TPU chips and TorchTPU")]

# 48 images, global batch 16 in micro-batches of 2 (8 accumulation steps on one chip, 1 on eight): 3 steps an epoch
RUN = {"optim.global_batch_size": 16, "train.micro_batch_size": 2, "train.max_steps": 6, "sched.epochs": 2,
       "sched.warmup_epochs": 0, "optim.lr": 5e-4, "train.checkpoint_every_steps": 2, "data.num_workers": 2}
TIMEOUT_S = 900


def train(image_root: Path, out: Path, nproc: int = 1, **settings) -> Path:
    overrides = tiny_overrides(image_root, out, **{**RUN, **settings})
    command = [sys.executable, "train.py", *overrides] if nproc == 1 else torchrun(nproc, "train.py", *overrides)
    status, output = run_job(command, out.parent / f"{out.name}.log", timeout=TIMEOUT_S)
    assert status == 0, output[-4000:]
    return out


@pytest.fixture(scope="module")
def cpu_run(image_root, tmp_path_factory) -> Path:
    return train(image_root, tmp_path_factory.mktemp("cpu") / "run")


def initial_weights(run: Path) -> dict[str, torch.Tensor]:
    cfg = load_config(run / "config.yaml")
    torch.manual_seed(derive_seed(cfg.train.seed, "init"))  # as the trainer seeds it
    return create_model(cfg.model.name, num_classes=4, drop_path_rate=cfg.model.drop_path_rate).state_dict()


@pytest.mark.parametrize("nproc", sorted({1, CHIPS}))
def test_the_same_run_as_on_the_cpu_up_to_rounding(cpu_run, image_root, tmp_path, nproc):
    tpu_run = train(image_root, tmp_path / "tpu", nproc, **{"runtime.device": "tpu"})
    cpu_losses = [float(r["loss"]) for r in read_csv(cpu_run / "steps.csv")]
    tpu_losses = [float(r["loss"]) for r in read_csv(tpu_run / "steps.csv")]
    assert len(tpu_losses) == len(cpu_losses) == 6
    loss_error = max(abs(a - b) / abs(a) for a, b in zip(cpu_losses, tpu_losses))
    start = initial_weights(cpu_run)
    cpu, tpu = (load_training_checkpoint(run / "last.pth")["model"] for run in (cpu_run, tpu_run))
    floats = [k for k in cpu if cpu[k].is_floating_point()]
    moved = torch.cat([(cpu[k].double() - start[k].double()).abs().flatten() for k in floats]).mean().item()
    apart = torch.cat([(cpu[k].double() - tpu[k].double()).abs().flatten() for k in floats]).mean().item()
    print(f"\n{nproc} chip(s) vs cpu: losses {loss_error:.3g} max rel; weights {apart:.3g} mean apart, "
          f"{moved:.3g} mean movement ({apart / moved:.2%})")
    assert loss_error < 1e-3
    assert apart < 0.01 * moved


def test_resume_is_bit_exact(image_root, tmp_path):
    settings = {"runtime.device": "tpu"}
    whole = train(image_root, tmp_path / "whole", **settings)
    stopped = train(image_root, tmp_path / "resumed", **settings, **{"train.max_steps": 4})
    resumed = train(image_root, stopped, **settings)
    assert [int(r["step"]) for r in read_csv(resumed / "steps.csv")] == [1, 2, 3, 4, 5, 6]
    a, b = (load_training_checkpoint(run / "last.pth") for run in (whole, resumed))
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def test_speed_of_mambaout_small_in_bf16(image_root, tmp_path):
    out = train(image_root, tmp_path / "small", CHIPS, **{
        "runtime.device": "tpu", "model.name": "mambaout_small", "data.format": "synthetic", "data.img_size": 224,
        "data.synthetic_train_size": 128 * CHIPS * 12, "data.synthetic_val_size": 128 * CHIPS,
        "data.synthetic_num_classes": 1000, "train.precision": "bf16", "optim.global_batch_size": 128 * CHIPS,
        "train.micro_batch_size": 128, "eval.batch_size": 128, "sched.epochs": 1, "train.max_steps": 12,
        "train.checkpoint_every_steps": None, "train.log_interval": 1})
    rows = read_csv(out / "steps.csv")[2:]  # the first steps compile
    img_s = sorted(float(r["img_per_s"]) for r in rows)[len(rows) // 2]
    mfu = sorted(float(r["mfu"]) for r in rows if r["mfu"])
    print(f"\nmambaout_small bf16 224 px, {CHIPS} chip(s) x 128: {img_s:.0f} img/s (median of {len(rows)} steps), "
          f"MFU {mfu[len(mfu) // 2]:.1%}" if mfu else f"\n{img_s:.0f} img/s, no MFU (unknown chip)")
    assert img_s > 0
