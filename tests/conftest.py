"""Shared fixtures: tiny real image folders and a tiny training config (tests must stay fast on 2 cores)."""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

CLASSES = ("circle", "square", "stripes", "dots")

# The test process trains on one thread, as the jobs that tests start do (helpers.job_env): on the 2 cores it
# shares with those jobs, two threads wait for each other at every parallel region (a tiny run took 10-40 s
# instead of 3 s), and a run in this process is computed exactly as the same run in a job.
torch.set_num_threads(1)

# The suite's many tiny runs (and the train.py processes they start) go without curves.png, a figure per
# evaluation; tests/test_plots.py draws it.
os.environ.setdefault("MAMBAOUT_CURVES", "off")


def write_image_folder(root: Path, per_class: dict[str, int], size: int = 32, seed: int = 0) -> Path:
    """``root/<split>/<class>/<i>.png`` with ``per_class[split]`` images per class: a class-dependent colour
    plus noise, so a model can learn it and every file differs."""
    rng = np.random.default_rng(seed)
    for split, count in per_class.items():
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                base = np.zeros((size, size, 3), np.float32)
                base[..., label % 3] = 160 + 30 * (label // 3)
                pixels = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{name}_{i:03d}.png")
    return root


@pytest.fixture(scope="session")
def image_root(tmp_path_factory) -> Path:
    """4 classes: 12 training images each (48) and an odd-sized validation split (4 x 5 + extra = 21)."""
    root = write_image_folder(tmp_path_factory.mktemp("images"), {"train": 12, "val": 5})
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(root / "val" / CLASSES[0] / "extra.png")
    return root


def tiny_overrides(root: Path, output_dir: Path, **extra) -> list[str]:
    """A femto run on 32 px images, global batch 8, that takes seconds."""
    settings = {
        "model.name": "mambaout_femto", "model.drop_path_rate": 0.1,
        "data.root": str(root), "data.img_size": 32, "data.num_workers": 0,
        "optim.global_batch_size": 8, "train.micro_batch_size": 4, "train.max_steps": 3,
        "train.output_dir": str(output_dir), "train.log_interval": 1, "train.channels_last": False,
        "sched.epochs": 2, "sched.warmup_epochs": 1, "sched.cooldown_epochs": 0,
        "eval.batch_size": 8, "runtime.device": "cpu",
    }
    settings.update(extra)
    return [f"{key}={'null' if value is None else value}" for key, value in settings.items()]


# --- the suites of the other environments run, or CI fails --------------------------------------------------------
# CI runs `.venv-tpu/bin/python -m pytest -m torch_tpu` and `PJRT_DEVICE=CPU .venv-xla/bin/python -m pytest -m xla`.
# Where their package is missing or cannot load, their tests would skip and CI would pass without them: such a run
# needs the package (for XLA, PJRT_DEVICE alone asks for it), and fails unless its tests ran, none skipped.
SUITES = {  # marker: (package, its environment's setup script, the suite's command, the suite's name)
    "xla": ("torch_xla", "scripts/setup_xla_env.sh", "PJRT_DEVICE=CPU .venv-xla/bin/python -m pytest -m xla", "XLA"),
    "torch_tpu": ("torch_tpu", "scripts/setup_tpu_env.sh", ".venv-tpu/bin/python -m pytest -m torch_tpu",
                  "TorchTPU"),
}


def _suite(config) -> str | None:
    """The marker of the environment suite this run is, if any."""
    if os.environ.get("PJRT_DEVICE"):
        return "xla"
    return config.option.markexpr if config.option.markexpr in SUITES else None


def pytest_configure(config) -> None:
    marker = _suite(config)
    if marker is None:
        return
    package, setup, command, _ = SUITES[marker]
    try:
        importlib.import_module(package)
    except Exception as error:  # ImportError, or an undefined symbol when it meets another torch
        asked = f"PJRT_DEVICE={os.environ['PJRT_DEVICE']}" if marker == "xla" else f"-m {marker}"
        raise pytest.UsageError(
            f"{asked} asks for the {SUITES[marker][3]} suite, but {package} does not load in {sys.prefix} "
            f"({type(error).__name__}: {error}). Create its environment with `bash {setup}` and run `{command}`."
        ) from None


_suite_outcomes: list[str] = []


def pytest_runtest_logreport(report) -> None:
    if any(marker in report.keywords for marker in SUITES) and (report.when == "call" or report.skipped):
        _suite_outcomes.append(report.outcome)


def pytest_sessionfinish(session, exitstatus) -> None:
    marker = _suite(session.config)
    if marker is None or session.config.option.markexpr != marker or exitstatus != 0:
        return
    skipped, passed = _suite_outcomes.count("skipped"), _suite_outcomes.count("passed")
    if skipped or not passed:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"the {SUITES[marker][3]} suite did not run: {passed} {SUITES[marker][3]} tests "
                                f"passed, {skipped} skipped", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
