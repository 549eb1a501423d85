"""The runtime interface: everything the training loop needs from a device and its process group.

The loop calls these methods and never asks which device it runs on. A runtime feeds ``num_shards``
data shards in all (one per process on torch.distributed, one per device under XLA SPMD), of which this
process feeds ``shard_ids``.
"""
from __future__ import annotations

import contextlib
import resource
import socket
from typing import Any, Callable, Iterator

import torch
from torch import nn


def map_tensors(value: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """``value`` (nested dicts, lists, tuples) with ``fn`` applied to each of its tensors."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, dict):
        return type(value)((k, map_tensors(v, fn)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(map_tensors(v, fn) for v in value)
    return value


def _on_device_state(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """The optimizer state tensors of ``param`` that live with it on its device."""
    return [(key, value) for key, value in optimizer.state[param].items()
            if isinstance(value, torch.Tensor) and value.device == param.device]


def _host_step_rewind(optimizer: torch.optim.Optimizer) -> Callable[[list[float]], None]:
    """The host side of a guarded step, run once its ``finite`` flag is read: a step that was not applied sets
    the step counters kept on the host (Adam's bias correction) back by one."""
    def rewind(values: list[float]) -> None:
        if values[0]:
            return
        for param, state in optimizer.state.items():
            step = state.get("step")
            if isinstance(step, torch.Tensor) and step.device != param.device:
                step -= 1
    return rewind


class DistributedRuntimeError(RuntimeError):
    """Rendezvous or collective failure, with the address and rank that a user needs to fix it."""


class Runtime:
    """Base class with the single-process behaviour; subclasses override what differs."""

    kind = "cpu"
    fixed_shapes = False  # True where every batch must have the same shape (compiled graphs: XLA)

    def __init__(self, device: torch.device, precision: str = "fp32", matmul_precision: str = "highest") -> None:
        self.device = device
        self.precision = precision
        self.matmul_precision = matmul_precision
        self.rank = 0
        self.world_size = 1
        self.memory_format = torch.contiguous_format

    # --- topology -------------------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        """Only the main process writes logs, metrics and checkpoints."""
        return self.rank == 0

    @property
    def num_shards(self) -> int:
        return self.world_size

    @property
    def shard_ids(self) -> list[int]:
        return [self.rank]

    @property
    def host_shard_ids(self) -> list[int]:
        """The shards every process of this host feeds: what the host's read plan covers."""
        return self.shard_ids

    @property
    def plans_reads(self) -> bool:
        """Whether this process plans its host's reads (one per host; the others read the host's cache)."""
        return True

    @property
    def batch_shard_ids(self) -> list[int]:
        """The shards whose rows a batch on the device holds, in row order: this process's own."""
        return self.shard_ids

    def describe(self) -> dict[str, Any]:
        """What the manifest records about where the run ran."""
        return {
            "device": self.kind,
            "device_name": self.device_name(),
            "world_size": self.world_size,
            "num_shards": self.num_shards,
            "precision": self.precision,
            "matmul_precision": self.matmul_precision,
            "host": socket.gethostname(),
        }

    def device_name(self) -> str:
        return "cpu"

    # --- model and step -------------------------------------------------------------------------------
    def prepare_model(self, model: nn.Module, channels_last: bool) -> nn.Module:
        """Moves the model to the device; returns the module to train (a wrapper where one is needed)."""
        model.to(self.device)
        if channels_last:
            self.memory_format = torch.channels_last
            model.to(memory_format=self.memory_format)
        return model

    def gradient_sync(self, model: nn.Module, enabled: bool) -> contextlib.AbstractContextManager:
        """Context for one micro-step's forward/backward; gradients are reduced across shards only when
        ``enabled`` (the last micro-step of an optimizer step)."""
        return contextlib.nullcontext()

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def unscale_and_clip(self, optimizer: torch.optim.Optimizer, params: list[torch.Tensor],
                         clip_grad: float | None) -> torch.Tensor:
        """The total gradient norm (before clipping), gradients clipped to ``clip_grad`` when given."""
        if clip_grad is None:
            return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        return torch.nn.utils.clip_grad_norm_(params, clip_grad)

    def optimizer_step(self, optimizer: torch.optim.Optimizer, finite: torch.Tensor) -> torch.Tensor:
        """Applies the step's update where ``finite`` (a device bool, the same on every rank) holds, and leaves
        weights and optimizer state exactly as they were where not, without reading it on the host: torch's
        fused AdamW takes the flag as its ``found_inf`` (the kernel then returns at once and undoes its step
        count). Returns the device bool that says whether the update was applied (for the EMA)."""
        if not getattr(optimizer, "_step_supports_amp_scaling", False):
            raise TypeError(f"{type(optimizer).__name__} cannot skip a step on the device; train with "
                            "mambaout.optim.create_optimizer's fused AdamW")
        optimizer.grad_scale, optimizer.found_inf = None, (~finite).float()
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale, optimizer.found_inf
        return finite

    def guarded_optimizer_step(self, optimizer: torch.optim.Optimizer, finite: torch.Tensor) -> torch.Tensor:
        """``optimizer_step`` for devices whose optimizer cannot skip a step by itself: ``optimizer.step()``,
        then parameters and the optimizer state on their device selected back where ``finite`` is False
        (``torch.where``: no host sync), and step counters kept on the host set back once ``finite`` is read
        (``after_step``). Costs a copy of the weights and optimizer state (in a lazy graph, only selects)."""
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        old_params = [p.detach().clone() for p in params]
        old_states = [{key: value.detach().clone() for key, value in _on_device_state(optimizer, p)}
                      for p in params]
        optimizer.step()
        with torch.no_grad():
            for param, old_param, old_state in zip(params, old_params, old_states):
                param.copy_(torch.where(finite, param, old_param))
                for key, value in _on_device_state(optimizer, param):
                    # state created by this very step (the first one) falls back to zeros
                    old = old_state.get(key)
                    value.copy_(torch.where(finite, value, old if old is not None else torch.zeros_like(value)))
        self.after_step(_host_step_rewind(optimizer), finite.float().reshape(1))
        return finite

    def compile(self, model: nn.Module) -> nn.Module:
        """``train.compile``: the model under torch.compile with this device's backend."""
        return torch.compile(model)

    def unwrap(self, model: nn.Module) -> nn.Module:
        """The user's module inside the wrappers that ``prepare_model`` or torch.compile added."""
        while hasattr(model, "module") or hasattr(model, "_orig_mod"):
            model = getattr(model, "module", None) or model._orig_mod
        return model

    def mark_step(self) -> None:
        """Cuts the lazy graph after a micro-step (XLA); nothing to do on eager devices."""

    def synchronize(self) -> None:
        """Waits until the device has run everything queued (for timing); the CPU runs synchronously."""

    def peak_memory_mib(self) -> float | None:
        """The most memory the training has held so far, in MiB: on a CPU the process's peak resident memory (a
        resumed run counts from its restart), on an accelerator its allocator's peak; None where unknown."""
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux

    # --- data -----------------------------------------------------------------------------------------
    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """A batch tensor (batch dimension first) on the device; under SPMD, sharded over the batch."""
        return tensor.to(self.device, non_blocking=True)

    def batch_to_device(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (in the model's memory format) and targets of a loader batch, on the device."""
        images = self.to_device(batch["image"]).contiguous(memory_format=self.memory_format)
        return images, self.to_device(batch["target"])

    def host_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """The rows of a batch tensor on the device that belong to this process's images, on the host."""
        return tensor.cpu()

    def wrap_loader(self, loader: Any) -> Any:
        """Hook for device-side prefetching (XLA's MpDeviceLoader); eager devices use the loader as is."""
        return loader

    def fenced(self, work: Callable[[], Any]) -> Any:
        """``work()``, whose kernels may write its output tensors from a stream of their own that does not wait
        for the queued step (nvJPEG's decoder: pytorch/vision#9606), fenced from that step's memory. Devices
        that run one stream need nothing."""
        return work()

    # --- collectives ----------------------------------------------------------------------------------
    def sum_across(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum of ``tensor`` over all processes (in place where possible); returns the result."""
        return tensor

    def any_across(self, flags: list[bool]) -> list[bool]:
        """Each flag OR-ed over all processes, so every rank takes the same decision (stop, skip)."""
        return flags

    def step_is_finite(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
        """A device tensor: True when this step's loss and gradient norm are finite."""
        return torch.isfinite(loss) & torch.isfinite(grad_norm)

    def agree(self, step_finite: torch.Tensor, stop_requested: bool, loss: torch.Tensor, grad_norm: torch.Tensor,
              bad_images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(finite, report): whether to take the optimizer step, a device bool that is the same on every rank (a
        step that is not finite on some rank is taken nowhere), and what the host learns of the step as one
        device vector: non-finite ranks, stop requests, the loss averaged over the processes,
        the gradient norm (the same everywhere once gradients are reduced), unreadable images summed over the
        processes. The sums travel in one small all-reduce; nothing is read on the host here."""
        # torch.full takes the flag as a kernel argument: a host-made tensor would be a synchronous copy on CUDA
        stop = torch.full((), float(stop_requested), dtype=torch.float64, device=loss.device)
        shared = self.sum_across(torch.stack([(~step_finite).double(), stop, loss.detach().double(),
                                              bad_images.double()]))
        report = torch.stack([shared[0], shared[1], shared[2] / self.world_size, grad_norm.detach().double(),
                              shared[3]])
        return shared[0] == 0, report

    def after_step(self, callback: Callable[[list[float]], None], report: torch.Tensor) -> None:
        """Calls ``callback`` with the host values of a step's ``report``. Here at once; CUDA reads them a step
        later from pinned memory, XLA once the step's graph has run (a step closure), so the host never waits
        for the device inside a step. ``read_pending`` runs whatever is still waiting."""
        callback(report.tolist())

    def read_pending(self) -> None:
        """Runs the ``after_step`` callbacks not run yet, in step order: before a checkpoint, an evaluation or
        the end of training, so every rank has the same host state and stops at the same step."""

    def barrier(self) -> None:
        pass

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every process's ``obj``, in rank order, on every process."""
        return [obj]

    def assert_same(self, what: str, value: Any) -> None:
        """Raises on every process unless all hold the same ``value`` (e.g. the step a run resumes from: a
        run folder that one node does not see would otherwise split the ranks silently)."""
        values = self.gather_objects(value)
        if any(v != values[0] for v in values):
            shown = "; ".join(f"rank {rank}: {v!r}" for rank, v in enumerate(values))
            raise DistributedRuntimeError(
                f"the processes disagree on {what} ({shown}); every node must see the same files (data.root, "
                "train.output_dir on a shared filesystem) and run the same command")

    # --- state ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Runtime state that a checkpoint must carry (the fp16 loss scale)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def to_cpu_state(self, state: Any) -> Any:
        """``state`` with host copies of its device tensors, before saving: a checkpoint then loads with a plain
        ``torch.load`` on any machine, a CPU-only one included."""
        return map_tensors(state, lambda t: t if t.device.type == "cpu" else t.detach().cpu())

    def shutdown(self) -> None:
        pass

    @contextlib.contextmanager
    def session(self) -> Iterator["Runtime"]:
        """``with runtime.session():`` guarantees ``shutdown`` even when the run fails."""
        try:
            yield self
        finally:
            self.shutdown()
