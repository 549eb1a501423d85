"""The run folder: what produced a run (config, manifest) and what it measured (metrics, TensorBoard), and the
lock that keeps it to one training job.

Only the main process writes; on other ranks a ``RunFolder`` and a ``RunLock`` are inert, so callers never branch
on rank.
"""
from __future__ import annotations

import contextlib
import csv
import importlib.util
import json
import logging
import os
import platform
import secrets
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

from .config import Schema, to_yaml
from .trackers import Trackers

# Where a row's wall time (``epoch_seconds``, since the previous row) went: the waits for the first batch of each
# stretch of steps, the steps from their first batch on (of which waiting for data), evaluation, checkpoints, logging
# (trainer.EpochTiming). They add up to epoch_seconds, up to the loop's own bookkeeping.
EPOCH_TIME_COLUMNS = ("first_batch_s", "train_s", "data_wait_s", "eval_s", "checkpoint_s", "log_s")
EPOCH_COLUMNS = ("epoch", "step", "lr", "train_loss", "eval_loss", "top1", "top5", "ema_top1", "img_per_s",
                 "epoch_seconds", *EPOCH_TIME_COLUMNS, "bad_images", "nonfinite_skips", "peak_memory_mib")
# data_s, compute_s: seconds per step waiting for the loader and the rest of the step (engine.StepClock)
STEP_COLUMNS = ("step", "epoch", "lr", "loss", "grad_norm", "img_per_s", "data_s", "compute_s", "mfu", "read_retries")
LOCK_FILE = "run.lock"
TRACKER_RUNS = "trackers.json"  # the run id of each experiment tracker, which a resume continues
CURVES_ENV = "MAMBAOUT_CURVES"  # "off": no curves.png (about 0.3 s per drawing on 2 CPU cores)
# curves.png is redrawn at an evaluation at most this often (the first: this long after the start), and when the
# run ends: a drawing takes ~0.3 s (the first ~0.6 s, matplotlib's import), as long as a whole epoch of the
# quickstart; an ImageNet epoch is minutes, so every evaluation is drawn there.
CURVES_EVERY_S = 30.0
_HELD_HERE: set[str] = set()  # ids of the locks this process holds

log = logging.getLogger("mambaout")


class RunFolderError(RuntimeError):
    pass


class RunInUseError(RunFolderError):
    """Another training job holds the run folder; the message names it and the ways out."""


def git_state(repo_dir: Path) -> dict[str, Any]:
    """Commit and dirty flag of the code that runs (None outside a git checkout)."""
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", "-C", str(repo_dir), *args], capture_output=True, text=True,
                                  check=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def software_versions() -> dict[str, str]:
    import timm
    import torchvision

    return {"python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "timm": timm.__version__}


def build_manifest(*, runtime_info: dict[str, Any], input_pipeline: dict[str, Any], dataset: dict[str, Any],
                   derived: dict[str, Any]) -> dict[str, Any]:
    return {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": [sys.executable, *sys.argv],
        "cwd": os.getcwd(),
        "host": socket.gethostname(),
        "git": git_state(Path(__file__).resolve().parent.parent),
        "versions": software_versions(),
        "runtime": runtime_info,
        "input_pipeline": input_pipeline,
        "derived": derived,
        "dataset": dataset,
    }


class RunFolder:
    """``config.yaml``, ``manifest.json``, ``classes.json``, ``metrics.csv`` (one row per epoch),
    ``steps.csv`` (one row per logged optimizer step) and TensorBoard events under ``tensorboard/``; the same config,
    manifest and rows go to the experiment trackers of the config's ``tracking`` section (``mambaout.trackers``).
    A context manager: leaving it closes the folder, as failed when by an exception."""

    def __init__(self, path: str | Path, *, enabled: bool, resume: bool = False,
                 epoch_columns: tuple[str, ...] = EPOCH_COLUMNS) -> None:
        """``epoch_columns``: the columns of metrics.csv (a fine-tuning run logs its own metrics)."""
        self.path = Path(path)
        self.enabled = enabled
        self.epoch_columns = epoch_columns
        self._writer = None
        self._purge_step: int | None = None
        self._curves_drawn_at = time.monotonic()  # of the last drawing (the first waits as long after the start)
        self._curves_behind = False  # metrics.csv has rows the figure does not show yet
        self._trackers = Trackers()
        # per log: the last step the trackers may already have (a killed run's rows after its checkpoint)
        self._tracked_up_to: dict[str, int] = {}
        if not enabled:
            return
        if not resume and holds_a_run(self.path):
            raise RunFolderError(
                f"train.output_dir '{self.path}' already holds a run that cannot be continued with this config "
                "and options; a run folder is never overwritten. Pass another train.output_dir=..., or continue "
                "that run with its own config and --resume auto")
        self.path.mkdir(parents=True, exist_ok=True)

    def write_text(self, name: str, text: str) -> None:
        if self.enabled:
            _atomic_write_text(self.path / name, text)

    def read_json(self, name: str) -> Any:
        path = self.path / name
        return json.loads(path.read_text()) if self.enabled and path.exists() else None

    def write_json(self, name: str, data: Any) -> None:
        self.write_text(name, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")

    def write_config(self, cfg: Schema, derived: Any) -> None:
        """``config.yaml``, and the trackers of ``cfg.tracking`` started with that config, continuing their runs
        of this folder."""
        self.write_text("config.yaml", to_yaml(cfg, derived))
        if not self.enabled:
            return
        known = self.read_json(TRACKER_RUNS) or {}
        run_ids = self._trackers.start(cfg.tracking, self.path, {**cfg.to_dict(), "derived": vars(derived)}, known)
        if run_ids != known:
            self.write_json(TRACKER_RUNS, run_ids)

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        self.write_json("manifest.json", manifest)
        if self.enabled:
            self._trackers.save_file(self.path / "manifest.json")

    def log_epoch(self, row: dict[str, Any]) -> None:
        self._append_csv("metrics.csv", self.epoch_columns, row)
        self._scalars(row["step"], {f"epoch/{k}": v for k, v in row.items() if k not in ("epoch", "step")})
        self._track("metrics.csv", "epoch", row)
        self._curves_behind = True
        if time.monotonic() - self._curves_drawn_at >= CURVES_EVERY_S:
            self._draw_curves()

    def _draw_curves(self) -> None:
        """``curves.png`` (mambaout.plots), where matplotlib is installed and ``MAMBAOUT_CURVES`` is not ``off``.
        A figure is not worth a run: a plotting failure is a warning."""
        self._curves_drawn_at, self._curves_behind = time.monotonic(), False
        if (not self.enabled or os.environ.get(CURVES_ENV, "").lower() == "off"
                or importlib.util.find_spec("matplotlib") is None):
            return
        try:
            from .plots import write_run_curves

            write_run_curves(self.path)
        except Exception as error:  # noqa: BLE001 (any failure of a third-party renderer)
            log.warning("%s: could not draw curves.png (%s: %s); training goes on", self.path,
                        type(error).__name__, error)

    def log_step(self, row: dict[str, Any]) -> None:
        self._append_csv("steps.csv", STEP_COLUMNS, row)
        self._scalars(row["step"], {f"train/{k}": v for k, v in row.items() if k not in ("epoch", "step")})
        self._track("steps.csv", "train", row)

    def _track(self, log_name: str, prefix: str, row: dict[str, Any]) -> None:
        """The row to the trackers, as ``prefix/column`` at its step, unless they may have it already: a tracker
        cannot take a step back (W&B refuses one, MLflow would hold the step twice), and a resumed run's rows up to
        where the log ended are the same computation again."""
        if self.enabled and row["step"] > self._tracked_up_to.get(log_name, -1):
            self._trackers.log({f"{prefix}/{k}": v for k, v in row.items()
                                if k != "step" and isinstance(v, (int, float))}, row["step"])

    def truncate_logs_after(self, step: int) -> None:
        """On resume, drops rows logged after the checkpoint's step (they will be logged again), in the CSV
        files and in TensorBoard (whose writer purges those events when it opens); the trackers, which cannot
        drop rows, skip them instead."""
        self._purge_step = step + 1
        for name in ("steps.csv", "metrics.csv"):
            path = self.path / name
            if not self.enabled or not path.exists():
                continue
            with open(path, newline="") as f:
                rows = list(csv.DictReader(f))
            kept = [r for r in rows if int(r["step"]) <= step]
            self._tracked_up_to[name] = max((int(r["step"]) for r in rows), default=-1)
            columns = STEP_COLUMNS if name == "steps.csv" else self.epoch_columns
            text = ",".join(columns) + "\n" + "".join(",".join(r.get(c) or "" for c in columns) + "\n"
                                                       for r in kept)
            _atomic_write_text(path, text)

    def _append_csv(self, name: str, columns: tuple[str, ...], row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        path = self.path / name
        new = not path.exists()
        with open(path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            if new:
                writer.writeheader()
            writer.writerow({k: _format(row.get(k)) for k in columns})

    def _scalars(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled or self._writer is False:
            return
        if self._writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:  # tensorboard not installed: the CSV logs carry the run alone
                log.warning("TensorBoard logging is off (%s); steps.csv and metrics.csv have every row. "
                            "pip install tensorboard to get it back", error)
                self._writer = False
                return
            self._writer = SummaryWriter(str(self.path / "tensorboard"), purge_step=self._purge_step)
        for tag, value in values.items():
            if isinstance(value, (int, float)) and value is not None:
                self._writer.add_scalar(tag, value, step)
        self._writer.flush()

    def close(self, failed: bool = False) -> None:
        """The end of the run: TensorBoard's events closed, curves.png drawn with every row, the trackers' runs
        ended (as failed, with ``failed``)."""
        if self._writer:
            self._writer.close()
        if self._curves_behind:
            self._draw_curves()
        self._trackers.close(failed)

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, exc_type, *exc_info: object) -> None:
        self.close(failed=exc_type is not None)


def holds_a_run(path: Path) -> bool:
    """Whether folder ``path`` holds anything but the lock of the job that has just taken it."""
    return path.exists() and any(entry.name != LOCK_FILE for entry in path.iterdir())


class RunLock:
    """One training job per run folder: ``with RunLock(folder, enabled=is_main):`` holds ``run.lock`` (host, pid,
    start time as JSON) from before anything in the folder is read or written until the run ends, however it ends.

    The file is created with O_EXCL, atomic on local filesystems and NFSv3+. A lock of this host is stale, and
    taken over with a notice, once its process is gone; a live one is never displaced. A host cannot see another's
    processes, so the holder touches its lock every ``REFRESH_S`` (a daemon thread), and a lock of another host
    that has not been touched for ``STALE_S`` is stale: its node crashed.
    """

    REFRESH_S = 30.0
    STALE_S = 600.0

    def __init__(self, folder: str | Path, *, enabled: bool) -> None:
        self.path = Path(folder) / LOCK_FILE
        self.enabled = enabled
        # host and pid name the holder for people; the id tells this lock from a successor's, even in one process
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(),
                      "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "id": secrets.token_hex(8)}
        self._stop = threading.Event()
        self._refresher: threading.Thread | None = None
        self._made_folder = False

    def __enter__(self) -> RunLock:
        if self.enabled:
            self._acquire()
            _HELD_HERE.add(self.owner["id"])
            self._refresher = threading.Thread(target=self._refresh, name="run-lock", daemon=True)
            self._refresher.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._refresher is None:
            return
        self._stop.set()
        self._refresher.join()
        _HELD_HERE.discard(self.owner["id"])
        if not self._ours():  # a lock taken over meanwhile belongs to its new holder
            return
        self.path.unlink(missing_ok=True)
        if self._made_folder:
            with contextlib.suppress(OSError):  # only while empty: a run that failed at start leaves nothing
                self.path.parent.rmdir()

    def _acquire(self) -> None:
        self._made_folder = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while not self._create():
            found = self._read()
            if found is None:
                continue  # released since our attempt: try again
            holder, age_s = found
            why = self._stale(holder, age_s)
            if why is None:
                raise RunInUseError(self._in_use(holder, age_s))
            log.warning("%s: taking over the lock of %s: %s", self.path, _holder_name(holder), why)
            tmp = self.path.with_name(f".{LOCK_FILE}.{self.owner['id']}")
            tmp.write_text(json.dumps(self.owner))
            os.replace(tmp, self.path)
            if self._ours():
                return
            # another job took it over at the same moment: the next round finds its fresh lock and refuses

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(self.owner))
        return True

    def _read(self) -> tuple[dict[str, Any], float] | None:
        """The holder ({} while unreadable: being written, or damaged) and the seconds since it touched the lock;
        None when there is no lock."""
        try:
            text, touched = self.path.read_text(), self.path.stat().st_mtime
        except FileNotFoundError:
            return None
        try:
            holder = json.loads(text)
        except ValueError:
            holder = {}
        return holder if isinstance(holder, dict) else {}, time.time() - touched

    def _ours(self) -> bool:
        found = self._read()
        return found is not None and found[0].get("id") == self.owner["id"]

    def _stale(self, holder: dict[str, Any], age_s: float) -> str | None:
        """Why the lock's holder is gone, or None while it may be alive."""
        if not self._foreign(holder):
            pid = holder.get("pid")
            if pid == os.getpid() and holder.get("id") not in _HELD_HERE:
                # a restarted container gives its processes the pids of the last life, this one's included
                return f"its pid {pid} is this process's now"
            return None if _process_alive(pid) else f"its process {pid} no longer runs on this host"
        if age_s > self.STALE_S:
            return f"it was not refreshed for {age_s / 60:.0f} minutes"
        return None

    def _foreign(self, holder: dict[str, Any]) -> bool:
        return holder.get("host") != self.owner["host"]

    def _in_use(self, holder: dict[str, Any], age_s: float) -> str:
        later = (f" (a lock of another host not refreshed for {self.STALE_S / 60:.0f} minutes is taken over by the "
                 "next run)" if self._foreign(holder) else "")
        return (f"train.output_dir '{self.path.parent}' is in use by another training job, {_holder_name(holder)} "
                f"(lock file {self.path}, refreshed {age_s:.0f} s ago); two jobs in one run folder would interleave "
                "their checkpoints and logs. Wait for that job to end, stop it, or pass another "
                f"train.output_dir=...; if that job is gone (e.g. with its node), delete {self.path}{later}.")

    def _refresh(self) -> None:
        """Touches the lock every REFRESH_S: the sign of life that jobs on other nodes look for."""
        while not self._stop.wait(self.REFRESH_S):
            try:
                found = self._read()
                if found is None or found[0].get("id") != self.owner["id"]:
                    log.error("%s: this job no longer holds its run folder's lock (%s); another job may be "
                              "writing there too: stop one of them", self.path,
                              "deleted" if found is None else f"now {_holder_name(found[0])}")
                    return
                os.utime(self.path)
            except OSError as error:  # a filesystem hiccup must not end the run; the next round tries again
                log.warning("%s: could not refresh the lock: %s", self.path, error)


def _holder_name(holder: dict[str, Any]) -> str:
    if not holder:
        return "an unknown job (the lock file is empty or unreadable)"
    return f"pid {holder.get('pid')} on host {holder.get('host')} since {holder.get('since')}"


def _process_alive(pid: Any) -> bool:
    """Whether process ``pid`` of this host runs. A zombie does not: a killed process stays one until its parent
    reaps it, forever in a container whose init never does."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):  # no /proc (macOS): the signal test stands
        return True
    return state != "Z"


def _format(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)  # full precision: resumed and uninterrupted runs are compared on these files
    return str(value)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class Progress:
    """A one-line progress bar with rate and ETA on a terminal; plain periodic lines otherwise (log files)."""

    def __init__(self, total: int, label: str, *, enabled: bool, unit: str = "img",
                 every_s: float = 30.0) -> None:
        self.total, self.label, self.enabled, self.unit = total, label, enabled, unit
        self.tty = sys.stderr.isatty()
        self.every_s = every_s
        self.done = 0
        self.start = self.last_print = time.perf_counter()
        self.postfix = ""

    def update(self, n: int, postfix: str | None = None) -> None:
        self.done += n
        if postfix is not None:
            self.postfix = postfix
        now = time.perf_counter()
        if self.enabled and (self.tty or now - self.last_print >= self.every_s or self.done >= self.total):
            self.last_print = now
            self._print(now)

    def _print(self, now: float) -> None:
        elapsed = now - self.start
        rate = self.done / max(elapsed, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        fraction = self.done / max(self.total, 1)
        text = (f"{self.label} {fraction:6.1%} {self.done}/{self.total} {rate:8.1f} {self.unit}/s "
                f"eta {_clock(eta)} {self.postfix}")
        if self.tty:
            bar = "#" * int(20 * fraction)
            sys.stderr.write(f"\r[{bar:<20}] {text}\033[K")
            if self.done >= self.total:
                sys.stderr.write("\n")
        else:
            sys.stderr.write(text + "\n")
        sys.stderr.flush()


def _clock(seconds: float) -> str:
    if not seconds < float("inf"):
        return "--:--"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
