"""Training and validation on XLA (torch_xla, PJRT) on the XLA CPU device, against the eager CPU run.

Runs in the torch_xla environment (``bash scripts/setup_xla_env.sh``):

    PJRT_DEVICE=CPU .venv-xla/bin/python -m pytest -m xla

and is skipped where torch_xla is absent (the main environment). The device count and SPMD are fixed per
process, so every configuration runs in its own subprocess: this file doubles as the driver
(``python tests/test_xla.py train|augment|mixing OUT.json ...``), which trains through ``mambaout.trainer.train``
(with a fault of tests/faults.py when ``MAMBAOUT_TEST_FAULT`` names one) and records, at each hook of the runtime,
the number of XLA compilations and device-to-host transfers.
All subprocesses start, two at a time, when the first test asks for one. XLA's CPU backend compiles with
LLVM optimisation level 0 here (``XLA_FLAGS``): a quarter of the compile time, the same HLO.

The runs: femto on 32 px images, global batch 16 cut into micro-batches of 4, 6 optimizer steps over two
epochs (three steps each) with an evaluation after each epoch. Mixup/CutMix (keyed draws, mixing weights as
tensors: one graph for every draw) and drop path 0.1 (keyed decisions drawn in the data workers, the same on
every device) are on, as in the recipe. femto_ssm (the Mamba twin) runs the same way on 2 SPMD devices and eager.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6
SETTINGS = {
    "model.name": "mambaout_femto", "model.drop_path_rate": 0.1,
    "data.img_size": 32, "data.num_workers": 0,
    "optim.global_batch_size": 16, "train.micro_batch_size": 4, "train.max_steps": STEPS,
    "optim.lr": 1e-4, "sched.epochs": 2, "sched.warmup_epochs": 0, "sched.cooldown_epochs": 0,
    "train.log_interval": 1, "train.channels_last": False, "eval.batch_size": 8,
    "aug.mixup_alpha": 0.8, "aug.cutmix_alpha": 1.0,  # the recipe: one graph for Mixup and CutMix alike
}
VAL_IMAGES = 21  # conftest's image_root: 4 x 5 + 1
MAMBA_TWIN = {"model.name": "mambaout_femto_ssm"}
TENSOR_PIPELINE = {"data.pipeline": "tensor", "data.augment_on": "device", "aug.random_erase_prob": 0.5}


# --------------------------------------------------------------------------------------------------------
# The driver (runs in the subprocesses)
# --------------------------------------------------------------------------------------------------------
def drive_training(out: Path, overrides: list[str]) -> None:
    """Trains as ``overrides`` say and writes what the tests check to ``out`` (JSON)."""
    import logging

    import torch

    import faults
    import mambaout.trainer as trainer
    from mambaout.config import load_config
    from mambaout.engine import NonFiniteLossError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if os.environ.get(faults.ENV_VAR):
        faults.install_from_env()
    events: list[dict] = []
    record: dict = {"events": events}

    def stats(runtime) -> dict:
        return runtime.compile_stats() if hasattr(runtime, "compile_stats") else {}

    def instrument(runtime):
        """Wraps the hooks the loop calls, recording the counters at the boundaries of each step."""
        record["runtime"] = runtime.describe()

        def wrap(name, after=False):
            original = getattr(runtime, name)

            def hooked(*args, **kwargs):
                events.append({"at": f"{name}:in", **stats(runtime)})
                result = original(*args, **kwargs)
                if after:
                    events.append({"at": f"{name}:out", **stats(runtime)})
                return result

            setattr(runtime, name, hooked)

        wrap("batch_to_device")
        wrap("to_device")  # the tensor pipeline sends its uint8 images and plans itself
        wrap("unscale_and_clip")
        wrap("mark_step", after=True)
        prepare_model = runtime.prepare_model

        def prepare(model, channels_last):
            initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
            torch.save(initial, out.with_suffix(".init.pth"))
            return prepare_model(model, channels_last)

        runtime.prepare_model = prepare
        return runtime

    runtime_from_config = trainer.runtime_from_config
    train_one_epoch, evaluate = trainer.train_one_epoch, trainer.evaluate
    trainer.runtime_from_config = lambda cfg: instrument(runtime_from_config(cfg))

    def epoch(*args, **kwargs):
        result = train_one_epoch(*args, **kwargs)
        events.append({"at": "epoch_end", **stats(args[6])})
        return result

    def evaluation(model, loader, runtime, **kwargs):
        result = evaluate(model, loader, runtime, **kwargs)
        events.append({"at": "eval_end", "count": result.count, **stats(runtime)})
        return result

    trainer.train_one_epoch, trainer.evaluate = epoch, evaluation
    start = time.perf_counter()
    try:
        outcome = trainer.train(load_config(None, overrides))
        record["result"] = dataclasses.asdict(outcome) if dataclasses.is_dataclass(outcome) else outcome
    except NonFiniteLossError as error:  # a run that stops on a non-finite step
        record["error"] = str(error)
    record["seconds"] = time.perf_counter() - start
    out.write_text(json.dumps(record, indent=1, default=str))


def drive_augment(out: Path) -> None:
    """The tensor pipeline's augmentation on the XLA device (masked, gathers) against the eager CPU one
    (grouped, grid_sample), batch after batch of different draws: the values, and the graphs it compiles."""
    import torch_xla
    import torch_xla.debug.metrics as met
    from torch.utils.data import default_collate

    from mambaout.data import augment, fidelity
    from mambaout.data.plan import SamplePlanner
    from mambaout.data.tensor_pipeline import crop_resize_flip, on_the_host

    device = torch_xla.device()
    planner = SamplePlanner(32, rand_augment="rand-m9-mstd0.5-inc1", random_erase_prob=0.5,
                            random_erase_mode="pixel", random_erase_count=2, crop_scale=(0.08, 1.0),
                            crop_ratio=(3 / 4, 4 / 3), hflip=0.5, interpolation="random", mean=(0.485, 0.456, 0.406))
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    eager = augment.Augmenter(mean, std, planner.fill, "pixel")
    masked = augment.Augmenter(mean, std, planner.fill, "pixel", fixed_shapes=True)
    sources = [fidelity.to_tensor(photo) for photo in fidelity.sample_photos(16, 64)]
    record: dict = {"grey_levels": [], "compilations": []}
    for batch_index in range(4):
        items = []
        for i, source in enumerate(sources):
            crop, plan = planner.draw(1000 * batch_index + i, source.shape[-1], source.shape[-2])
            items.append({"image": crop_resize_flip(source, crop.tolist(), 32), "plan": plan})
        batch = default_collate(items)
        reference = eager(batch["image"].clone(), batch["plan"], on_the_host)
        ours = masked(batch["image"].to(device), batch["plan"], lambda t: t.to(device))
        torch_xla.sync()
        record["grey_levels"].append(((ours.cpu() - reference).abs() * 255 * max(std)).max().item())
        record["compilations"].append(int(met.metric_data("CompileTime")[0]))
    record["fallbacks"] = [name for name in met.counter_names() if name.startswith("aten::")]
    out.write_text(json.dumps(record))


def drive_mixing(out: Path) -> None:
    """Mixup/CutMix of one global batch under SPMD (2 devices, one micro-batch each, keyed by the ids of
    ``batch_shard_ids``) against the eager mixing of each micro-batch alone, for draws that give Mixup, CutMix
    and boxes of every size; and a host's rows of a sharded output read back from its own shards."""
    import torch
    import torch_xla.debug.metrics as met

    from mambaout.data import MicroBatchSampler, build_mixup, derive_seed
    from mambaout.engine import mix_micro_batches
    from mambaout.runtime import create_runtime

    runtime = create_runtime("xla")
    sampler = MicroBatchSampler(64, 16, 4, runtime.num_shards, runtime.shard_ids, seed=0)
    mixup = build_mixup(0.8, 1.0, 1.0, 0.5, "batch", 0.1, 10)
    record: dict = {"differences": [], "compilations": [], "batch_shard_ids": runtime.batch_shard_ids}
    for step in range(6):
        seeds = [derive_seed(0, "mix", step, m) for m in sampler.micro_indices(1, runtime.batch_shard_ids)]
        images, targets = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
        before = int(met.metric_data("CompileTime")[0]) if met.metric_data("CompileTime") else 0
        mixed, soft = mix_micro_batches(mixup, runtime.to_device(images.clone()), runtime.to_device(targets), seeds)
        runtime.mark_step()
        # (reading a sharded tensor back compiles a gather each time: only the mixing's own graphs are counted)
        record["compilations"].append(int(met.metric_data("CompileTime")[0]) - before)
        expected_mixed, expected_soft = mix_micro_batches(mixup, images.clone(), targets, seeds)
        record["differences"].append(max((mixed.cpu() - expected_mixed).abs().max().item(),
                                         (soft.cpu() - expected_soft).abs().max().item()))
    scores = runtime.to_device(torch.arange(24.0).reshape(8, 3))
    record["host_rows"] = runtime.host_rows(scores.softmax(1).topk(2, dim=1)[1] + scores[:, :2].long()).tolist()
    record["expected_rows"] = (torch.arange(24.0).reshape(8, 3)[:, :2].long() + torch.tensor([2, 1])).tolist()
    out.write_text(json.dumps(record))


# --------------------------------------------------------------------------------------------------------
# The tests (run in the pytest process)
# --------------------------------------------------------------------------------------------------------
pytestmark = pytest.mark.xla
if __name__ != "__main__":  # the driver's eager run must not even import torch_xla
    pytest.importorskip("torch_xla")  # in the main environment; the XLA run fails instead (conftest.py)

import faults  # noqa: E402  (tests/faults.py: needs nothing beyond torch)
from faults import Fault  # noqa: E402
from helpers import assert_identical, read_csv  # noqa: E402

# Adam moves a weight by about lr a step at most, and as far for a gradient that is rounding noise, so two
# backends' worst weights can differ by a fair part of a step (here up to 0.15 of one; 0.4 with Mixup alone): within
# half of one step, a missed or doubled update of any weight shows; on average the runs differ by 1e-5 of what
# training moved them (at least 100x less is required).
ONE_STEP = SETTINGS["optim.lr"]
WEIGHT_TOLERANCE = ONE_STEP / 2
EVERY_STEP = {"train.checkpoint_every_steps": 1, "train.keep_checkpoints": STEPS}


def NAN_AT(step: int) -> Fault:
    """A NaN loss at this optimizer step (4 micro-batches a step on one device)."""
    return Fault("nan-loss", steps=(step,), accum_steps=4)


def xla_env(devices: int, spmd: bool = True) -> dict[str, str]:
    return {"PJRT_DEVICE": "CPU", "CPU_NUM_DEVICES": str(devices), "MAMBAOUT_XLA_SPMD": "1" if spmd else "0"}


EAGER_ENV = {"PJRT_DEVICE": "", "OMP_NUM_THREADS": "1"}  # one thread: two runs share the 2 cores


class Runs:
    """The configurations' subprocesses, started two at a time (the machines have 2 cores) when the module's
    first test needs them; ``get(name)`` waits for one and returns its record."""

    def __init__(self, root: Path, work: Path) -> None:
        self.root, self.work = root, work
        self.pool = ThreadPoolExecutor(max_workers=int(os.environ.get("MAMBAOUT_XLA_TEST_JOBS", 2)))
        self.futures: dict[str, Future] = {}

    def start(self, name: str, job: Callable[[], dict]) -> None:
        self.futures[name] = self.pool.submit(job)

    def get(self, name: str) -> dict:
        return self.futures[name].result()

    def train(self, name: str, env: dict[str, str], output: str | None = None, **extra) -> dict:
        """One train.py run through the driver; ``output`` names the run folder (another run's, to resume)."""
        out = self.work / name
        out.mkdir(parents=True)
        run_dir = self.work / (output or name) / "run"
        settings = {**SETTINGS, "data.root": str(self.root), "train.output_dir": str(run_dir), **extra}
        overrides = [f"{key}={value}" for key, value in settings.items()]
        record = self.python(name, [__file__, "train", str(out / "record.json"), *overrides], env)
        record.update(json.loads((out / "record.json").read_text()))
        record.update(dir=run_dir, init=out / "record.init.pth")
        return record

    def python(self, name: str, args: list[str], env: dict[str, str]) -> dict:
        environment = {k: v for k, v in os.environ.items()
                       if k not in ("PJRT_DEVICE", "CPU_NUM_DEVICES", "XLA_USE_SPMD", "MAMBAOUT_XLA_SPMD")}
        environment.update(env)
        environment["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()
        start = time.perf_counter()
        done = subprocess.run([sys.executable, *args], cwd=ROOT, env=environment, capture_output=True, text=True,
                              timeout=900)
        seconds = time.perf_counter() - start
        log = done.stdout + done.stderr
        (self.work / f"{name}.log").write_text(log)
        assert done.returncode == 0, f"{name} failed with status {done.returncode}:\n{log[-6000:]}"
        return {"wall_s": seconds, "log": log}

    def validate(self, name: str, env: dict[str, str], of: str, *flags: str) -> dict:
        """validate.py on the last checkpoint of run ``of``, with its training config."""
        run = self.get(of)["dir"]
        results = self.work / f"{name}.json"
        self.python(name, ["validate.py", "--config", str(run / "config.yaml"), "--checkpoint",
                           str(run / "last.pth"), f"data.root={self.root}", "--results", str(results), *flags], env)
        return json.loads(results.read_text())


@pytest.fixture(scope="module")
def runs(image_root, tmp_path_factory):
    runs = Runs(image_root, tmp_path_factory.mktemp("xla"))
    # Submission order is start order: the longest first, and a run before the one that needs it.
    # The Mamba twin (the longest to compile): its selective scan (parallel prefix scan inside chunks on XLA, step by step on the CPU)
    runs.start("ssm_spmd2", lambda: runs.train("ssm_spmd2", xla_env(2), **MAMBA_TWIN))
    runs.start("ssm_eager", lambda: runs.train("ssm_eager", EAGER_ENV, **{"runtime.device": "cpu"}, **MAMBA_TWIN))
    runs.start("xla1", lambda: runs.train("xla1", xla_env(1, spmd=False)))
    runs.start("eager", lambda: runs.train("eager", EAGER_ENV, **{"runtime.device": "cpu"}))
    runs.start("spmd4", lambda: runs.train("spmd4", xla_env(4), **{"runtime.device": "xla"}))
    # data workers: batches arrive through MpDeviceLoader (threads) rather than in the loop's thread
    runs.start("spmd2", lambda: runs.train("spmd2", xla_env(2), **{"data.num_workers": 1}))
    runs.start("interrupted", lambda: stopped_at(runs.train("interrupted", xla_env(1, spmd=False),
                                                            **{"train.max_steps": 4, "data.num_workers": 1})))
    runs.start("resumed", lambda: (runs.get("interrupted"), runs.train("resumed", xla_env(1, spmd=False),
                                                                        output="interrupted"))[1])
    runs.start("validate4", lambda: runs.validate("validate4", xla_env(4), "eager", "--device", "xla",
                                                  "--workers", "1"))
    runs.start("validate_bf16", lambda: runs.validate("validate_bf16", xla_env(1, spmd=False), "eager",
                                                      "--device", "xla", "--precision", "bf16"))
    # a NaN loss at step 5 (after the compiled steps), skipped on the device; one at step 2, stopping the run
    runs.start("nonfinite", lambda: runs.train("nonfinite", {**xla_env(1), **faults.env(NAN_AT(5))}, **EVERY_STEP,
                                               **{"train.skip_nonfinite": True, "train.ema": True}))
    runs.start("nonfinite_stop", lambda: runs.train("nonfinite_stop", {**xla_env(1), **faults.env(NAN_AT(2))},
                                                    **EVERY_STEP, **{"train.max_steps": 2}))
    runs.start("mixing", lambda: (runs.python("mixing", [__file__, "mixing", str(runs.work / "mixing.json")],
                                              xla_env(2)), json.loads((runs.work / "mixing.json").read_text()))[1])
    runs.start("augment", lambda: (runs.python("augment", [__file__, "augment", str(runs.work / "augment.json")],
                                               xla_env(1)), json.loads((runs.work / "augment.json").read_text()))[1])
    # The tensor pipeline, augmenting on the device: masked ops under SPMD, grouped ops on the eager CPU.
    runs.start("tensor_spmd2", lambda: runs.train("tensor_spmd2", xla_env(2), **TENSOR_PIPELINE))
    runs.start("tensor_eager", lambda: runs.train("tensor_eager", EAGER_ENV, **{"runtime.device": "cpu"},
                                                  **TENSOR_PIPELINE))
    yield runs
    runs.pool.shutdown(wait=True, cancel_futures=True)


def stopped_at(record: dict) -> dict:
    """Notes the step of the interrupted run's checkpoint before the resumed run continues it in place."""
    record["saved_step"] = checkpoint(record)["train_state"]["step"]
    return record


def steps(record: dict) -> list[dict]:
    with open(record["dir"] / "steps.csv") as f:
        return [{k: float(v) for k, v in row.items() if v} for row in csv.DictReader(f)]  # mfu: none on CPUs


def checkpoint(record: dict) -> dict:
    import torch

    return torch.load(record["dir"] / "last.pth", map_location="cpu", weights_only=False)


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def mean_difference(a: dict, b: dict) -> float:
    total = sum((a[k].double() - b[k].double()).abs().sum().item() for k in a)
    return total / sum(a[k].numel() for k in a)


def compare(record: dict, reference: dict) -> dict:
    """Largest relative loss difference over the steps, largest weight difference at the end, and how far the
    reference's weights moved from their initial values over how much the two runs' weights differ (means)."""
    import torch

    ours, theirs = steps(record), steps(reference)
    assert [r["step"] for r in ours] == [r["step"] for r in theirs] == list(range(1, STEPS + 1))
    assert all(a["lr"] == pytest.approx(b["lr"], rel=1e-9) for a, b in zip(ours, theirs))
    assert drop_and_mix_on(record) and drop_and_mix_on(reference)  # compared with the recipe's random draws on
    weights, reference_weights = checkpoint(record)["model"], checkpoint(reference)["model"]
    moved = mean_difference(reference_weights, torch.load(reference["init"], weights_only=False))
    return {"loss_rel": max(abs(a["loss"] - b["loss"]) / abs(b["loss"]) for a, b in zip(ours, theirs)),
            "weights_abs": max_difference(weights, reference_weights),
            "moved_over_difference": moved / max(mean_difference(weights, reference_weights), 1e-30)}


def assert_same_run(errors: dict) -> None:
    """Losses within 1e-4 relative, every weight within half of one optimizer step, and the weights moved by at
    least 100x what they differ on average."""
    assert errors["loss_rel"] < 1e-4, errors
    assert errors["weights_abs"] < WEIGHT_TOLERANCE, errors
    assert errors["moved_over_difference"] >= 100, errors


def drop_and_mix_on(run: dict) -> bool:
    from mambaout.config import load_config

    cfg = load_config(run["dir"] / "config.yaml")
    return cfg.model.drop_path_rate > 0 and cfg.aug.mixup_alpha > 0 and cfg.aug.cutmix_alpha > 0


def cutmix_draws(run: dict) -> dict[int, list[bool]]:
    """For each optimizer step (from 1), whether each micro-batch of the global batch drew CutMix (else Mixup):
    the keyed draws of the run's resolved config, drawn again here."""
    from mambaout.config import load_config
    from mambaout.data import build_mixup, derive_seed
    from mambaout.data.sampling import seeded_rngs

    cfg = load_config(run["dir"] / "config.yaml")
    aug = cfg.aug
    mixup = build_mixup(aug.mixup_alpha, aug.cutmix_alpha, aug.mixup_prob, aug.mixup_switch_prob, aug.mixup_mode,
                        aug.label_smoothing, 4)
    draws = {}
    for step in range(STEPS):
        draws[step + 1] = []
        for micro in range(cfg.optim.global_batch_size // cfg.train.micro_batch_size):
            with seeded_rngs(derive_seed(cfg.train.seed, "mix", step, micro)):
                draws[step + 1].append(mixup._params_per_batch()[1])
    return draws


def test_xla_matches_eager_cpu(runs):
    """One XLA CPU device (no SPMD) follows eager CPU, drop path and Mixup/CutMix on: losses within 1e-4
    relative, every weight within half of one optimizer step (lr/2), and the weights moved by at least 100x what
    they differ on average."""
    xla, eager = runs.get("xla1"), runs.get("eager")
    assert xla["runtime"]["device"] == "xla" and xla["runtime"]["spmd"] is False
    errors = compare(xla, eager)
    print(f"\nxla1 vs eager: {errors}")
    assert_same_run(errors)


@pytest.mark.parametrize("devices", [2, 4])
def test_spmd_device_count_does_not_change_the_run(runs, devices):
    """2 and 4 XLA CPU devices under SPMD (accumulation 2 and 1) follow the eager CPU run (accumulation 4) and the
    1-device XLA run, drop path and Mixup/CutMix on, within the tolerances of test_xla_matches_eager_cpu."""
    record = runs.get(f"spmd{devices}")
    runtime = record["runtime"]
    assert runtime["spmd"] and runtime["num_shards"] == devices and runtime["mesh"] == {"data": devices, "model": 1}
    assert f"accum_steps: {4 // devices}" in (record["dir"] / "config.yaml").read_text()
    errors_eager, errors = compare(record, runs.get("eager")), compare(record, runs.get("xla1"))
    print(f"\nspmd{devices} vs eager CPU: {errors_eager}, vs xla1: {errors}")
    assert_same_run(errors_eager)
    assert_same_run(errors)


def test_a_mamba_twin_trains_on_spmd_as_on_eager_cpu(runs):
    """femto_ssm on 2 XLA devices under SPMD follows its eager CPU run, within the tolerances of
    test_xla_matches_eager_cpu: the scan's two recurrences (parallel on XLA, step by step on the CPU) and its
    hand-written backward agree, and its shapes compile once (test_compilations_stop_growing...)."""
    errors = compare(runs.get("ssm_spmd2"), runs.get("ssm_eager"))
    print(f"\nfemto_ssm, spmd2 vs eager CPU: {errors}")
    assert any(key.endswith("ssm.A_log") for key in checkpoint(runs.get("ssm_spmd2"))["model"])
    assert_same_run(errors)


@pytest.mark.parametrize("name", ["xla1", "spmd2", "spmd4", "tensor_spmd2", "nonfinite", "ssm_spmd2"])
def test_compilations_stop_growing_and_nothing_is_read_inside_a_step(runs, name):
    """Every graph is compiled within the first two optimizer steps and the first evaluation: the third step,
    the second epoch and the second evaluation compile nothing, though steps 3-6 draw CutMix boxes and Mixup
    weights of their own (and, in the `nonfinite` run, step 5 is skipped on the device and the EMA evaluated
    too). Between taking a batch and cutting the graph, and between the gradient norm and the cut after the
    optimizer step, nothing is read back to the host. Each evaluation counts every image exactly once (the padded
    rows of the last batch masked out)."""
    from mambaout.config import load_config

    draws = cutmix_draws(runs.get(name))
    assert any(any(draws[step]) for step in range(3, STEPS + 1)), draws  # CutMix after the compiled steps
    assert any(not all(draws[step]) for step in range(3, STEPS + 1)), draws  # Mixup too
    events = runs.get(name)["events"]
    per_epoch = 2 if load_config(runs.get(name)["dir"] / "config.yaml").train.ema else 1  # the model's, the EMA's
    evaluations = [e for e in events if e["at"] == "eval_end"]
    assert [e["count"] for e in evaluations] == [VAL_IMAGES] * 2 * per_epoch

    for i, event in enumerate(events):
        if event["at"] in ("batch_to_device:in", "to_device:in", "unscale_and_clip:in"):
            cut = next(e for e in events[i + 1:] if e["at"] == "mark_step:in")
            assert cut["transfers_to_host"] == event["transfers_to_host"], (name, i, event, cut)

    step_ends = [e for i, e in enumerate(events)
                 if e["at"] == "mark_step:out" and events[i - 2]["at"] == "unscale_and_clip:in"]
    assert len(step_ends) == STEPS
    compiles = [e["compilations"] for e in step_ends]
    first_eval = evaluations[per_epoch - 1]  # the first epoch's evaluations done
    print(f"\n{name}: compilations after each step {compiles}, after the first evaluation "
          f"{first_eval['compilations']}, at the end {events[-1]['compilations']}")
    assert compiles[1] == compiles[2], compiles
    assert events[-1]["compilations"] == first_eval["compilations"], (compiles, first_eval, events[-1])


def test_tensor_pipeline_augmentation_on_xla_equals_eager_in_one_graph(runs):
    """RandAugment, erasing and normalisation of the tensor pipeline compiled for XLA: four batches of other
    draws give the eager CPU's values (to one grey level) with the graph compiled once, and no op falls back to
    the host (XLA has no grid_sample: the masked path samples with gathers)."""
    record = runs.get("augment")
    assert max(record["grey_levels"]) <= 1.0 + 1e-3, record
    assert record["compilations"][0] == record["compilations"][-1] >= 1, record
    assert record["fallbacks"] == [], record


def test_tensor_pipeline_trains_the_eager_run_on_spmd(runs):
    """Training with the tensor pipeline augmenting on the device: 2 SPMD devices (masked ops, one graph)
    follow the eager CPU run (grouped ops) as closely as the timm pipeline's XLA run follows its eager one."""
    difference = compare(runs.get("tensor_spmd2"), runs.get("tensor_eager"))
    print(f"\ntensor pipeline, SPMD 2 vs eager CPU: {difference}")
    assert_same_run(difference)


def test_spmd_mixes_the_global_batch_as_eager_mixes_each_micro_batch(runs):
    """Image by image and target by target, the global batch mixed under SPMD equals the eager mixing of its
    micro-batches; six draws (Mixup and CutMix, lam and boxes of all sizes) compile one graph; a host reads its
    own rows of a sharded output."""
    record = runs.get("mixing")
    assert record["batch_shard_ids"] == [0, 1]
    assert max(record["differences"]) <= 1e-6, record
    assert record["compilations"][0] >= 1 and record["compilations"][1:] == [0] * 5, record
    assert record["host_rows"] == record["expected_rows"]


def test_validate_on_xla_counts_every_image_once(runs):
    """validate.py on 4 SPMD devices (one batch of 32 rows, 11 of them padding) reports what the eager run's
    last evaluation reported for the same weights; bf16 autocast counts the same images."""
    with open(runs.get("eager")["dir"] / "metrics.csv") as f:
        eager = list(csv.DictReader(f))[-1]
    fp32, bf16 = runs.get("validate4"), runs.get("validate_bf16")
    print(f"\nvalidate on 4 XLA devices: {fp32['top1']} {fp32['loss']}, bf16: {bf16['top1']} {bf16['loss']}; "
          f"eager: {eager['top1']} {eager['eval_loss']}")
    assert fp32["count"] == bf16["count"] == VAL_IMAGES
    assert fp32["device"] == "xla" and fp32["devices"] == 4
    assert fp32["top1"] == pytest.approx(float(eager["top1"])) and fp32["top5"] == pytest.approx(float(eager["top5"]))
    assert fp32["loss"] == pytest.approx(float(eager["eval_loss"]), rel=1e-4)
    assert bf16["loss"] == pytest.approx(fp32["loss"], rel=0.05)


def test_resume_on_xla_continues_the_run(runs):
    """A run stopped after 4 of 6 steps (mid-epoch) and continued by the same command ends with the weights
    and the losses of the uninterrupted run."""
    interrupted, resumed, uninterrupted = runs.get("interrupted"), runs.get("resumed"), runs.get("xla1")
    assert interrupted["saved_step"] == 4
    assert checkpoint(resumed)["train_state"]["step"] == STEPS
    difference = max_difference(checkpoint(resumed)["model"], checkpoint(uninterrupted)["model"])
    print(f"\nresumed vs uninterrupted: weights {difference}")
    assert difference <= 1e-6
    assert [r["loss"] for r in steps(resumed)] == pytest.approx([r["loss"] for r in steps(uninterrupted)], rel=1e-6)


def test_a_nonfinite_step_is_skipped_on_the_device(runs):
    """The real loop on XLA, a NaN loss at step 5 with train.skip_nonfinite=true and a checkpoint every step. XLA
    has no fused AdamW: the update is computed and kept only where the step is finite (selects in the graph) and
    Adam's host step counters are set back once the graph has run. Step 5's checkpoint equals step 4's in every
    tensor (weights, Adam's moments and step counts, EMA), steps 4 and 6 train, and the skip is counted."""
    import math

    import torch

    run = runs.get("nonfinite")["dir"]
    saved = {step: torch.load(run / "checkpoints" / f"step_{step:08d}.pth", map_location="cpu", weights_only=False)
             for step in (3, 4, 5, 6)}
    assert [saved[step]["train_state"]["nonfinite_skips"] for step in (4, 5, 6)] == [0, 1, 1]
    for part in ("model", "optimizer", "state_dict_ema"):
        assert_identical(saved[4][part], saved[5][part], part)
    for step in (4, 6):
        assert max_difference(saved[step - 1]["model"], saved[step]["model"]) > 0
        assert max_difference(saved[step - 1]["state_dict_ema"], saved[step]["state_dict_ema"]) > 0
    epochs = read_csv(run / "metrics.csv")  # steps 1-3, 4-6
    assert [row["nonfinite_skips"] for row in epochs] == ["0", "1"]
    assert all(math.isfinite(float(row["train_loss"])) for row in epochs)


def test_a_nonfinite_step_stops_the_run_naming_it(runs):
    """Without train.skip_nonfinite, a NaN loss at step 2, read back in the step's closure once its graph has run:
    the run stops naming step 2, its four micro-batch losses and the last good checkpoint (step 1's), and writes
    nothing after step 1."""
    record = runs.get("nonfinite_stop")
    assert re.fullmatch(r"non-finite training values at optimizer step 2: micro-batch losses \[nan, nan, nan, nan\], "
                        rf"gradient norm nan; .*\. Last good checkpoint: {re.escape(str(record['dir']))}/last\.pth",
                        record.get("error", "")), record.get("error")
    assert [p.name for p in (record["dir"] / "checkpoints").iterdir()] == ["step_00000001.pth"]


if __name__ == "__main__":
    mode, target = sys.argv[1], Path(sys.argv[2])
    {"train": lambda: drive_training(target, sys.argv[3:]), "augment": lambda: drive_augment(target),
     "mixing": lambda: drive_mixing(target)}[mode]()
