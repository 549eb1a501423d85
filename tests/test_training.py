"""The training loop: schedule, optimizer groups, batch-split invariance, worker invariance, run folder."""
from __future__ import annotations

import csv
import json
import math
import os
import resource
import sys

import pytest
import torch
import yaml

from conftest import tiny_overrides
from helpers import read_csv
from mambaout.checkpoint import load_training_checkpoint
from mambaout.config import ConfigError, load_config, to_yaml
from mambaout.optim import LrSchedule, create_optimizer
from mambaout.tracking import CURVES_ENV, RunFolderError
from mambaout.trainer import train


def run(image_root, out, **extra):
    outcome = train(load_config(None, tiny_overrides(image_root, out, **extra)))
    return outcome.final_eval, load_training_checkpoint(out / "last.pth")


def max_weight_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def test_optimizer_skips_weight_decay_on_norms_and_biases():
    from mambaout.models import create_model

    model = create_model("mambaout_femto", num_classes=10)
    optimizer = create_optimizer(model, 4e-3, 0.05, 1e-8, (0.9, 0.999))
    decay = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, param in model.named_parameters():
        assert (id(param) in decay) == (param.ndim > 1), name


def lr_at(schedule: LrSchedule, optimizer, step: int) -> float:
    schedule.set_step(step)
    return optimizer.param_groups[0]["lr"]


@pytest.mark.parametrize("per_step", [False, True])
def test_schedule_matches_hand_computed_values(per_step):
    """Warm-up 2 epochs from 1e-6 to 4e-3, cosine over 10 epochs to 1e-5, then the cool-down at 1e-5."""
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=4e-3)
    schedule = LrSchedule(optimizer, epochs=10, warmup_epochs=2, warmup_lr=1e-6, min_lr=1e-5,
                          steps_per_epoch=5, per_step=per_step)
    peak, floor, warm = 4e-3, 1e-5, 1e-6

    def cosine(t: float) -> float:
        return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * t / 10))

    assert lr_at(schedule, optimizer, 0) == pytest.approx(warm)
    if per_step:  # step 7 of 10 warm-up steps; then t measured in steps
        assert lr_at(schedule, optimizer, 7) == pytest.approx(warm + 7 * (peak - warm) / 10)
        assert lr_at(schedule, optimizer, 23) == pytest.approx(cosine(23 / 5))
    else:  # constant within an epoch
        assert lr_at(schedule, optimizer, 4) == pytest.approx(warm)
        assert lr_at(schedule, optimizer, 7) == pytest.approx(warm + (peak - warm) / 2)
        assert lr_at(schedule, optimizer, 23) == pytest.approx(cosine(4))
    assert lr_at(schedule, optimizer, 10) == pytest.approx(cosine(2))
    assert lr_at(schedule, optimizer, 50) == pytest.approx(floor)  # first cool-down epoch
    assert lr_at(schedule, optimizer, 54) == pytest.approx(floor)


def test_gradient_accumulation_equals_one_large_micro_batch(image_root, tmp_path):
    """micro 4 x accumulation 2 and micro 8 x 1 take the same optimizer steps (mixing off: it pairs samples within
    a micro-batch; drop path on: its decisions belong to the samples)."""
    common = {"aug.mixup_alpha": 0, "aug.cutmix_alpha": 0, "model.drop_path_rate": 0.3}
    _, split = run(image_root, tmp_path / "split", **common)
    _, whole = run(image_root, tmp_path / "whole", **common, **{"train.micro_batch_size": 8})
    assert split["train_state"]["step"] == whole["train_state"]["step"] == 3
    assert max_weight_difference(split["model"], whole["model"]) < 1e-6


def test_gradient_checkpointing_does_not_change_the_run(image_root, tmp_path):
    """Recomputed blocks drop what their first run dropped (drop path 0.3): the same weights within rounding."""
    _, plain = run(image_root, tmp_path / "plain", **{"model.drop_path_rate": 0.3})
    _, recomputed = run(image_root, tmp_path / "recomputed",
                        **{"model.drop_path_rate": 0.3, "model.grad_checkpointing": True})
    assert max_weight_difference(plain["model"], recomputed["model"]) < 1e-6


def test_a_model_without_keyed_drop_decisions_trains_without_them(image_root, tmp_path):
    """A timm architecture would draw drop path from the device's generator: refused, naming the keys to set."""
    with pytest.raises(ConfigError, match=r"model.name=resnet18 .*set model.drop_path_rate=0 and model.head_dropout=0"):
        run(image_root, tmp_path / "resnet", **{"model.name": "resnet18"})
    _, state = run(image_root, tmp_path / "resnet_ok", **{"model.name": "resnet18", "model.drop_path_rate": 0.0,
                                                           "train.max_steps": 1})
    assert state["train_state"]["step"] == 1


def test_worker_count_does_not_change_the_run(image_root, tmp_path):
    _, in_process = run(image_root, tmp_path / "w0", **{"data.num_workers": 0})
    _, workers = run(image_root, tmp_path / "w2", **{"data.num_workers": 2})
    for key, value in in_process["model"].items():
        assert torch.equal(value, workers["model"][key]), key


def test_run_folder_records_everything(image_root, tmp_path, monkeypatch):
    monkeypatch.delenv(CURVES_ENV, raising=False)  # the suite goes without curves.png (conftest), this run draws it
    out = tmp_path / "run"
    result, state = run(image_root, out, **{"train.max_steps": 7})  # 6 steps per epoch: one epoch and a bit
    assert {"config.yaml", "manifest.json", "classes.json", "metrics.csv", "steps.csv", "last.pth",
            "best.pth", "checkpoints", "curves.png"} <= {p.name for p in out.iterdir()}
    assert any((out / "tensorboard").iterdir())

    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["model"]["name"] == "mambaout_femto"
    assert config["derived"]["accum_steps"] == 2 and config["derived"]["lr"] == pytest.approx(8e-3 / 1024)

    manifest = json.loads((out / "manifest.json").read_text())
    assert {"git", "command", "versions", "runtime", "dataset", "derived", "host"} <= manifest.keys()
    assert manifest["dataset"]["train"]["num_images"] == 48 and manifest["dataset"]["val"]["num_images"] == 21
    assert manifest["runtime"]["world_size"] == 1 and manifest["runtime"]["device"] == "cpu"

    with open(out / "metrics.csv") as f:
        epochs = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in epochs] == [0, 1] and [int(r["step"]) for r in epochs] == [6, 7]
    assert float(epochs[-1]["top1"]) == pytest.approx(result["top1"])
    # a CPU's peak memory: this process's peak resident memory, so far at the row's time
    peaks = [float(r["peak_memory_mib"]) for r in epochs]
    assert 100 < peaks[0] <= peaks[1] <= resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with open(out / "steps.csv") as f:
        steps = list(csv.DictReader(f))
    assert [int(r["step"]) for r in steps] == list(range(1, 8))
    assert all(math.isfinite(float(r["loss"])) for r in steps)
    assert json.loads((out / "classes.json").read_text()) == state["classes"]
    assert state["config"]["train"]["max_steps"] == 7

    steps_log = (out / "steps.csv").read_text()
    again = train(load_config(None, tiny_overrides(image_root, out, **{"train.max_steps": 7})))
    assert again.step == 7 and (out / "steps.csv").read_text() == steps_log  # finished run: nothing redone

    stale = tmp_path / "stale"  # a folder from another config that never reached a checkpoint
    stale.mkdir()
    (stale / "config.yaml").write_text(to_yaml(load_config(None, tiny_overrides(image_root, stale,
                                                                                **{"train.seed": 1}))))
    with pytest.raises(RunFolderError, match="never overwritten"):
        run(image_root, stale)


def test_corrupt_training_image_is_skipped_and_counted(image_root, tmp_path):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(image_root, root)
    victim = sorted((root / "train" / "circle").iterdir())[0]
    victim.write_bytes(b"not an image at all")
    _, state = run(root, tmp_path / "run", **{"train.max_steps": 6})  # one whole epoch: every image seen
    assert state["train_state"]["bad_images"] == 1
    with open(tmp_path / "run" / "metrics.csv") as f:
        assert [row["bad_images"] for row in csv.DictReader(f)] == ["1"]  # over all processes: test_distributed.py


def test_ema_is_evaluated_and_checkpointed(image_root, tmp_path):
    _, state = run(image_root, tmp_path / "ema", **{"train.ema": True, "train.ema_decay": 0.5,
                                                     "train.max_steps": 2})
    assert state["state_dict_ema"].keys() == state["model"].keys()
    assert any(not torch.equal(state["state_dict_ema"][k], state["model"][k]) for k in state["model"])
    with open(tmp_path / "ema" / "metrics.csv") as f:
        assert float(next(csv.DictReader(f))["ema_top1"]) >= 0


def _ema_pair(device="cpu"):
    from timm.utils import ModelEmaV3

    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2)).to(device)
    model.register_buffer("count", torch.tensor(0))
    return model, ModelEmaV3(model, decay=0.9)


def test_the_ema_update_is_timms_and_leaves_the_ema_where_the_step_was_skipped():
    """engine.EmaTensors moves the EMA as timm's ModelEmaV3.update does (up to the rounding of a multiply-add),
    copies integer buffers, and leaves everything as it was when the device flag says the step was skipped."""
    from mambaout.engine import EmaTensors

    model, ema = _ema_pair()
    _, reference = _ema_pair()
    reference.module.load_state_dict(ema.module.state_dict())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
        model.count += 3
    tensors = EmaTensors(ema, model)
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    tensors.update(5, torch.tensor(False))
    assert all(torch.equal(v, before[k]) for k, v in ema.module.state_dict().items() if k != "count")
    tensors.update(5, torch.tensor(True))
    reference.update(model, step=5)
    for key, value in reference.module.state_dict().items():
        torch.testing.assert_close(ema.module.state_dict()[key], value, rtol=1e-6, atol=1e-7)
    assert ema.module.count.item() == 3


@pytest.mark.cuda
def test_the_ema_update_launches_a_few_multi_tensor_kernels_not_one_per_tensor():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from timm.utils import ModelEmaV3

    from mambaout.engine import EmaTensors
    from mambaout.models import create_model

    model = create_model("mambaout_femto", num_classes=10).cuda()
    tensors = EmaTensors(ModelEmaV3(model, decay=0.9), model)
    applied = torch.tensor(True, device="cuda")
    tensors.update(1, applied)  # warm-up
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        tensors.update(2, applied)
        torch.cuda.synchronize()
    launches = sum(event.count for event in profile.key_averages() if event.device_type.name == "CUDA")
    assert launches < len(tensors.averaged) / 4, launches


@pytest.mark.parametrize("variant,drop_path", [("femto", 0.025), ("kobe", 0.025), ("tiny", 0.2), ("small", 0.4),
                                               ("base", 0.6)])
def test_print_config_shows_the_published_recipe(variant, drop_path, capsys, monkeypatch):
    from pathlib import Path

    import train as train_cli

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    with pytest.raises(SystemExit) as exit_info:
        train_cli.main(["--config", f"configs/mambaout_{variant}.yaml", "--print-config"])
    assert exit_info.value.code == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"] == {**config["model"], "name": f"mambaout_{variant}", "drop_path_rate": drop_path}
    assert config["derived"] == {**config["derived"], "lr": 4e-3, "accum_steps": 32, "micro_batch_size": 128,
                                 "total_epochs": 310, "eval_img_size": 224}
    assert config["optim"]["global_batch_size"] == 4096 and config["sched"]["warmup_epochs"] == 20


def test_mfu_is_logged_against_the_device_peak(image_root, tmp_path):
    """steps.csv's MFU = 3 x forward FLOPs per image x img/s / peak (runtime.peak_tflops given: a CPU has no table
    entry, so it has none otherwise); the table knows the accelerators by the names they report."""
    from mambaout.models import create_model
    from mambaout.models.info import count_macs
    from mambaout.runtime.peaks import matmul_math, peak_tflops

    run(image_root, tmp_path / "mfu", **{"runtime.peak_tflops": 0.5})
    rows = list(csv.DictReader(open(tmp_path / "mfu" / "steps.csv")))
    flops = 3 * 2 * count_macs(create_model("mambaout_femto", num_classes=4), 32)
    for row in rows:
        assert float(row["mfu"]) == pytest.approx(float(row["img_per_s"]) * flops / 0.5e12, rel=1e-6)
    run(image_root, tmp_path / "no_mfu")
    assert {row["mfu"] for row in csv.DictReader(open(tmp_path / "no_mfu" / "steps.csv"))} == {""}

    assert peak_tflops("NVIDIA H200", matmul_math("cuda", "bf16", "highest")) == 989.4
    assert peak_tflops("NVIDIA H100 PCIe", matmul_math("cuda", "fp32", "high")) == 378.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB", matmul_math("cuda", "fp32", "highest")) == 19.5
    assert peak_tflops("TPU v4-32", matmul_math("xla", "fp32", "highest")) == 275.0
    assert peak_tflops("cpu", "fp32") is None


@pytest.mark.cuda
def test_checkpoints_written_on_cuda_load_on_a_cpu_only_machine(image_root, tmp_path):
    """Every tensor of a checkpoint is a host copy: a plain torch.load(weights_only=True) works without a GPU."""
    import subprocess
    import sys

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    run(image_root, tmp_path / "cuda", **{"runtime.device": "cuda", "train.max_steps": 1})
    check = ("import torch, sys; s = torch.load(sys.argv[1], weights_only=True); "
             "ts = [t for t in s['model'].values()] + [t for st in s['optimizer']['state'].values() for t in st.values()"
             " if isinstance(t, torch.Tensor)]; assert ts and all(t.device.type == 'cpu' for t in ts); print(len(ts))")
    done = subprocess.run([sys.executable, "-c", check, str(tmp_path / "cuda" / "last.pth")], capture_output=True,
                          text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stderr


@pytest.fixture
def one_block_per_stage(monkeypatch):
    """train() builds a femto with one thin block per stage: inductor compiles it in seconds, not minutes."""
    import functools

    import mambaout.trainer as trainer

    monkeypatch.setattr(trainer, "create_model", functools.partial(trainer.create_model, depths=(1, 1, 1, 1),
                                                                   dims=(16, 24, 32, 48)))


def test_compiled_training_matches_eager_and_resumes_bit_exactly(image_root, tmp_path, one_block_per_stage):
    """train.compile=true (inductor, with drop path, Mixup/CutMix and 2 accumulation micro-steps): the weights
    after 6 steps within 1e-4 of eager ones; 3 compiled steps, then a resume to 6, equal 6 uninterrupted
    compiled steps bit for bit."""
    steps = {"train.max_steps": 6, "optim.lr": 1e-3, "sched.warmup_epochs": 0}
    _, eager = run(image_root, tmp_path / "eager", **steps)
    compiled_result, compiled = run(image_root, tmp_path / "compiled", **steps, **{"train.compile": True})
    assert compiled["train_state"]["step"] == eager["train_state"]["step"] == 6
    difference = max_weight_difference(compiled["model"], eager["model"])
    _, halfway = run(image_root, tmp_path / "resumed", **{**steps, "train.max_steps": 3, "train.compile": True})
    moved = max_weight_difference(halfway["model"], compiled["model"])  # what 3 optimizer steps change
    print(f"compiled vs eager: {difference:.3g}, 3 steps move the weights by {moved:.3g}")
    assert difference < 1e-4 and moved > 100 * difference
    resumed_result, resumed = run(image_root, tmp_path / "resumed", **steps, **{"train.compile": True})
    assert resumed_result == compiled_result
    for key in compiled["model"]:
        assert torch.equal(resumed["model"][key], compiled["model"][key]), key


def test_a_log_row_that_spans_an_epoch_end_reports_the_rate_of_the_steps_it_timed():
    """A log interval's losses carry over an epoch end, but the new epoch's clock only timed the steps since it
    started: the row's img/s is the images of those steps over their time (it was 4x too high, counting the carried
    steps over one step's time), its data_s and compute_s their mean."""
    from mambaout import engine

    state = engine.TrainState(step=3, interval_losses=[1.0, 1.0, 1.0])  # steps 1-3, in the previous epoch
    rows = []
    reporter = engine._StepReporter(state, skip_nonfinite=False, log_interval=4, max_steps=None,
                                    on_log=rows.append, images_per_step=64)
    reporter.for_step(4, 0.1, None, (0.5, 1.5))([0.0, 0.0, 2.0, 1.0, 0.0])  # 0.5 s data wait, 1.5 s compute
    assert rows[0].step == 4 and rows[0].loss == 1.25  # the interval's 4 losses
    assert rows[0].img_per_s == 64 / 2.0  # one step timed, over its 2 s
    assert (rows[0].data_s, rows[0].compute_s) == (0.5, 1.5)


def test_a_run_without_tensorboard_installed_logs_to_its_csv_files(image_root, tmp_path, monkeypatch, caplog):
    """TensorBoard missing from an environment: the run goes on with one warning, every row in steps.csv and
    metrics.csv (it used to die at its first log row)."""
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # importing it raises ImportError
    out = tmp_path / "run"
    outcome = train(load_config(None, tiny_overrides(image_root, out)))
    assert outcome.step == 3
    assert len(read_csv(out / "steps.csv")) == 3 and read_csv(out / "metrics.csv")
    assert not (out / "tensorboard").exists()
    assert sum("TensorBoard logging is off" in record.message for record in caplog.records) == 1
