"""What the tests that start real jobs share: starting a job the way a user does (``python train.py``, ``torchrun``,
the scripts), awaiting what it writes, stopping every process of it, and comparing run folders bit for bit."""
from __future__ import annotations

import csv
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
START_TIMEOUT_S = 240  # one job, on a loaded 2-core machine


# --- starting and stopping jobs ----------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, *args: str) -> list[str]:
    return [*TORCHRUN, "--nproc_per_node", str(nproc), "--master_port", str(free_port()), *args]


def train_command(nproc: int, overrides: list[str]) -> list[str]:
    """``python train.py ...`` for one process (the README's single-device command), torchrun for more."""
    if nproc == 1:
        return [sys.executable, "train.py", *overrides]
    return torchrun(nproc, "train.py", *overrides)


def job_env(**extra: str) -> dict[str, str]:
    launch_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                   "MASTER_ADDR", "MASTER_PORT", "NNODES", "NODE_RANK", "NPROC_PER_NODE")
    env = {k: v for k, v in os.environ.items() if k not in launch_vars and not k.startswith("TORCHELASTIC_")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TORCHRUN=" ".join(TORCHRUN))
    env.update(extra)
    return env


def alive(pid: int) -> bool:
    """Whether the process exists and has not ended (a zombie has ended: its parent may be gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


class Job:
    """A command started in its own session, its output in a file (a pipe could fill up and stall it).
    ``preexec_fn`` runs in the child before the command (resource limits)."""

    def __init__(self, command: list[str], log: Path, preexec_fn: Callable[[], None] | None = None,
                 **env: str) -> None:
        self.command, self.log = command, log
        self._file = open(log, "w")
        self.proc = subprocess.Popen(command, cwd=REPO, env=job_env(**env), stdout=self._file,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True,
                                     preexec_fn=preexec_fn)

    @property
    def output(self) -> str:
        return self.log.read_text()

    def wait(self, timeout: float = START_TIMEOUT_S) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"{' '.join(self.command)} still ran after {timeout:.0f} s:\n{self.output[-4000:]}")

    def descendants(self) -> list[int]:
        """Pids of the processes this job started (torchrun puts its workers in sessions of their own)."""
        parents: dict[int, int] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    status = (entry / "status").read_text()
                except OSError:
                    continue
                match = re.search(r"^PPid:\s*(\d+)", status, re.MULTILINE)
                if match:
                    parents[int(entry.name)] = int(match.group(1))
        found, frontier = [], [self.proc.pid]
        while frontier:
            children = [pid for pid, parent in parents.items() if parent in frontier]
            found += children
            frontier = children
        return found

    def worker(self, rank: int) -> int:
        """Pid of the torchrun worker process with this global rank."""
        for pid in self.descendants():
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in environ and any(e.startswith(b"TORCHELASTIC_RUN_ID=") for e in environ):
                return pid
        raise AssertionError(f"no worker of rank {rank} under {self.proc.pid}:\n{self.output[-3000:]}")

    def kill(self) -> list[int]:
        """SIGKILL to every process of the job at once, as a crashed node or an out-of-memory killer ends it;
        returns once none of them runs. Returns their pids."""
        pids = [self.proc.pid, *self.descendants()]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=30)
        wait_until(lambda: not any(map(alive, pids)), what=f"the end of the killed processes {pids}", timeout=30)
        return pids

    def close(self) -> None:
        if self.proc.poll() is None:
            self.kill()
        self._file.close()


def run_job(command: list[str], log: Path, timeout: float = START_TIMEOUT_S, **env: str) -> tuple[int, str]:
    """Runs a job to its end: (exit status, output)."""
    job = Job(command, log, **env)
    try:
        return job.wait(timeout), job.output
    finally:
        job.close()


def wait_until(condition: Callable[[], bool], what: str, jobs: tuple[Job, ...] = (),
               timeout: float = START_TIMEOUT_S) -> None:
    """Polls ``condition`` until it holds; fails at once, with the output, if one of ``jobs`` ends first."""
    deadline = time.monotonic() + timeout
    while not condition():
        for job in jobs:
            if job.proc.poll() is not None:
                pytest.fail(f"{' '.join(job.command)} ended ({job.proc.returncode}) before {what}:\n"
                            f"{job.output[-4000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} after {timeout:.0f} s" + (f":\n{jobs[0].output[-4000:]}" if jobs else ""))
        time.sleep(0.01)


# --- run folders -------------------------------------------------------------------------------------------------

def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# of the machine and the storage, not of the run
MEASURED_COLUMNS = ("img_per_s", "data_s", "compute_s", "mfu", "epoch_seconds", "first_batch_s", "train_s",
                    "data_wait_s", "eval_s", "checkpoint_s", "log_s", "peak_memory_mib", "read_retries")


def without_timing(path: Path) -> list[list[str]]:
    """A CSV log's rows without the columns that measure the machine."""
    rows = [line.split(",") for line in path.read_text().splitlines()]
    drop = {i for i, column in enumerate(rows[0]) if column in MEASURED_COLUMNS}
    return [[v for i, v in enumerate(row) if i not in drop] for row in rows]


def assert_identical(a: Any, b: Any, where: str = "") -> None:
    """The same structure (keys in order, lengths) with every tensor equal bit for bit (dtype and shape
    included) and every other value equal."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and (a.dtype, a.shape) == (b.dtype, b.shape), where
        assert torch.equal(a, b), f"{where}: tensors differ, by up to {(a.double() - b.double()).abs().max()}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), f"{where}: keys {list(a)} vs {list(b)}"
        for key in a:
            assert_identical(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), f"{where}: {len(a)} vs {len(b)} items"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def load_script(name: str):
    """A command-line script of scripts/ as a module (its ``main`` called in-process)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
