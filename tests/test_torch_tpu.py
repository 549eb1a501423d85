"""runtime.device=tpu (TorchTPU) on a machine without TPU chips: what can be proven here, and nothing more.

- The runtime's seams, with TorchTPU's device calls answered on the CPU (tests/tpu_standin.py): device choice per
  process, backend, execution mode, matmul precision, compile backend, deferred reads, the step's fallback, the
  peak table and the launch script. (Its end-to-end run on 1 and 2 processes is in tests/test_distributed.py.)
- With TorchTPU installed (``-m torch_tpu`` in .venv-tpu/, scripts/setup_tpu_env.sh): one clear error without
  chips, the launch environment TorchTPU derives for a pod, and the API surface: every ``torch.tpu`` and
  ``torch.accelerator`` name the runtime's ``TorchTpu`` calls, read from its source, resolves in the installed
  release, so a rename on either side fails here, not on a pod.

Runs on chips are tests/test_tpu_chips.py.
"""
from __future__ import annotations

import ast
import importlib
import importlib.metadata
import importlib.util
import inspect
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tpu_standin
from conftest import tiny_overrides
from helpers import REPO, run_job
from mambaout.config import ConfigError
from mambaout.runtime import DistributedRuntimeError, create_runtime, torch_tpu
from mambaout.runtime.peaks import matmul_math, peak_tflops
from mambaout.runtime.torch_tpu import EAGER_MODE, TPU_PRECISIONS, TorchTpu, TorchTpuRuntime

HAS_TORCH_TPU = importlib.util.find_spec("torch_tpu") is not None
needs_torch_tpu = pytest.mark.skipif(not HAS_TORCH_TPU, reason="TorchTPU is not installed (scripts/setup_tpu_env.sh)")
LAUNCH = ["bash", str(REPO / "scripts" / "launch_tpu.sh"), "--backend", "torchtpu", "--dry-run"]


def standin_runtime(monkeypatch, chips: int = 1, local_rank: int = 0, **kwargs) -> TorchTpuRuntime:
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    return TorchTpuRuntime(api=tpu_standin.CpuStandIn(chips), **kwargs)


# --- the seams ---------------------------------------------------------------------------------------------------

def test_the_standin_answers_every_call_the_runtime_makes():
    """Nothing of the real TorchTpu runs in the CPU tests: the stand-in overrides each of its methods."""
    methods = {name for name, value in vars(TorchTpu).items() if callable(value) and not name.startswith("__")}
    assert methods and methods <= set(vars(tpu_standin.CpuStandIn))
    assert (TorchTpu.device_type, TorchTpu.backend, TorchTpu.compile_backend) == ("tpu", "tpu_dist", "tpu")


def test_the_runtime_sets_the_fused_eager_mode_and_picks_the_chip_of_its_process(monkeypatch):
    runtime = standin_runtime(monkeypatch, chips=4, local_rank=2)
    assert runtime.kind == "tpu" and runtime.backend == "gloo" and runtime.device == torch.device("cpu")
    assert runtime.api.calls[:2] == [("eager_mode", "DEFER_AND_FUSE"), ("device", 2)]
    assert EAGER_MODE == "DEFER_AND_FUSE"
    # a process that sees one chip (TorchTPU may show each process only its own) uses index 0
    assert standin_runtime(monkeypatch, chips=1, local_rank=3).api.calls[1] == ("device", 0)
    with pytest.raises(DistributedRuntimeError, match=r"LOCAL_RANK=4 but this host has 4 TPU chips.*"
                                                      r"--nproc_per_node=4 or fewer"):
        standin_runtime(monkeypatch, chips=4, local_rank=4)


@pytest.mark.parametrize("setting", ["highest", "high", "medium"])
def test_matmul_precision_goes_through_torchs_knob_that_torchtpu_maps(monkeypatch, setting):
    previous = torch.get_float32_matmul_precision()
    try:
        runtime = standin_runtime(monkeypatch, matmul_precision=setting)
        assert torch.get_float32_matmul_precision() == setting
        described = runtime.describe()
    finally:
        torch.set_float32_matmul_precision(previous)
    assert described["tpu_precision"] == {"highest": "HIGHEST", "high": "HIGH", "medium": "DEFAULT"}[setting]
    assert described["device"] == "tpu" and described["eager_mode"] == "DEFER_AND_FUSE"
    assert described["skip_nonfinite_step"] == "fused AdamW found_inf"  # the CPU's kernel honours found_inf


def test_compile_uses_torchtpus_backend(monkeypatch):
    runtime = standin_runtime(monkeypatch)
    runtime.api.compile_backend = "tpu"
    seen = {}
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: seen.update(kwargs) or model)
    model = torch.nn.Linear(2, 2)
    assert runtime.compile(model) is model and seen == {"backend": "tpu"}


def test_step_reports_are_read_a_step_later_without_pinned_memory(monkeypatch):
    runtime = standin_runtime(monkeypatch)
    read = []
    runtime.after_step(read.append, torch.tensor([1.0, 2.0]))
    assert read == []
    runtime.after_step(read.append, torch.tensor([3.0]))
    assert read == [[1.0, 2.0]]
    runtime.read_pending()
    assert read == [[1.0, 2.0], [3.0]]
    assert runtime.wrap_loader(loader := [{"image": torch.zeros(1)}]) is loader  # no side-stream prefetch


def adamw_steps(runtime, finite_flags) -> tuple[dict, dict]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3))
    from mambaout.optim import create_optimizer

    optimizer = create_optimizer(model, 1e-2, 0.05, 1e-8, (0.9, 0.999))
    for i, finite in enumerate(finite_flags):
        model.zero_grad()
        model(torch.randn(4, 6)).square().mean().backward()
        runtime.optimizer_step(optimizer, torch.tensor(finite))
        runtime.read_pending()
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {k: {n: t.clone() for n, t in s.items()} for k, s in optimizer.state_dict()["state"].items()})


def test_the_guarded_step_keeps_the_same_weights_where_the_kernel_cannot_skip(monkeypatch):
    """Where TorchTPU's fused AdamW ignored found_inf, the runtime guards the step with selects: weights, moments
    and step counts equal the kernel's own skip bit for bit, a skipped step included."""
    flags = [True, False, True, True, False]
    in_kernel = standin_runtime(monkeypatch)
    monkeypatch.setattr(torch_tpu, "fused_adamw_skips", lambda device: False)
    guarded = standin_runtime(monkeypatch)
    assert in_kernel.skips_in_kernel and not guarded.skips_in_kernel
    assert guarded.describe()["skip_nonfinite_step"] == "guarded (selects)"
    (weights_a, state_a), (weights_b, state_b) = adamw_steps(in_kernel, flags), adamw_steps(guarded, flags)
    for key in weights_a:
        assert torch.equal(weights_a[key], weights_b[key]), key
    for index in state_a:
        assert state_a[index]["step"].item() == state_b[index]["step"].item() == 3
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state_a[index][name], state_b[index][name]), (index, name)


def test_a_kernel_that_ignores_found_inf_is_caught(monkeypatch):
    """The start-up check itself: a fused AdamW that applies a step it was told to skip counts as no."""
    real_step = torch.optim.AdamW.step

    def ignoring_found_inf(self, closure=None):
        self.found_inf = None
        return real_step(self, closure)

    assert torch_tpu.fused_adamw_skips(torch.device("cpu"))
    monkeypatch.setattr(torch.optim.AdamW, "step", ignoring_found_inf)
    assert not torch_tpu.fused_adamw_skips(torch.device("cpu"))


def test_peaks_for_the_tpus_torchtpu_runs_on():
    math = matmul_math("tpu", "fp32", "highest")
    assert math == matmul_math("tpu", "bf16", "highest") == "bf16"  # quoted against the bf16 peak
    peaks = {name: peak_tflops(name, math) for name in ("TPU v4", "TPU v5e", "TPU v5 lite", "TPU v5p", "TPU v6e",
                                                         "TPU v6 lite", "TPU v7")}
    assert peaks == {"TPU v4": 275.0, "TPU v5e": 197.0, "TPU v5 lite": 197.0, "TPU v5p": 459.0, "TPU v6e": 918.0,
                     "TPU v6 lite": 918.0, "TPU v7": 1153.5}


@pytest.mark.skipif(HAS_TORCH_TPU, reason="TorchTPU is installed here: test_no_chips_is_one_clear_error")
def test_device_tpu_without_torchtpu_is_one_clear_error(image_root, tmp_path):
    with pytest.raises(ConfigError, match=r"needs TorchTPU.*pip install -e '\.\[tpu\]'"):
        create_runtime("tpu")
    status, output = run_job([sys.executable, "train.py", *tiny_overrides(image_root, tmp_path / "run"),
                              "runtime.device=tpu"], tmp_path / "job.log")
    assert status != 0 and "runtime.device=tpu needs TorchTPU" in output and "Traceback" not in output, output


# --- the launch script -------------------------------------------------------------------------------------------

def fake_torchtpu_venv(root: Path, printed: str, status: int = 0) -> Path:
    """A venv whose python answers ``-m torch.tpu.distributed`` as TorchTPU does (shell assignments)."""
    python = root / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(f"#!/bin/sh\n[ \"$2\" = torch.tpu.distributed ] || exit 9\ncat <<'END'\n{printed}\nEND\n"
                      f"[ {status} = 0 ] || echo 'ValueError: set_tpu_launch_env(): expected TPU devices' >&2\n"
                      f"exit {status}\n")
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    return root


def launch(venv: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([*LAUNCH, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TPU_VENV": str(venv), **env})


def test_launch_on_one_host_runs_one_process_per_chip(tmp_path):
    venv = fake_torchtpu_venv(tmp_path / "venv", 'Successfully renamed PrivateUse1 backend to \'tpu\'\n'
                              'TORCH_TPU_TOPOLOGY="2x2"\nTORCH_TPU_SLICEBUILDER_ADDRESSES="localhost:1,localhost:2,'
                              'localhost:3,localhost:4"\nWORLD_SIZE=4\nNODE_RANK="0"')
    done = launch(venv, "train.py", "--config", "configs/mambaout_small.yaml")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(venv / "bin" / "python"), "-m", "torch.distributed.run", "--nproc_per_node",
                                   "4", "--standalone", "train.py", "--config", "configs/mambaout_small.yaml"]


def test_launch_on_a_pod_passes_the_node_rank(tmp_path):
    venv = fake_torchtpu_venv(tmp_path / "venv", 'WORLD_SIZE=16\nNODE_RANK="3"\nNNODES="4"\nMASTER_ADDR="10.0.0.2"\n'
                              'MASTER_PORT="29500"')
    done = launch(venv, "train.py")
    assert done.returncode == 0, done.stderr
    assert " ".join(done.stdout.split()[3:]) == ("--nproc_per_node 4 --nnodes 4 --node_rank 3 --master_addr 10.0.0.2 "
                                                 "--master_port 29500 train.py")


def test_launch_without_chips_says_what_is_missing(tmp_path):
    done = launch(fake_torchtpu_venv(tmp_path / "venv", "", status=1), "train.py")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "TorchTPU could not derive the launch environment" in done.stderr
    assert "expected TPU devices" in done.stderr and "--backend torchtpu --setup" in done.stderr
    missing = launch(tmp_path / "nothing", "train.py")
    assert missing.returncode == 2 and "run with --backend torchtpu --setup first" in missing.stderr


# --- with TorchTPU installed -------------------------------------------------------------------------------------

def torchtpu_names_called() -> set[str]:
    """Every dotted ``torch.tpu.*`` / ``torch.accelerator.*`` name that ``TorchTpu``'s code uses."""
    tree = ast.parse(inspect.getsource(TorchTpu))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            parts, inner = [], node
            while isinstance(inner, ast.Attribute):
                parts.append(inner.attr)
                inner = inner.value
            if isinstance(inner, ast.Name) and inner.id == "torch" and parts[-1] in ("tpu", "accelerator"):
                names.add(".".join(["torch", *reversed(parts)]))
    module_names = ast.walk(ast.parse(inspect.getsource(torch_tpu.tpu_chip_count)))
    names |= {f"torch.accelerator.{node.attr}" for node in module_names
              if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
              and node.value.attr == "accelerator"}
    # keep only the longest chains (torch.tpu.EagerMode covers torch.tpu)
    return {name for name in names if not any(other.startswith(name + ".") for other in names)}


@pytest.mark.torch_tpu
@needs_torch_tpu
def test_every_torchtpu_name_the_runtime_calls_resolves():
    import torch_tpu as package  # noqa: F401

    names = torchtpu_names_called()
    assert {"torch.tpu.eager_mode", "torch.tpu.EagerMode", "torch.tpu.get_device_name",
            "torch.accelerator.synchronize", "torch.accelerator.max_memory_allocated",
            "torch.accelerator.set_device_index", "torch.accelerator.device_count"} <= names, names
    missing = []
    for name in sorted(names):
        value = torch
        for part in name.split(".")[1:]:
            if not hasattr(value, part):
                missing.append(name)
                break
            value = getattr(value, part)
    assert not missing, f"TorchTPU {importlib.metadata.version('torch-tpu')} lacks what the runtime calls: {missing}"
    # the values the runtime passes by name
    assert hasattr(torch.tpu.EagerMode, EAGER_MODE)
    assert set(TPU_PRECISIONS.values()) == set(torch.tpu.Precision.__members__)
    # torch.tpu.eager_mode is set, not only read: a property with a setter on the module's type
    assert isinstance(getattr(type(torch.tpu), "eager_mode", None), property)
    assert type(torch.tpu).eager_mode.fset is not None


@pytest.mark.torch_tpu
@needs_torch_tpu
def test_torchtpu_provides_the_kernels_backend_and_precision_mapping_the_step_relies_on():
    import torch_tpu._loader as loader

    # fused AdamW (FUSED_DEVICES has tpu) and the foreach ops of the gradient norm, on TorchTPU's dispatch key
    for op in ("aten::_fused_adamw_", "aten::_foreach_norm.Scalar"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "PrivateUse1"), op
    source = inspect.getsource(loader)  # registered when chips are found: read where TorchTPU does it
    assert f'"{TorchTpu.backend}"' in source and "register_backend" in source
    for setting, precision in TPU_PRECISIONS.items():  # what set_float32_matmul_precision becomes on a TPU
        assert f'case "{setting}":' in source and f"Precision.{precision})" in source
    importlib.import_module("torch_tpu._internal.compile")  # where TorchTPU registers its torch.compile backend
    assert TorchTpu.compile_backend in torch._dynamo.list_backends(exclude_tags=())


@pytest.mark.torch_tpu
@needs_torch_tpu
def test_no_chips_is_one_clear_error(image_root, tmp_path):
    assert torch_tpu.tpu_chip_count() == 0
    with pytest.raises(ConfigError, match=r"runtime.device=tpu but TorchTPU found no TPU chip on this machine"):
        create_runtime("tpu")
    status, output = run_job([sys.executable, "train.py", *tiny_overrides(image_root, tmp_path / "run"),
                              "runtime.device=tpu"], tmp_path / "job.log")
    assert status != 0 and "found no TPU chip" in output and "Traceback" not in output, output[-3000:]


@pytest.mark.torch_tpu
@needs_torch_tpu
def test_launch_environment_torchtpu_derives_for_a_pod():
    """TorchTPU's own launch environment (hosts from TPU_WORKER_HOSTNAMES, this host's index from
    JOB_COMPLETION_INDEX) becomes torchrun's node rank and rendezvous."""
    done = subprocess.run([*LAUNCH, "train.py", "--config", "configs/mambaout_small.yaml"], capture_output=True,
                          text=True, timeout=300, cwd=REPO,
                          env={**os.environ, "TPU_VENV": str(Path(sys.prefix)), "TPU_WORKER_HOSTNAMES":
                               "10.0.0.1,10.0.0.2", "JOB_COMPLETION_INDEX": "1", "TORCH_TPU_DEVICES_PER_HOST": "4"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[1:] == [
        "-m", "torch.distributed.run", "--nproc_per_node", "4", "--nnodes", "2", "--node_rank", "1",
        "--master_addr", "10.0.0.1", "--master_port", "29500", "train.py", "--config", "configs/mambaout_small.yaml"]
