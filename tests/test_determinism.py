"""runtime.deterministic and runtime.matmul_precision: the runtime selects the kernels, records the choice, and
training runs so."""
from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import tiny_overrides
from mambaout.config import load_config
from mambaout.runtime import create_runtime
from mambaout.trainer import train


@pytest.fixture(autouse=True)
def kernel_choice_restored():
    """The choice is global to the process: put back what the other tests run with."""
    saved_env = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
             torch.backends.cudnn.benchmark)
    saved_precision = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    yield
    torch.use_deterministic_algorithms(saved[0])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[1:]
    torch.set_float32_matmul_precision(saved_precision[0])
    torch.backends.cudnn.allow_tf32 = saved_precision[1]
    os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    if saved_env is not None:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = saved_env


def test_runtime_selects_and_records_deterministic_kernels():
    torch.backends.cudnn.benchmark = True
    runtime = create_runtime("cpu", deterministic=True)
    assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
    assert not torch.backends.cudnn.benchmark
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert runtime.describe()["deterministic"] is True

    runtime = create_runtime("cpu")  # an earlier run's choice does not carry over
    assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic
    assert torch.backends.cudnn.benchmark  # the autotuner picks convolution kernels outside deterministic runs
    assert runtime.describe()["deterministic"] is False


def test_runtime_selects_and_records_the_matmul_precision():
    """'high' lets matmuls and cuDNN convolutions use TF32; 'highest' (the default, the paper's fp32) lets neither,
    although torch's own default lets cuDNN."""
    runtime = create_runtime("cpu", matmul_precision="high")
    assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.allow_tf32
    assert runtime.describe()["matmul_precision"] == "high"
    runtime = create_runtime("cpu")
    assert torch.get_float32_matmul_precision() == "highest" and not torch.backends.cudnn.allow_tf32
    assert runtime.describe()["matmul_precision"] == "highest"


def test_a_workspace_setting_of_the_user_stands():
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":16:8"
    create_runtime("cpu", deterministic=True)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


@pytest.mark.parametrize("pipeline", [{}, {"data.pipeline": "tensor", "data.augment_on": "device"}],
                         ids=["timm", "tensor-on-device"])
def test_training_runs_with_deterministic_kernels(image_root, tmp_path, pipeline):
    """torch refuses no op of the step, nor of the tensor pipeline's device augmentation, on CPU."""
    out = tmp_path / "run"
    outcome = train(load_config(None, tiny_overrides(image_root, out, **{"runtime.deterministic": True},
                                                     **pipeline)))
    assert outcome.step == 3
    assert json.loads((out / "manifest.json").read_text())["runtime"]["deterministic"] is True
