"""Device runtimes behind one interface (see ``base.Runtime``): cpu and cuda on torch.distributed, tpu on
torch.distributed through TorchTPU (``torch_tpu.TorchTpuRuntime``), xla on torch_xla (``xla.XlaRuntime``, imported
only when chosen). ``create_runtime`` is the only place that chooses between them."""
from __future__ import annotations

import importlib.util
import os

import torch

from ..config import ConfigError
from .base import DistributedRuntimeError, Runtime
from .torch_dist import TorchRuntime
from .torch_tpu import TorchTpuRuntime, tpu_chip_count

DEVICES = ("auto", "cpu", "cuda", "tpu", "xla")


def resolve_device(device: str) -> str:
    """``auto`` picks xla when ``PJRT_DEVICE`` is set, else tpu when TorchTPU reports chips, else cuda when
    available, else cpu."""
    if device != "auto":
        return device
    if os.environ.get("PJRT_DEVICE"):
        return "xla"
    if tpu_chip_count():
        return "tpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def create_runtime(device: str = "auto", precision: str = "fp32", timeout_s: int = 1800,
                   deterministic: bool = False, matmul_precision: str = "highest") -> Runtime:
    """``deterministic`` selects deterministic kernels on cpu, cuda and tpu (``TorchRuntime``); XLA ignores it.
    ``matmul_precision``: ``runtime.matmul_precision``."""
    kind = resolve_device(device)
    if kind == "xla":
        if importlib.util.find_spec("torch_xla") is None:
            raise ConfigError("runtime.device=xla needs torch_xla, which this environment lacks; create its "
                              "environment with `bash scripts/setup_xla_env.sh` (README, 'Training on TPU')")
        from .xla import XlaRuntime  # the only import of torch_xla

        return XlaRuntime(precision, timeout_s, matmul_precision=matmul_precision)
    if kind == "tpu":
        return TorchTpuRuntime(precision, timeout_s, deterministic, matmul_precision)
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError("runtime.device=cuda but torch sees no CUDA device; use runtime.device=cpu or auto")
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"runtime.device must be one of {DEVICES}, got {device!r}")
    return TorchRuntime(kind, precision, timeout_s, deterministic, matmul_precision)


def runtime_from_config(cfg) -> Runtime:
    """The runtime a resolved config asks for (``runtime.*`` and ``train.precision``)."""
    settings = cfg.runtime
    return create_runtime(settings.device, cfg.train.precision, settings.dist_timeout_s, settings.deterministic,
                          settings.matmul_precision)


__all__ = ["DEVICES", "DistributedRuntimeError", "Runtime", "TorchRuntime", "TorchTpuRuntime", "create_runtime",
           "resolve_device", "runtime_from_config"]
