"""TPU through TorchTPU (PyPI ``torch-tpu``): the torchrun runtime with device ``tpu``, one process per chip.

TorchTPU puts the TPU in PyTorch's third-party device slot, so the step is ``TorchRuntime``'s: DDP over the
``tpu_dist`` backend, bf16 autocast on ``tpu``, checkpoints from host copies, and data keyed on the host as
everywhere (no device random numbers). What differs, and why:

- **Execution.** TorchTPU runs eager ops deferred and fused into small programs (``EAGER_MODE``) rather than one
  launch per op; ``train.compile`` compiles with its ``tpu`` backend.
- **fp32 matmuls.** TPUs multiply fp32 as one bf16 pass unless told otherwise: ``runtime.matmul_precision`` goes
  through ``torch.set_float32_matmul_precision``, which TorchTPU maps onto its precisions (``TPU_PRECISIONS``;
  'highest' = the paper's fp32).
- **Skipping a non-finite step.** TorchTPU ships a fused AdamW kernel; whether it honours ``found_inf`` (as the
  CUDA and CPU kernels do) is checked on the chip at start (``fused_adamw_skips``). Where it does not, the step
  is guarded with selects instead (``Runtime.guarded_optimizer_step``): the same weights, a copy of them more.
- **Reads and copies.** TorchTPU's streams are not usable for copies, so there is no side-stream prefetch and
  no pinned staging: each step's report tensor is kept and read one step later, by which time its step has run.

Every TorchTPU call the runtime makes goes through ``TorchTpu``, so the CPU tests run this very runtime with
that one object replaced (device cpu, backend gloo), and the API-surface test names what a new TorchTPU
release must still provide.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import logging
import warnings
from typing import Any

import torch
from torch import nn

from ..config import ConfigError
from .base import DistributedRuntimeError
from .torch_dist import TorchRuntime

log = logging.getLogger("mambaout")

EAGER_MODE = "DEFER_AND_FUSE"
"""``torch.tpu.EagerMode`` member the run sets: eager ops deferred and fused (TorchTPU's DEFER_NEVER default
launches every op on its own)."""

TPU_PRECISIONS = {"highest": "HIGHEST", "high": "HIGH", "medium": "DEFAULT"}
"""``runtime.matmul_precision`` -> the ``torch.tpu.Precision`` TorchTPU maps it to: HIGHEST is fp32 (6 bf16
passes), HIGH 3 passes, DEFAULT one bf16 pass."""

INSTALL_HINT = ("install TorchTPU on the TPU VM with `pip install -e '.[tpu]'` (torch-tpu and libtpu; README, "
                "'Training on TPU')")


def tpu_chip_count() -> int:
    """TPU devices TorchTPU registered in this process (0 without the package, or on a machine without chips:
    TorchTPU registers ``tpu`` as PyTorch's accelerator only where it finds chips)."""
    accelerator = torch.accelerator.current_accelerator()
    if accelerator is None or accelerator.type != "tpu":
        return 0
    return torch.accelerator.device_count()


class TorchTpu:
    """Every TorchTPU call the runtime makes. Tests replace it with a CPU stand-in that has the same members."""

    device_type = "tpu"
    backend = "tpu_dist"  # torch.distributed backend for TPU tensors (DDP's gradient all-reduce)
    compile_backend = "tpu"

    def __init__(self) -> None:
        if importlib.util.find_spec("torch_tpu") is None:
            raise ConfigError(f"runtime.device=tpu needs TorchTPU, which this environment lacks: {INSTALL_HINT}, or "
                              "use runtime.device=xla (torch_xla) or auto")
        import torch_tpu  # noqa: F401  (torch's backend autoload has normally imported it already)

        if self.chip_count() == 0:
            found = torch.accelerator.current_accelerator()
            raise ConfigError(
                "runtime.device=tpu but TorchTPU found no TPU chip on this machine (PyTorch's accelerator is "
                f"{found.type if found is not None else 'none'}; TorchTPU registers 'tpu' only where libtpu sees "
                "chips, and only with TORCH_DEVICE_BACKEND_AUTOLOAD unset or 1): run on a TPU VM, or use "
                "runtime.device=cpu, cuda or auto")

    def chip_count(self) -> int:
        return tpu_chip_count()

    def device(self, index: int) -> torch.device:
        torch.accelerator.set_device_index(index)
        return torch.device(self.device_type, index)

    def set_eager_mode(self, name: str) -> None:
        with _experimental_api():
            torch.tpu.eager_mode = getattr(torch.tpu.EagerMode, name)

    def device_name(self) -> str:
        with _experimental_api():
            return torch.tpu.get_device_name()

    def synchronize(self) -> None:
        torch.accelerator.synchronize()

    def peak_memory_bytes(self) -> int | None:
        with contextlib.suppress(RuntimeError, NotImplementedError):
            return torch.accelerator.max_memory_allocated()
        return None

    def version(self) -> str:
        return importlib.metadata.version("torch-tpu")


@contextlib.contextmanager
def _experimental_api():
    """TorchTPU warns at every use of an API it marks experimental; the runtime uses them on purpose."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="<TorchTpu/ApiStage/ExperimentalApi/>")
        yield


def fused_adamw_skips(device: torch.device) -> bool:
    """Whether torch's fused AdamW on ``device`` leaves a parameter and its step count untouched when given
    ``found_inf`` = 1 and updates them when given 0 (what ``Runtime.optimizer_step`` relies on). A tiny step on
    the device; any failure counts as no."""
    try:
        param = torch.nn.Parameter(torch.ones(4, device=device))
        param.grad = torch.ones(4, device=device)
        optimizer = torch.optim.AdamW([param], lr=0.1, fused=True)
        results = []
        for found_inf in (1.0, 0.0):
            optimizer.grad_scale, optimizer.found_inf = None, torch.full((), found_inf, device=device)
            optimizer.step()
            results.append((param.detach().cpu().tolist(), float(optimizer.state[param]["step"])))
        skipped, applied = results
        return skipped == ([1.0] * 4, 0.0) and applied[1] == 1.0 and all(v < 1.0 for v in applied[0])
    except Exception as error:  # a kernel TorchTPU lacks or rejects: the guarded step works everywhere
        log.warning("fused AdamW's found_inf check failed on %s (%s: %s); steps are guarded with selects",
                    device, type(error).__name__, str(error).splitlines()[0] if str(error) else "")
        return False


class TorchTpuRuntime(TorchRuntime):
    """``runtime.device=tpu``: ``TorchRuntime`` on the chip ``LOCAL_RANK`` (each process may also see just
    its own chip, as index 0), with TorchTPU's backend, execution mode and compiler."""

    def __init__(self, precision: str = "fp32", timeout_s: int = 1800, deterministic: bool = False,
                 matmul_precision: str = "highest", api: TorchTpu | None = None) -> None:
        self.api = api if api is not None else TorchTpu()
        self.api.set_eager_mode(EAGER_MODE)  # before the first op on the device
        super().__init__("tpu", precision, timeout_s, deterministic, matmul_precision, defer_reads=True)
        self.skips_in_kernel = fused_adamw_skips(self.device)

    def _select_device(self) -> torch.device:
        chips = self.api.chip_count()
        if chips == 1:  # a process that sees only its own chip
            return self.api.device(0)
        if self.local_rank >= chips:
            raise DistributedRuntimeError(
                f"{self._where()}: LOCAL_RANK={self.local_rank} but this host has {chips} TPU chips; start one "
                f"process per chip: --nproc_per_node={chips} or fewer")
        return self.api.device(self.local_rank)

    @property
    def backend(self) -> str:
        return self.api.backend

    def device_name(self) -> str:
        return self.api.device_name()

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info.update({
            "torch_tpu": self.api.version(),
            "eager_mode": EAGER_MODE,
            "tpu_precision": TPU_PRECISIONS[self.matmul_precision],
            "skip_nonfinite_step": "fused AdamW found_inf" if self.skips_in_kernel else "guarded (selects)",
        })
        return info

    def compile(self, model: nn.Module) -> nn.Module:
        return torch.compile(model, backend=self.api.compile_backend)

    def optimizer_step(self, optimizer, finite):
        if self.skips_in_kernel:
            return super().optimizer_step(optimizer, finite)
        return self.guarded_optimizer_step(optimizer, finite)

    def synchronize(self) -> None:
        self.api.synchronize()

    def peak_memory_mib(self) -> float | None:
        peak = self.api.peak_memory_bytes()
        return None if peak is None else peak / 2**20
