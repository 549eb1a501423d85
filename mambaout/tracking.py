"""The run folder: what produced a run (config, manifest) and what it measured (metrics, TensorBoard).

Only the main process writes; on other ranks a ``RunFolder`` is inert, so callers never branch on rank.
"""
from __future__ import annotations

import csv
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

EPOCH_COLUMNS = ("epoch", "step", "lr", "train_loss", "eval_loss", "top1", "top5", "ema_top1", "img_per_s",
                 "epoch_seconds", "bad_images", "nonfinite_skips")
STEP_COLUMNS = ("step", "epoch", "lr", "loss", "grad_norm", "img_per_s")


class RunFolderError(RuntimeError):
    pass


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
    ``steps.csv`` (one row per logged optimizer step) and TensorBoard events under ``tensorboard/``."""

    def __init__(self, path: str | Path, *, enabled: bool, resume: bool = False) -> None:
        self.path = Path(path)
        self.enabled = enabled
        self._writer = None
        self._purge_step: int | None = None
        if not enabled:
            return
        if not resume and self.path.exists() and any(self.path.iterdir()):
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

    def log_epoch(self, row: dict[str, Any]) -> None:
        self._append_csv("metrics.csv", EPOCH_COLUMNS, row)
        self._scalars(row["step"], {f"epoch/{k}": v for k, v in row.items() if k not in ("epoch", "step")})

    def log_step(self, row: dict[str, Any]) -> None:
        self._append_csv("steps.csv", STEP_COLUMNS, row)
        self._scalars(row["step"], {f"train/{k}": v for k, v in row.items() if k not in ("epoch", "step")})

    def truncate_logs_after(self, step: int) -> None:
        """On resume, drops rows logged after the checkpoint's step (they will be logged again), in the CSV
        files and in TensorBoard (whose writer purges those events when it opens)."""
        self._purge_step = step + 1
        for name in ("steps.csv", "metrics.csv"):
            path = self.path / name
            if not self.enabled or not path.exists():
                continue
            with open(path, newline="") as f:
                rows = list(csv.DictReader(f))
            kept = [r for r in rows if int(r["step"]) <= step]
            columns = STEP_COLUMNS if name == "steps.csv" else EPOCH_COLUMNS
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
        if not self.enabled:
            return
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.path / "tensorboard"), purge_step=self._purge_step)
        for tag, value in values.items():
            if isinstance(value, (int, float)) and value is not None:
                self._writer.add_scalar(tag, value, step)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


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
