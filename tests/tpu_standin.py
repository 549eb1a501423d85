"""A CPU stand-in for TorchTPU: ``mambaout.runtime.torch_tpu.TorchTpu`` with its device calls answered on the CPU
(device cpu, backend gloo), so the tests run the tpu runtime itself, and nothing in them pretends a TPU ran.

``install()`` puts it in place in this process; ``env()`` is the environment under which ``train.py``
subprocesses (torchrun's workers too) install it themselves (``tpu_site/sitecustomize.py``).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from mambaout.runtime import torch_tpu

SITE = Path(__file__).parent / "tpu_site"


class CpuStandIn(torch_tpu.TorchTpu):
    device_type = "cpu"
    backend = "gloo"
    compile_backend = "inductor"

    def __init__(self, chips: int = 1) -> None:  # no TorchTPU to check for
        self.chips = chips
        self.calls: list[tuple] = []

    def chip_count(self) -> int:
        return self.chips

    def device(self, index: int) -> torch.device:
        self.calls.append(("device", index))
        return torch.device("cpu")

    def set_eager_mode(self, name: str) -> None:
        self.calls.append(("eager_mode", name))

    def device_name(self) -> str:
        return "cpu (TorchTPU stand-in)"

    def synchronize(self) -> None:
        self.calls.append(("synchronize",))

    def peak_memory_bytes(self) -> int | None:
        return None

    def version(self) -> str:
        return "stand-in"


def install(setattr_=setattr) -> None:
    setattr_(torch_tpu, "TorchTpu", CpuStandIn)


def env() -> dict[str, str]:
    return {"PYTHONPATH": os.pathsep.join([str(SITE), *filter(None, [os.environ.get("PYTHONPATH")])])}
