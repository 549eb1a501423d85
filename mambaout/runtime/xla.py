"""XLA through torch_xla (PJRT): TPU VMs and pod slices, or the XLA CPU device in tests.

SPMD data parallel: one process per host drives every device of that host. All devices form a
``('data', 'model')`` mesh of shape ``(devices, 1)``; the batch dimension of each micro-step's input is
sharded over ``'data'`` and parameters and optimizer state are replicated, so the partitioner turns the
single-device program into data parallelism with the gradient all-reduce inside the compiled graph.
In the batch arithmetic of ``docs/DESIGN.md`` every device is a data shard: ``num_shards`` is the device
count of the whole slice and ``shard_ids`` are the devices this host feeds, so the sampler yields one
batch of ``len(shard_ids)`` concatenated micro-batches per accumulation step.

Compiled graphs need fixed shapes: training micro-batches are always full (the sampler drops the last
incomplete global batch) and evaluation batches are padded to full size with rows the evaluator masks
out (``fixed_shapes``). Nothing here reads a device value inside a step: logging goes through step
closures (``after_step``), which run once the step's graph has executed.

``MAMBAOUT_XLA_SPMD=0`` runs without SPMD on one device (debugging). ``MAMBAOUT_XLA_CACHE`` sets the folder
of the persistent compilation cache (default ``~/.cache/mambaout/xla``; ``off`` disables it); the cache is
used on TPU only, since XLA's CPU client cannot read its entries back.

torch_xla is imported only by this module, so the rest of the project runs without it.
"""
from __future__ import annotations

import collections
import contextlib
import datetime
import logging
import os
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from .base import DistributedRuntimeError, Runtime

log = logging.getLogger("mambaout")

DEVICE_FIELD_RANKS = (("image", 4), ("target", 1))
DEVICE_FIELDS = tuple(field for field, _ in DEVICE_FIELD_RANKS)
"""Batch fields that the loader sends to the device ahead of the step; the others (index, bad, a tensor
pipeline's plans) stay on the host, where the loop reads them without a device-to-host transfer."""


def _env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() not in ("0", "false", "no", "off")


class XlaRuntime(Runtime):
    kind = "xla"
    fixed_shapes = True

    def __init__(self, precision: str = "fp32", timeout_s: int = 1800, spmd: bool | None = None,
                 matmul_precision: str = "highest") -> None:
        if precision == "fp16":
            raise ValueError("train.precision=fp16 is not supported on XLA (it needs a loss scaler); use bf16, "
                             "which TPUs compute natively, or fp32")
        import torch_xla
        import torch_xla.core.xla_model as xm
        import torch_xla.runtime as xr

        self._torch_xla, self._xm, self._xr = torch_xla, xm, xr
        self.spmd = _env_flag("MAMBAOUT_XLA_SPMD", True) if spmd is None else spmd
        self.cache_dir = self._init_cache()
        if self.spmd:
            xr.use_spmd()  # before any tensor reaches the device
        super().__init__(torch_xla.device(), precision, matmul_precision)
        self._select_matmul_precision(matmul_precision)
        self.rank, self.world_size = xr.process_index(), xr.process_count()  # processes = hosts
        self.memory_format = torch.contiguous_format  # XLA chooses layouts itself
        self.mesh = None
        self._batch_specs: dict[int, Any] = {}  # tensor rank -> its sharding over the batch dimension
        self._owns_host_group = False
        if not self.is_main:  # worker 0 alone reports progress; every host still shows warnings and errors
            log.setLevel(logging.WARNING)
        if self.spmd:
            self._init_mesh()
            if self.world_size > 1:
                self._init_host_group(timeout_s)
        elif self.world_size > 1:
            raise DistributedRuntimeError("MAMBAOUT_XLA_SPMD=0 runs on one device of one host; unset it to train "
                                          f"on the {self.world_size} hosts of this slice")
        elif xr.addressable_runtime_device_count() > 1:
            log.warning("MAMBAOUT_XLA_SPMD=0: training on 1 of the %d devices of this host",
                        xr.addressable_runtime_device_count())

    # --- setup ----------------------------------------------------------------------------------------
    def _init_cache(self) -> str | None:
        """The persistent compilation cache (TPU only): a restarted or resumed run skips recompiling."""
        device_type = os.environ.get("PJRT_DEVICE", "").upper()
        setting = os.environ.get("MAMBAOUT_XLA_CACHE", "")
        if device_type in ("", "CPU") or setting.lower() in ("off", "0", "none"):
            return None
        if self._torch_xla._XLAC._xla_computation_cache_is_initialized():
            return os.environ.get("XLA_PERSISTENT_CACHE_PATH")
        path = os.path.expanduser(setting or os.path.join("~", ".cache", "mambaout", "xla"))
        os.makedirs(path, exist_ok=True)
        self._xr.initialize_cache(path, readonly=False)
        return path

    def _select_matmul_precision(self, matmul_precision: str) -> None:
        """fp32 matrix multiplies on TPUs: 'highest' 6 bf16 passes (~fp32), 'high' 3, 'medium' 1 (XLA's
        'default'). Set only when it changes: torch_xla warns at every setting."""
        import torch_xla.backends

        wanted = {"highest": "highest", "high": "high", "medium": "default"}[matmul_precision]
        if torch_xla.backends.get_mat_mul_precision() != wanted:
            torch_xla.backends.set_mat_mul_precision(wanted)

    def _init_mesh(self) -> None:
        import torch_xla.distributed.spmd as xs

        self._check_device_order()
        devices = self._xr.global_runtime_device_count()
        self.mesh = xs.Mesh(np.arange(devices), (devices, 1), ("data", "model"))
        xs.set_global_mesh(self.mesh)

    def _check_device_order(self) -> None:
        """The batch arithmetic assumes that host h drives the global devices h * n .. h * n + n - 1 (n devices a
        host) in that order: its micro-batches are those of these shards, and its part of a global batch lands
        on them. A slice that numbers its devices otherwise would train on mismatched rows, so it stops here."""
        names = self._torch_xla._XLAC._xla_get_runtime_devices()
        local = [int(name.rsplit(":", 1)[-1]) for name in names]
        if local != self.shard_ids:
            raise DistributedRuntimeError(
                f"host {self.rank}/{self.world_size} drives the XLA devices {names}, but the data sharding assumes "
                f"devices {self.shard_ids} (host-major order); this slice's device numbering is not supported "
                "(set MAMBAOUT_XLA_SPMD=0 to train on one device, and report the slice type)")

    def _batch_spec(self, rank: int) -> Any:
        """The sharding of a batch tensor of ``rank`` dimensions: its first dimension over ``'data'``."""
        if rank not in self._batch_specs:
            import torch_xla.distributed.spmd as xs

            devices = self._xr.global_runtime_device_count()
            # A 1-d spec needs a 1-d view of the mesh (the same devices in the same order): torch_xla 2.9 cannot
            # send a 1-d tensor with a spec that leaves the 'model' axis out.
            mesh = xs.Mesh(np.arange(devices), (devices,), ("data",)) if rank == 1 else self.mesh
            # Each host loads only its own micro-batches: with several hosts the global batch is assembled
            # from the hosts' parts (minibatch) in process order, host h holding 'data' rows of its devices.
            self._batch_specs[rank] = xs.ShardingSpec(mesh, ("data",) + (None,) * (rank - 1),
                                                      minibatch=self.world_size > 1)
        return self._batch_specs[rank]

    def _init_host_group(self, timeout_s: int) -> None:
        """A gloo group between the hosts for the few host-side collectives (objects, flags, barrier)."""
        import torch.distributed as dist

        if dist.is_initialized():
            return
        port = os.environ.get("MASTER_PORT", "12355")
        try:
            address = os.environ.get("MASTER_ADDR") or self._xr.get_master_ip()
            dist.init_process_group("gloo", init_method=f"tcp://{address}:{port}", rank=self.rank,
                                    world_size=self.world_size, timeout=datetime.timedelta(seconds=timeout_s))
        except Exception as error:  # the message must say where, not how
            raise DistributedRuntimeError(
                f"host {self.rank}/{self.world_size}: could not join the hosts' gloo group at "
                f"{os.environ.get('MASTER_ADDR', 'worker 0')}:{port} within runtime.dist_timeout_s={timeout_s}s: "
                f"{str(error).splitlines()[0] if str(error) else type(error).__name__}. Start the same command "
                "on every worker (--worker=all) and check that MASTER_PORT is open between them.") from error
        self._owns_host_group = True

    # --- topology -------------------------------------------------------------------------------------
    @property
    def num_shards(self) -> int:
        return self._xr.global_runtime_device_count() if self.spmd else 1

    @property
    def shard_ids(self) -> list[int]:
        if not self.spmd:
            return [0]
        local = self._xr.addressable_runtime_device_count()
        return list(range(self.rank * local, (self.rank + 1) * local))

    @property
    def batch_shard_ids(self) -> list[int]:
        """Under SPMD every host's rows: the hosts' parts form one global batch (host by host, each host's in the
        order of its devices), and every host traces the same program over it."""
        return list(range(self.num_shards)) if self.spmd else [0]

    def device_name(self) -> str:
        """``TPU v4-32`` on a TPU VM (its accelerator type), else the PJRT device type."""
        accelerator = os.environ.get("TPU_ACCELERATOR_TYPE") if self._xr.device_type() == "TPU" else None
        return f"{self._xr.device_type()} {accelerator}" if accelerator else self._xr.device_type()

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info.update({"pjrt_device": self._xr.device_type(), "spmd": self.spmd,
                     "devices_per_host": self._xr.addressable_runtime_device_count(),
                     "mesh": {"data": self.num_shards, "model": 1} if self.spmd else None,
                     "compilation_cache": self.cache_dir,
                     "torch_xla": getattr(self._torch_xla, "__version__", None)})
        return info

    # --- model and step -------------------------------------------------------------------------------
    def prepare_model(self, model: nn.Module, channels_last: bool) -> nn.Module:
        """Moves the model to the device; under SPMD parameters without a sharding annotation are replicated
        (and so is the optimizer state created from them). ``channels_last`` has no meaning on XLA."""
        model.to(self.device)
        return model

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast("xla", dtype=torch.bfloat16)

    def agree(self, step_finite, stop_requested, loss, grad_norm, bad_images):
        """Under SPMD the loss and the count are already over every host's rows, and ``step_finite`` is the same
        on every device; the hosts OR their stop flags over gloo (host values: no device read). The stop flag
        travels to the device as data, so its value never changes the compiled graph."""
        stop = torch.tensor([float(self.any_across([stop_requested])[0])]).to(self.device)
        report = torch.cat([(~step_finite).float().reshape(1), stop, loss.detach().float().reshape(1),
                            grad_norm.detach().float().reshape(1), bad_images.float().reshape(1)])
        return step_finite, report

    def optimizer_step(self, optimizer, finite):
        """XLA has no fused AdamW: the guarded step (selects in the graph, where the copies of the old values
        cost nothing), with the host step counters set back once the graph has run."""
        return self.guarded_optimizer_step(optimizer, finite)

    def mark_step(self) -> None:
        self._torch_xla.sync()

    def synchronize(self) -> None:
        self.mark_step()
        self._xm.wait_device_ops()

    def peak_memory_mib(self) -> float | None:
        """The device's peak from PJRT's memory statistics (TPU); XLA's CPU client keeps none."""
        if self._xr.device_type() == "CPU":
            return None
        peak = self._xm.get_memory_info(self.device).get("peak_bytes_used")
        return None if peak is None else peak / 2**20

    # --- data -----------------------------------------------------------------------------------------
    def wrap_loader(self, loader: Any) -> Any:
        if isinstance(loader, _DeviceLoader):
            return loader
        return _DeviceLoader(loader, self)

    def host_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """This host's rows of a global batch tensor (the outputs of the images it loaded), read from the shards
        on its own devices: on a multi-host slice the other hosts' shards are not readable here."""
        if not self.spmd:
            return tensor.cpu()
        from torch_xla.distributed.spmd.xla_sharding import wrap_as_sharded_tensor

        rows = tensor.clone()
        self._batch_spec(rows.dim()).apply(rows)  # sharded over the batch whatever the partitioner chose
        self.synchronize()  # the shards exist once the graph has run
        shards = {shard.indices[0].start: shard.data for shard in wrap_as_sharded_tensor(rows).local_shards}
        return torch.cat([shards[start] for start in sorted(shards)])

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.device.type == "xla":  # sent ahead by wrap_loader
            return tensor
        spec = self._batch_spec(tensor.dim()) if self.spmd else None
        return self._xm.send_cpu_data_to_device(tensor, self.device, spec)[0]

    # --- collectives ----------------------------------------------------------------------------------
    def sum_across(self, tensor: torch.Tensor) -> torch.Tensor:
        """Under SPMD a device tensor is already the value over all hosts' data (the partitioner reduced
        it), so there is nothing to add."""
        return tensor

    def any_across(self, flags: list[bool]) -> list[bool]:
        if self.world_size == 1:
            return flags
        import torch.distributed as dist

        values = torch.tensor([int(flag) for flag in flags])
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
        return [bool(v) for v in values.tolist()]

    def after_step(self, callback, report):
        """Runs ``callback`` with the host values once the step's graph has executed (a step closure): no host
        sync inside the step. The report is captured as it is now (a clone is free in a lazy graph)."""
        self._xm.add_step_closure(lambda values: callback(values.tolist()), args=(report.detach().clone(),))

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def gather_objects(self, obj: Any) -> list[Any]:
        if self.world_size == 1:
            return [obj]
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    # --- state ----------------------------------------------------------------------------------------
    def to_cpu_state(self, state: Any) -> Any:
        """Host copies of every device tensor in ``state`` (one batched transfer), for ``torch.save``."""
        convert = getattr(self._xm, "_maybe_convert_to_cpu", None)
        if convert is not None:
            return convert(state)
        return super().to_cpu_state(state)

    def compile_stats(self) -> dict[str, int]:
        """Counts since the start of the process: graph compilations, executions and device-to-host transfers
        (a count that keeps growing step after step means recompilation: shapes or constants that change)."""
        import torch_xla.debug.metrics as met

        def count(name: str) -> int:
            data = met.metric_data(name)
            return int(data[0]) if data else 0

        return {"compilations": count("CompileTime"),
                "executions": count("ExecuteTime") + count("ExecuteReplicatedTime"),  # the latter under SPMD
                "transfers_to_host": count("TransferFromDeviceTime")}

    def shutdown(self) -> None:
        try:
            self._xm.wait_device_ops()
            if self.is_main:
                log.info("XLA: %(compilations)d graph compilations, %(executions)d executions, "
                         "%(transfers_to_host)d transfers to the host", self.compile_stats())
        finally:
            if self._owns_host_group:
                import torch.distributed as dist

                if dist.is_initialized():
                    dist.destroy_process_group()
                self._owns_host_group = False


class _DeviceLoader:
    """A loader's batches with ``image`` and ``target`` on the device (sharded over ``'data'`` under SPMD) and
    the other fields left on the host.

    With worker processes the transfer runs ahead in torch_xla's ``MpDeviceLoader`` threads. With
    ``num_workers=0`` the batches are loaded and sent in the calling thread: the dataset seeds the
    process-global random generators for each sample, and doing that in a loader thread would race
    with the keyed Mixup draws of the training loop.
    """

    def __init__(self, loader: Any, runtime: XlaRuntime) -> None:
        self.loader = loader
        self.runtime = runtime

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if getattr(self.loader, "num_workers", 0) == 0:
            return self._in_thread()
        return self._prefetched()

    def _in_thread(self) -> Iterator[dict[str, Any]]:
        runtime = self.runtime
        for batch in self.loader:
            batch = dict(batch)
            for field in DEVICE_FIELDS:
                batch[field] = runtime.to_device(batch[field])
            yield batch

    def _prefetched(self) -> Iterator[dict[str, Any]]:
        import torch_xla.distributed.parallel_loader as pl

        host_parts: collections.deque = collections.deque()  # FIFO: one transfer thread keeps the order
        device_parts = _DeviceFields(self.loader, host_parts)
        kwargs = {}
        if self.runtime.spmd:
            kwargs["input_sharding"] = {field: self.runtime._batch_spec(rank) for field, rank in DEVICE_FIELD_RANKS}
        parallel = pl.ParallelLoader(device_parts, [self.runtime.device], **kwargs)
        try:
            for device_batch in parallel.per_device_loader(self.runtime.device):
                yield {**host_parts.popleft(), **device_batch}
        finally:
            parallel.close()


class _DeviceFields:
    """Iterates ``loader`` yielding only the device fields; the host fields go to ``host_parts``."""

    def __init__(self, loader: Any, host_parts: collections.deque) -> None:
        self.loader = loader
        self.host_parts = host_parts

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for batch in self.loader:
            self.host_parts.append({k: v for k, v in batch.items() if k not in DEVICE_FIELDS})
            yield {k: batch[k] for k in DEVICE_FIELDS}
