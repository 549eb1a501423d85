"""CPU and CUDA on torch.distributed: one process per device, started by ``torchrun`` (env:// rendezvous).

A single process started without ``torchrun`` is a world of one and needs no process group. Under torchrun:
NCCL between GPUs, gloo between CPU processes, the model wrapped in DDP, whose gradient all-reduce runs once
per optimizer step (``gradient_sync`` keeps the accumulation micro-steps local). Rank 0 alone reports: the
``mambaout`` logger of the other ranks shows warnings and errors only.

Failures end the run with a ``DistributedRuntimeError`` that names this rank, its host and the rendezvous
address: a rendezvous that does not complete within ``runtime.dist_timeout_s``, and a collective that fails
because another rank died (its connection closes) or did not answer within that timeout, so a lost rank
stops the others instead of leaving them waiting. (On NCCL, the process group's watchdog may end a timed-out
process itself first, with its own message naming the collective, the rank and the timeout.)
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
import re
import socket
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..config import ConfigError
from .base import DistributedRuntimeError, Runtime, map_tensors


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def rendezvous_address() -> str:
    """``MASTER_ADDR:MASTER_PORT`` as torchrun (or a hand-made launch) exported them."""
    return f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"


# gloo and NCCL report a lost peer or a timeout as a RuntimeError whose text names the backend
# (gloo: "[.../gloo/transport/tcp/pair.cc] Read error ...: Connection reset by peer", "... Timed out waiting
# 1800000ms for recv operation"); newer code paths raise torch.distributed.DistError.
_BACKEND_FAILURE = re.compile(r"gloo|nccl|ProcessGroup", re.IGNORECASE)
_TIMEOUT = re.compile(r"time[d ]?\s*out|timeout", re.IGNORECASE)


def is_backend_failure(error: BaseException) -> bool:
    return isinstance(error, dist.DistError) or (
        isinstance(error, RuntimeError) and bool(_BACKEND_FAILURE.search(str(error))))


def _first_line(error: BaseException, limit: int = 300) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    text = text.rstrip(". ")
    return text if len(text) <= limit else text[:limit] + "..."


def select_kernels(deterministic: bool) -> None:
    """Deterministic kernels (``runtime.deterministic``), or the fastest, whatever this process had set."""
    if deterministic:
        # cuBLAS is bitwise reproducible only with a fixed workspace, read when its first handle is made; torch's
        # deterministic mode refuses matmuls without one. A value the user set stands.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # cuDNN's autotuner times the convolution kernels for each new shape and keeps the fastest: worth it for a
    # training run's fixed shapes, but the timing picks kernels by chance, so never in deterministic runs.
    torch.backends.cudnn.benchmark = not deterministic
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic


def select_matmul_precision(matmul_precision: str) -> None:
    """``runtime.matmul_precision`` for matrix multiplies and, since torch lets cuDNN use TF32 by default, for
    convolutions too: 'highest' is true fp32 everywhere."""
    torch.set_float32_matmul_precision(matmul_precision)
    torch.backends.cudnn.allow_tf32 = matmul_precision != "highest"


class TorchRuntime(Runtime):
    """``kind`` is "cpu" (gloo between processes) or "cuda" (NCCL, one GPU per process)."""

    def __init__(self, kind: str, precision: str = "fp32", timeout_s: int = 1800, deterministic: bool = False,
                 matmul_precision: str = "highest", defer_reads: bool | None = None) -> None:
        """``defer_reads``: read each step's report a step later (default: on CUDA; tests set it on CPU)."""
        self.kind = kind
        self.timeout_s = timeout_s
        self.deterministic = deterministic
        select_kernels(deterministic)  # before any CUDA work: cuBLAS reads its workspace setting once
        select_matmul_precision(matmul_precision)
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        self.peers: list[dict[str, Any]] = []  # (host, device) of every rank, gathered at start
        # a step's report is read one step later on CUDA, so the host queues the next step meanwhile
        self.defer_reads = kind == "cuda" if defer_reads is None else defer_reads
        self._pending: list[tuple[Any, torch.Tensor, Any]] = []
        self._fence_stream = None  # made on first use by ``fenced``
        self._failed = False
        super().__init__(self._select_device(), precision, matmul_precision)
        if precision == "fp16" and kind != "cuda":
            raise ConfigError("train.precision=fp16 needs CUDA (a loss scaler on a GPU); use bf16 or fp32 on "
                             f"{kind}")
        # fp16 gradients underflow without loss scaling; bf16 keeps fp32's exponent and needs none.
        self.scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
        if launched_by_torchrun():
            self._init_process_group(timeout_s)

    def _select_device(self) -> torch.device:
        """This process's device: GPU ``LOCAL_RANK`` on CUDA."""
        if self.kind != "cuda":
            return torch.device("cpu")
        visible = torch.cuda.device_count()
        if self.local_rank >= visible:
            shown = os.environ.get("CUDA_VISIBLE_DEVICES")
            raise DistributedRuntimeError(
                f"{self._where()}: LOCAL_RANK={self.local_rank} but this node sees {visible} GPU(s)"
                f"{f' (CUDA_VISIBLE_DEVICES={shown})' if shown is not None else ''}; start one process per "
                f"GPU: --nproc_per_node={visible} or fewer")
        torch.cuda.set_device(self.local_rank)
        return torch.device("cuda", self.local_rank)

    @property
    def backend(self) -> str:
        return "nccl" if self.kind == "cuda" else "gloo"

    def _where(self) -> str:
        """``rank R/W on HOST`` as the environment states it (before the process group exists, too)."""
        rank, world = os.environ.get("RANK", "0"), os.environ.get("WORLD_SIZE", "1")
        return f"rank {rank}/{world} (local rank {self.local_rank}) on {socket.gethostname()}"

    def _init_process_group(self, timeout_s: int) -> None:
        try:
            dist.init_process_group(self.backend, timeout=datetime.timedelta(seconds=timeout_s),
                                    device_id=self.device if self.kind == "cuda" else None)
        except Exception as error:  # the message must say where the rendezvous failed, not how
            raise DistributedRuntimeError(
                f"{self._where()}: could not join the {self.backend} process group at {rendezvous_address()} "
                f"within runtime.dist_timeout_s={timeout_s}s: {_first_line(error)}. Check that every node uses "
                "the same --rdzv-endpoint (MASTER_ADDR:MASTER_PORT), that this port is open between the nodes, "
                "and that --nnodes x --nproc_per_node matches the processes started."
            ) from error
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        if not self.is_main:  # rank 0 alone reports progress; every rank still shows warnings and errors
            logging.getLogger("mambaout").setLevel(logging.WARNING)
        try:
            self.peers = self._gather_peers()
        except BaseException:
            self._failed = True
            self.shutdown()  # no session() will close the group this constructor opened
            raise

    def _gather_peers(self) -> list[dict[str, Any]]:
        """Where every rank runs (for the manifest), checking that all ranks run the same torch."""
        me = {"rank": self.rank, "host": socket.gethostname(), "device": self.device_name(),
              "torch": torch.__version__}
        try:
            peers = self.gather_objects(me)
        except Exception as error:
            raise DistributedRuntimeError(self._collective_failure(error)) from error
        versions = sorted({peer["torch"] for peer in peers})
        if len(versions) > 1:
            by_host = sorted({(peer["host"], peer["torch"]) for peer in peers})
            raise DistributedRuntimeError(
                f"the ranks run different torch versions ({', '.join(f'{h}: {v}' for h, v in by_host)}); "
                "install the same environment on every node")
        return peers

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def host_shard_ids(self) -> list[int]:
        first = self.rank - self.local_rank  # torchrun numbers a node's processes consecutively
        return list(range(first, min(first + self.local_world_size, self.world_size)))

    @property
    def plans_reads(self) -> bool:
        return self.local_rank == 0

    def device_name(self) -> str:
        if self.kind == "cuda":
            return torch.cuda.get_device_name(self.device)
        return super().device_name()

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        hosts = sorted({peer["host"] for peer in self.peers}) or [info["host"]]
        info.update({
            "backend": dist.get_backend() if dist.is_initialized() else None,
            "nodes": int(os.environ.get("GROUP_WORLD_SIZE", len(hosts))),
            "processes_per_node": self.local_world_size,
            "hosts": hosts,
            "device_names": sorted({peer["device"] for peer in self.peers}) or [info["device_name"]],
            "rendezvous": rendezvous_address() if dist.is_initialized() else None,
            "dist_timeout_s": self.timeout_s,
            "deterministic": self.deterministic,
        })
        return info

    def prepare_model(self, model: nn.Module, channels_last: bool) -> nn.Module:
        model = super().prepare_model(model, channels_last)
        if not self.distributed:
            return model
        device_ids = [self.device.index] if self.kind == "cuda" else None
        # DDP compares a gradient's strides with its bucket's even on size-1 dimensions, where they mean nothing
        # (depthwise conv weights [C, 1, k, k]); the layouts agree, so its performance warning is spurious.
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides",
                                category=UserWarning)
        return DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True)

    def gradient_sync(self, model: nn.Module, enabled: bool) -> contextlib.AbstractContextManager:
        ddp = getattr(model, "_orig_mod", model)  # torch.compile wraps the DDP module
        if enabled or not isinstance(ddp, DistributedDataParallel):
            return contextlib.nullcontext()
        return ddp.no_sync()  # accumulation micro-steps keep their gradients local

    def backward(self, loss: torch.Tensor) -> None:
        if self.scaler is None:
            loss.backward()
        else:
            self.scaler.scale(loss).backward()

    def unscale_and_clip(self, optimizer, params, clip_grad):
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)  # clip and report the true gradient norm
        return super().unscale_and_clip(optimizer, params, clip_grad)

    def step_is_finite(self, loss, grad_norm):
        if self.scaler is not None:  # overflowing fp16 gradients are the scaler's business: it skips them
            return torch.isfinite(loss)
        return super().step_is_finite(loss, grad_norm)

    def wrap_loader(self, loader):
        return _SideStreamPrefetch(loader, self.device) if self.kind == "cuda" else loader

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """On CUDA from pinned memory (pinned here if the loader did not pin it): a copy from pageable memory
        waits for the stream's queued work first, a host sync per batch."""
        if self.kind == "cuda" and tensor.device.type == "cpu" and not tensor.is_pinned():
            tensor = tensor.pin_memory()
        return super().to_device(tensor)

    def fenced(self, work):
        """On CUDA, ``work`` runs with a side stream current: its outputs are allocated from that stream's blocks,
        never from blocks the compute stream freed while its kernels still use them (which a decoder writing
        from a private stream would overwrite). The compute stream then waits for the side stream, and the
        outputs are marked as used there. Events only: the host does not wait."""
        if self.kind != "cuda":
            return work()
        if self._fence_stream is None:
            self._fence_stream = torch.cuda.Stream(self.device)
        compute = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self._fence_stream):
            result = work()
        compute.wait_stream(self._fence_stream)
        map_tensors(result, lambda tensor: tensor.record_stream(compute) if tensor.is_cuda else None)
        return result

    def synchronize(self) -> None:
        if self.kind == "cuda":
            torch.cuda.synchronize(self.device)

    def peak_memory_mib(self) -> float | None:
        if self.kind == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return super().peak_memory_mib()

    def optimizer_step(self, optimizer, finite):
        if self.scaler is None:
            return super().optimizer_step(optimizer, finite)
        # fp16: the scaler skips steps whose gradients overflowed (fused AdamW gets its found_inf); a non-finite
        # loss joins that verdict, and the loss scale then shrinks as for an overflow. The flag must stay 0 or 1:
        # fused AdamW skips only on exactly 1, and overflow plus a non-finite loss (the usual pair) would make 2.
        found_inf = list(self.scaler._found_inf_per_device(optimizer).values())  # filled by unscale_
        torch.maximum(found_inf[0], (~finite).float(), out=found_inf[0])
        applied = torch.stack(found_inf).sum() == 0
        self.scaler.step(optimizer)
        self.scaler.update()
        return applied

    def after_step(self, callback, report):
        if not self.defer_reads:
            return super().after_step(callback, report)
        host, ready = report, None
        if report.is_cuda:
            host = torch.empty(report.shape, dtype=report.dtype, pin_memory=True)
            host.copy_(report, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
        earlier, self._pending = self._pending, [(callback, host, ready)]
        self._run(earlier)

    def read_pending(self) -> None:
        waiting, self._pending = self._pending, []
        self._run(waiting)

    @staticmethod
    def _run(pending) -> None:
        for callback, host, ready in pending:
            if ready is not None:
                ready.synchronize()  # a step ago: done unless the device lags the host by more than a step
            callback(host.tolist())

    def sum_across(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def any_across(self, flags: list[bool]) -> list[bool]:
        if not self.distributed:
            return flags
        values = torch.tensor([int(flag) for flag in flags], device=self.device)
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
        return [bool(v) for v in values.tolist()]

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

    # --- failures -----------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def session(self) -> Iterator[TorchRuntime]:
        """As ``Runtime.session``; a collective that fails (lost rank, timeout) becomes a
        ``DistributedRuntimeError`` that says which rank saw it, where, and what to look at."""
        with super().session():
            try:
                yield self
            except BaseException as error:
                self._failed = True
                if self.distributed and is_backend_failure(error):
                    raise DistributedRuntimeError(self._collective_failure(error)) from error
                raise

    def _collective_failure(self, error: BaseException) -> str:
        if _TIMEOUT.search(str(error)):
            why = (f"no answer within runtime.dist_timeout_s={self.timeout_s}s: another rank stopped or hangs; "
                   "raise the timeout only if some rank legitimately works that long alone")
        else:
            why = "another rank stopped or became unreachable"
        return (f"{self._where()}: a {self.backend} collective failed ({why}); stopping. The first failing rank "
                f"and its error are in that rank's log and in torchrun's failure summary. Backend message: "
                f"{_first_line(error)} [rendezvous {rendezvous_address()}]")

    def shutdown(self) -> None:
        if not dist.is_initialized():
            return
        if self._failed and self.kind == "cuda":
            # A communicator with a lost peer can block a graceful destroy; abort it (it then counts as gone).
            with contextlib.suppress(Exception):
                dist.distributed_c10d._abort_process_group()
        if dist.is_initialized():
            dist.destroy_process_group()


PREFETCHED_FIELDS = ("image", "target")
"""Batch fields copied to the GPU ahead of their step; the others stay on the host, where the loop reads them
(index, bad flags) or sends them itself (small ones)."""


class _SideStreamPrefetch:
    """A loader's batches with ``PREFETCHED_FIELDS`` already on the GPU: the copies of batch n + 1 (from the
    loader's pinned memory) run on a side stream while step n computes, instead of waiting their turn on the
    compute stream. The compute stream waits for a batch's copies before using it, and the copied tensors are
    marked as used there, so the caching allocator keeps them until that work is done."""

    def __init__(self, loader: Any, device: torch.device) -> None:
        self.loader, self.device = loader, device

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        copies = torch.cuda.Stream(self.device)
        batches = iter(self.loader)
        ahead = self._send(next(batches, None), copies)
        while ahead is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_stream(copies)
            for field in PREFETCHED_FIELDS:
                if isinstance(ahead.get(field), torch.Tensor):
                    ahead[field].record_stream(compute)
            batch, ahead = ahead, self._send(next(batches, None), copies)
            yield batch

    def _send(self, batch: dict[str, Any] | None, stream) -> dict[str, Any] | None:
        if batch is None:
            return None
        batch = dict(batch)
        with torch.cuda.stream(stream):
            for field in PREFETCHED_FIELDS:
                if isinstance(batch.get(field), torch.Tensor):
                    batch[field] = batch[field].to(self.device, non_blocking=True)
        return batch
