"""Device runtimes behind one interface (see ``base.Runtime``): cpu and cuda on torch.distributed, xla on
torch_xla. ``create_runtime`` is the only place that chooses between them."""
from __future__ import annotations

import os

import torch

from .base import Runtime
from .torch_dist import DistributedRuntimeError, TorchRuntime

DEVICES = ("auto", "cpu", "cuda", "xla")


def resolve_device(device: str) -> str:
    """``auto`` picks xla when ``PJRT_DEVICE`` is set, else cuda when available, else cpu."""
    if device != "auto":
        return device
    if os.environ.get("PJRT_DEVICE"):
        return "xla"
    return "cuda" if torch.cuda.is_available() else "cpu"


def create_runtime(device: str = "auto", precision: str = "fp32", timeout_s: int = 1800) -> Runtime:
    kind = resolve_device(device)
    if kind == "xla":
        raise NotImplementedError("runtime.device=xla is not available yet (the torch_xla runtime is tracked "
                                  "in its own issue); use runtime.device=cpu or cuda")
    if kind == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("runtime.device=cuda but torch sees no CUDA device; use runtime.device=cpu or auto")
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"runtime.device must be one of {DEVICES}, got {device!r}")
    return TorchRuntime(kind, precision, timeout_s)


__all__ = ["DEVICES", "DistributedRuntimeError", "Runtime", "TorchRuntime", "create_runtime", "resolve_device"]
