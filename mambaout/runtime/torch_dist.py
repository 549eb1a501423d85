"""CPU and CUDA on torch.distributed: one process per device, started by ``torchrun`` (env:// rendezvous).

A single process started without ``torchrun`` is a world of one and needs no process group.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .base import Runtime


class DistributedRuntimeError(RuntimeError):
    """Rendezvous or collective failure, with the address and rank that a user needs to fix it."""


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


class TorchRuntime(Runtime):
    """``kind`` is "cpu" (gloo between processes) or "cuda" (NCCL, one GPU per process)."""

    def __init__(self, kind: str, precision: str = "fp32", timeout_s: int = 1800) -> None:
        self.kind = kind
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if kind == "cuda":
            torch.cuda.set_device(local_rank)
            device = torch.device("cuda", local_rank)
        else:
            device = torch.device("cpu")
        super().__init__(device, precision)
        if precision == "fp16" and kind != "cuda":
            raise ValueError("train.precision=fp16 needs CUDA (a loss scaler on a GPU); use bf16 or fp32 on "
                             f"{kind}")
        # fp16 gradients underflow without loss scaling; bf16 keeps fp32's exponent and needs none.
        self.scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
        if launched_by_torchrun():
            self._init_process_group(timeout_s)

    def _init_process_group(self, timeout_s: int) -> None:
        backend = "nccl" if self.kind == "cuda" else "gloo"
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        address = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        try:
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s),
                                    device_id=self.device if self.kind == "cuda" else None)
        except Exception as error:  # the message must say where the rendezvous failed, not how
            raise DistributedRuntimeError(
                f"rank {rank}/{world}: could not join the {backend} process group at {address}: {error}. "
                "Check that every node uses the same --rdzv-endpoint/MASTER_ADDR:MASTER_PORT, that the port is "
                "open between nodes, and that --nnodes x --nproc_per_node matches the processes started."
            ) from error
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def device_name(self) -> str:
        if self.kind == "cuda":
            return torch.cuda.get_device_name(self.device)
        return super().device_name()

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info["backend"] = dist.get_backend() if dist.is_initialized() else None
        info["nodes"] = int(os.environ.get("GROUP_WORLD_SIZE", os.environ.get("NNODES", 1)))
        return info

    def prepare_model(self, model: nn.Module, channels_last: bool) -> nn.Module:
        model = super().prepare_model(model, channels_last)
        if not self.distributed:
            return model
        device_ids = [self.device.index] if self.kind == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True)

    def gradient_sync(self, model: nn.Module, enabled: bool) -> contextlib.AbstractContextManager:
        if enabled or not isinstance(model, DistributedDataParallel):
            return contextlib.nullcontext()
        return model.no_sync()  # accumulation micro-steps keep their gradients local

    def seed_device_rng(self, seed: int) -> None:
        torch.manual_seed(seed)  # also seeds every CUDA device

    def backward(self, loss: torch.Tensor) -> None:
        if self.scaler is None:
            loss.backward()
        else:
            self.scaler.scale(loss).backward()

    def optimizer_step(self, optimizer, params, clip_grad):
        if self.scaler is None:
            return super().optimizer_step(optimizer, params, clip_grad)
        self.scaler.unscale_(optimizer)
        grads = [p.grad for p in params if p.grad is not None]
        grad_norm = (torch.nn.utils.get_total_norm(grads) if clip_grad is None
                     else torch.nn.utils.clip_grad_norm_(params, clip_grad))
        self.scaler.step(optimizer)  # skips the step when the scaled gradients overflowed
        self.scaler.update()
        return grad_norm

    def sum_across(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_true(self, flag: bool) -> bool:
        if not self.distributed:
            return flag
        value = torch.tensor(int(flag), device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
        return bool(value.item())

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def gather_objects(self, obj: Any) -> list[Any]:
        if not self.distributed:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def state_dict(self) -> dict[str, Any]:
        return {"scaler": self.scaler.state_dict()} if self.scaler is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
