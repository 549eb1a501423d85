#!/usr/bin/env python3
"""The checks that need an NVIDIA GPU, in stages that fit a short loan of a GPU machine (10 minutes a command).

    bash scripts/gpu_check.sh [STAGE|CHECK ...] [--out DIR] [--budget SECONDS] [--wheels DIR] [--list]

Every run starts with `environment` (versions, GPUs, the JPEG decoder, optional packages; ~10 s), whose count of
GPUs decides what runs. Then the stages, each in order of value (default: quick). Times are estimates for one
H100 from a cold start, not measured yet (no GPU was at hand); each check runs under its own timeout:

quick (~6 min with the environment):
  cuda-tests      the tests marked `cuda`: no host sync inside a step, nvJPEG and the device augmentation
                  against the CPU's, the scan against its definition                                    ~90 s
  train-resume    train.py (femto, bf16, deterministic) stopped at step 20 and resumed to 30, against an
                  uninterrupted run: bit-identical                                                      ~60 s
  cpu-vs-cuda     the recipe's run, 6 fp32 deterministic steps, on the CPU and on the GPU: losses within
                  1e-3 relative, mean |weight difference| under 1% of the mean |movement|               ~45 s
  model-small     MambaOut-Small bf16 train step, eager: train.py, a bare loop on our model and on timm's,
                  img/s, MFU (goals, in the bare loop: ours >= 31% MFU and >= timm's img/s)              ~80 s
  make-jpegs      70 ImageNet-sized JPEGs from scikit-learn's sample photos (CPU)                        ~5 s
  decode          the nvjpeg pipeline: its worker part per CPU core, and the GPU's decode + augment
                  in img/s (goal >= 5k img/s)                                                           ~40 s
  cpu-vs-cpu      the comparison's self-check, tiny, on the CPU: two identical runs compare equal       ~10 s
full (~8 min with one GPU):
  compile         train.py with train.compile=true (MambaOut-Small bf16) against the eager bare loops  ~150 s
  block-forms     our two block formulations against timm's model, MambaOut-Small bf16, eager           ~60 s
  fp16            MambaOut-Small fp16 (loss scaling): train.py and the bare loops                       ~60 s
  two-gpus        a 2-process NCCL run of train.py (only with 2+ GPUs)                                  ~45 s
  ssm-scan        the selective scan at stage-1 length: portable chunks against mamba_ssm's kernel      ~40 s
  train-femto     train.py against the bare loops, femto bf16                                           ~45 s
  train-tiny      the same, tiny                                                                        ~45 s
  deterministic-cost  train.py's img/s with runtime.deterministic true and false, MambaOut-Small bf16   ~60 s

Without a GPU the GPU checks are recorded "skipped: no GPU" and the others run (8 s on 2 idle CPU cores, ~50 s on
busy ones). A summary line is printed as each check ends; at the end a markdown table. OUT/<check>.log holds each
check's output and OUT/gpu_check.json every result so far (rewritten after each check, so a run cut off still
leaves its results); run folders and JPEGs go to a temporary folder under /tmp, removed at the end. ``--budget``
(default 570 s, under the lent machines' 10-minute limit a command) bounds the whole invocation: a check's timeout
is cut to what is left, and a check that would start with under 30 s left is "skipped: out of time". ``--wheels
DIR`` unpacks the wheels in DIR (a package the machine lacks, e.g. TorchCodec) onto the checks'
PYTHONPATH: no pip, no registry. A check's name runs that check alone (with the check it reads, if any).
Exit status: 0 when no check failed or timed out, else 1.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BUDGET_S = 570  # the lent machines stop a command at 600 s
MIN_START_S = 30  # a check that would start with less left is skipped, not started to be cut
MFU_GOAL = 0.31
DECODE_GOAL = 5000  # img/s


@dataclass(frozen=True)
class Check:
    name: str
    command: list[str]
    timeout_s: int
    expected_s: int  # on one H100 from a cold start (an estimate)
    gpus: int = 1  # GPUs it needs; 0 = runs anywhere
    needs: tuple[str, ...] = ()  # Python modules it needs (skipped without them)
    after: str | None = None  # a check whose output it uses: skipped unless that one ended ok
    figures: str = ""  # regex of the log lines with its key figures (default: the last line)
    goal: Callable[[str], str] | None = None  # log text -> how it stands against its goal


@dataclass
class Result:
    name: str
    stage: str
    status: str  # ok, FAIL, timeout, or "skipped: why"
    seconds: float
    expected_s: int
    timeout_s: int
    figures: str
    log: str | None = None
    command: list[str] = field(default_factory=list)


# --- goals: read from a check's log ------------------------------------------------------------------------------

def _number(pattern: str, text: str) -> float | None:
    found = re.findall(pattern, text)
    return float(found[-1]) if found else None


def small_step_goal(log: str) -> str:
    """Our model's step at >= 31% MFU and at least as fast as timm's model, both in the bare loop: the model's
    figures, which train.py's synthetic images (made on the CPU) could hide (its line gives its ratio)."""
    mfu = _number(r"bare loop, our model: [\d.]+ img/s, [\d.]+x the bare loop, MFU ([\d.]+)%", log)
    ours = _number(r"bare loop, our model: ([\d.]+) img/s", log)
    timm = _number(r"bare loop, timm's model: ([\d.]+) img/s", log)
    if mfu is None or ours is None or timm is None:
        return "goals: figures missing"
    met = mfu / 100 >= MFU_GOAL and ours >= timm
    return (f"goals {'met' if met else 'MISSED'}: MFU {mfu:.1f}% (>= {MFU_GOAL:.0%}), ours {ours / timm:.2f}x "
            f"timm's (>= 1)")


def decode_goal(log: str) -> str:
    rate = _number(r"nvjpeg \(GPU part[^)]*\): ([\d.]+) img/s", log)
    if rate is None:
        return "goal: figure missing"
    return f"goal {'met' if rate >= DECODE_GOAL else 'MISSED'}: {rate:.0f} img/s (>= {DECODE_GOAL})"


# --- the stages --------------------------------------------------------------------------------------------------

def stages(python: str, work: Path) -> dict[str, list[Check]]:
    """Every stage's checks, in order of value. ``work``: run folders and JPEGs (under /tmp, not returned)."""
    def bench_train(model: str, rounds: int, *overrides: str) -> list[str]:  # options first: argparse wants it
        return [python, "scripts/benchmark_train.py", "--model", model, "--batch", "128", "--steps", "20",
                "--warmup", "5", "--rounds", str(rounds), "--device", "cuda", "train.channels_last=true",
                "data.num_workers=12", *overrides]

    bench_lines = r"^(mambaout_\w+ at|train\.py:|bare loop)"
    quick = [
        Check("cuda-tests", [python, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
                             "--continue-on-collection-errors", *cuda_test_files()], 180, 90,
              figures=r"\d+ (passed|failed|error)"),
        Check("train-resume", [python, "scripts/compare_runs.py", "resume", "--device", "cuda", "--model",
                               "mambaout_femto", "--batch", "64", "--steps", "30", "--stop-at", "20", "--workers", "6",
                               "train.precision=bf16", "runtime.deterministic=true"], 120, 60, figures="PASS|FAIL"),
        Check("cpu-vs-cuda", [python, "scripts/compare_runs.py", "devices", "--devices", "cpu", "cuda", "--model",
                              "mambaout_femto", "--batch", "32", "--micro-batch", "16", "--steps", "6", "--workers",
                              "4"], 100, 45, figures="PASS|FAIL"),
        Check("model-small", bench_train("mambaout_small", 2, "train.precision=bf16"), 150, 80,
              figures=bench_lines, goal=small_step_goal),
        Check("make-jpegs", [python, "scripts/benchmark_data.py", "--make-jpegs", str(work / "jpegs")], 60, 5, gpus=0,
              needs=("sklearn",)),
        Check("decode", [python, "scripts/benchmark_data.py", "--data", str(work / "jpegs"), "--pipelines", "nvjpeg",
                         "--cores", "4", "--rounds", "3"], 100, 40, after="make-jpegs",
              figures=r"img/s", goal=decode_goal),
        Check("cpu-vs-cpu", [python, "scripts/compare_runs.py", "devices", "--devices", "cpu", "cpu", "--img-size",
                             "32", "--batch", "4", "--micro-batch", "2", "--steps", "3", "--workers", "0"], 90, 10,
              gpus=0, figures="PASS|FAIL"),
    ]
    full = [
        Check("compile", bench_train("mambaout_small", 1, "train.precision=bf16", "train.compile=true"), 300, 150,
              figures=bench_lines),
        Check("block-forms", [python, "scripts/benchmark_model.py", "--model", "mambaout_small", "--batch-size", "128",
                              "--device", "cuda", "--precision", "bf16", "--channels-last", "--rounds", "10",
                              "--warmup", "3"], 120, 60, figures=r"img/s|block form"),
        Check("fp16", bench_train("mambaout_small", 1, "train.precision=fp16"), 120, 60, figures=bench_lines),
        Check("two-gpus", [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py",
                           "--config", "configs/mambaout_femto.yaml", "data.format=synthetic",
                           "data.synthetic_val_size=512", "data.num_workers=4", "optim.global_batch_size=256",
                           "train.max_steps=20", "train.log_interval=5", f"train.output_dir={work / 'two-gpus'}"],
              100, 45, gpus=2, figures=r"x2: global batch|train 100\.0%|eval top-1"),
        Check("ssm-scan", [python, "scripts/gpu_check.py", "--ssm-scan"], 90, 40, figures=r" ms, peak|failed"),
        Check("train-femto", bench_train("mambaout_femto", 1, "train.precision=bf16"), 100, 45, figures=bench_lines),
        Check("train-tiny", bench_train("mambaout_tiny", 1, "train.precision=bf16"), 100, 45, figures=bench_lines),
        Check("deterministic-cost", [python, "scripts/compare_runs.py", "speed", "--device", "cuda", "--model",
                                     "mambaout_small", "--batch", "128", "--steps", "40", "--workers", "12",
                                     "--vary", "runtime.deterministic=true,false", "train.precision=bf16",
                                     "train.channels_last=true"], 120, 60, figures="costs"),
    ]
    return {"quick": quick, "full": full}


def cuda_test_files() -> list[str]:
    """The test files with tests marked `cuda`: collecting only them needs nothing the lent machines lack (other
    test files import gradio_client or webdataset, and one file failing to collect would stop the whole run)."""
    files = (REPO / "tests").glob("test_*.py")
    return sorted(str(path.relative_to(REPO)) for path in files if "mark.cuda" in path.read_text())


def environment_check(python: str) -> Check:
    """Run first at every invocation: its count of GPUs decides which checks run."""
    return Check("environment", [python, "scripts/gpu_check.py", "--environment"], 60, 10, gpus=0,
                 figures=r"^(torch|optional|JPEG decoder|GPUs:)")


def select(requested: list[str], all_stages: dict[str, list[Check]]) -> list[tuple[str, Check]]:
    """(stage, check) in run order: whole stages, or single checks by name (with the checks they read first),
    each once."""
    by_name = {check.name: (stage, check) for stage, checks in all_stages.items() for check in checks}
    chosen: list[tuple[str, Check]] = []
    for item in requested:
        if item in all_stages:
            chosen += [(item, check) for check in all_stages[item]]
        elif item in by_name:
            stage, check = by_name[item]
            if check.after:
                chosen.append(by_name[check.after])
            chosen.append((stage, check))
        else:
            raise SystemExit(f"unknown stage or check {item!r}: stages {', '.join(all_stages)}; checks "
                             f"{', '.join(by_name)}")
    seen: set[str] = set()
    return [(stage, check) for stage, check in chosen if not (check.name in seen or seen.add(check.name))]


# --- running a check ---------------------------------------------------------------------------------------------

def run_command(command: list[str], log: Path, timeout_s: float, env: dict[str, str]) -> str:
    """Runs ``command`` in its own process group, output to ``log``; "ok", "FAIL" or "timeout" (the whole group
    is killed: a hung CUDA call, torchrun's workers and DataLoader workers go with it)."""
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            status = "ok" if process.wait(timeout=timeout_s) == 0 else "FAIL"
        except subprocess.TimeoutExpired:
            status = "timeout"
        finally:  # also when this runner is interrupted: nothing of the check outlives it
            _kill_group(process)
    if status == "timeout":
        with open(log, "a") as out:
            out.write(f"\n[gpu_check] cut at its timeout of {timeout_s:.0f} s\n")
    return status


def _kill_group(process: subprocess.Popen) -> None:
    """SIGTERM to the check's process group, then SIGKILL to whatever is left of it: its children (DataLoader or
    torchrun workers) may outlive the leader."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:  # the group is empty: every process of it has ended
            return
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


def key_figures(log: Path, check: Check) -> str:
    """The log's lines that carry the check's figures (or its last line), then how it stands against its goal."""
    text = log.read_text(errors="replace") if log.exists() else ""
    lines = [" ".join(line.split()) for line in re.split(r"[\r\n]+", text) if line.strip()]
    picked = [line for line in lines if check.figures and re.search(check.figures, line)] or lines[-1:]
    figures = " / ".join(dict.fromkeys(picked[-4:]))
    if check.goal is not None and text:
        figures += f"; {check.goal(text)}"
    return figures[:500]


class Runner:
    """Runs checks in order within a time budget, recording each result as it ends."""

    def __init__(self, out: Path, budget_s: float = 0, env: dict[str, str] | None = None,
                 gpus: int | None = None, echo: Callable[[str], None] = print) -> None:
        self.out, self.budget_s, self.gpus, self.echo = out, budget_s, gpus, echo
        self.env = env if env is not None else dict(os.environ)
        self.results: list[Result] = []
        self.start = time.monotonic()
        out.mkdir(parents=True, exist_ok=True)

    def skip_reason(self, check: Check) -> str | None:
        if check.gpus and self.gpus == 0:
            return "skipped: no GPU"
        if check.gpus > 1 and self.gpus is not None and self.gpus < check.gpus:
            return f"skipped: needs {check.gpus} GPUs, {self.gpus} here"
        missing = [module for module in check.needs if importlib.util.find_spec(module) is None]
        if missing:
            return f"skipped: {', '.join(missing)} missing"
        if check.after and not any(r.name == check.after and r.status == "ok" for r in self.results):
            return f"skipped: {check.after} did not end ok"
        if self.budget_s and self.left() < MIN_START_S:
            return "skipped: out of time"
        return None

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)

    def run(self, check: Check, stage: str = "") -> Result:
        reason = self.skip_reason(check)
        log = self.out / f"{check.name}.log"
        started = time.monotonic()
        if reason:
            result = Result(check.name, stage, reason, 0.0, check.expected_s, check.timeout_s, "", None, check.command)
        else:
            timeout = min(check.timeout_s, self.left()) if self.budget_s else check.timeout_s
            status = run_command(check.command, log, timeout, self.env)
            result = Result(check.name, stage, status, round(time.monotonic() - started, 1), check.expected_s,
                            round(timeout), key_figures(log, check), log.name, check.command)
        self.results.append(result)
        self.write_json()
        self.echo(f"[gpu_check] {result.name}: {result.status} ({result.seconds:.0f} s, expected ~{result.expected_s}"
                  f" s on an H100){' | ' + result.figures if result.figures else ''}")
        return result

    def write_json(self, finished: bool = False) -> None:
        """All results so far, replaced atomically: a run cut off at any moment leaves a whole file."""
        doc = {"finished": finished, "gpus": self.gpus, "budget_s": self.budget_s,
               "elapsed_s": round(time.monotonic() - self.start, 1),
               "written": datetime.datetime.now().isoformat(timespec="seconds"),
               "checks": [asdict(result) for result in self.results]}
        tmp = self.out / ".gpu_check.json.tmp"
        tmp.write_text(json.dumps(doc, indent=1) + "\n")
        tmp.replace(self.out / "gpu_check.json")

    def table(self) -> str:
        rows = ["| check | stage | status | time | expected (H100) | key figures |", "|---|---|---|---|---|---|"]
        rows += [f"| {r.name} | {r.stage} | {r.status} | {r.seconds:.0f} s | ~{r.expected_s} s | "
                 f"{r.figures.replace('|', chr(92) + '|')} |" for r in self.results]  # escaped for markdown
        return "\n".join(rows)

    @property
    def failed(self) -> bool:
        return any(r.status in ("FAIL", "timeout") for r in self.results)


def gpus_seen(log: Path) -> int | None:
    """The environment check's count of GPUs (None: it did not say, e.g. it hung: the GPU checks then run, each
    under its timeout)."""
    found = re.findall(r"^GPUs: (\d+)", log.read_text(errors="replace"), re.MULTILINE) if log.exists() else []
    return int(found[-1]) if found else None


def unpack_wheels(wheels: Path, into: Path) -> list[str]:
    """Wheels are zip files laid out for site-packages: unpacked, they import as installed (no pip needed)."""
    names = []
    for wheel in sorted(wheels.glob("*.whl")):
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(into)
        names.append(wheel.name)
    return names


# --- the helpers that run as checks ------------------------------------------------------------------------------

def environment() -> int:
    """What the machine has, ending with the line the runner reads: ``GPUs: N``."""
    import platform

    import timm
    import torch
    import torchvision

    cuda = torch.cuda.is_available()
    count = torch.cuda.device_count() if cuda else 0
    names = sorted({torch.cuda.get_device_name(i) for i in range(count)})
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), torchvision {torchvision.__version__}, timm "
          f"{timm.__version__}, python {platform.python_version()}, {os.cpu_count()} CPU cores, GPU: "
          f"{', '.join(names) or 'none'}")
    optional = {name: importlib.util.find_spec(name) is not None
                for name in ("torchcodec", "mamba_ssm", "sklearn", "tensorboard", "pyarrow")}
    print("optional packages: " + ", ".join(f"{n} {'yes' if ok else 'MISSING'}" for n, ok in optional.items()))
    try:
        from mambaout.data.decode import jpeg_decoder

        print(f"JPEG decoder: {jpeg_decoder().label}")
    except Exception as error:  # noqa: BLE001 - reported, the checks go on
        print(f"JPEG decoder: none works ({type(error).__name__}: {error})")
    pinned = (1, 0, 31) <= tuple(int(part) for part in re.findall(r"\d+", timm.__version__)[:3]) < (1, 1)
    if not pinned:
        print(f"note: timm {timm.__version__} is outside the pinned range (>=1.0.31,<1.1): carry the pinned wheel")
    print(f"GPUs: {count}")
    return 0


def ssm_scan(batch: int = 64, length: int = 3136, chunks: tuple[int, ...] = (32, 128, 512),
             device: str = "cuda") -> int:
    """benchmark_ssm.py's configurations on CUDA, each measured once in this process: torch's peak-memory counter
    is reset per configuration, so the fresh process per configuration and the second, memory-sizing run that the
    script makes for CPU memory are not needed here."""
    import torch

    spec = importlib.util.spec_from_file_location("benchmark_ssm", REPO / "scripts" / "benchmark_ssm.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = argparse.Namespace(batch=batch, length=length, channels=96, states=16, device=device)
    runs = [(chunk, False) for chunk in chunks] + [(length, False)]
    from mambaout.models.ssm import kernel_available

    if device.startswith("cuda") and kernel_available(torch.device(device)):  # else it warns why not
        runs.append((0, True))
    where = torch.cuda.get_device_name() if device.startswith("cuda") else device
    print(f"selective scan, batch {batch}, L {length}, D 96, N 16, {where}: forward + backward")
    failures = 0
    for chunk, kernel in runs:
        name = "mamba_ssm kernel" if kernel else (f"portable, chunk {chunk}" if chunk < length else "unchunked")
        try:
            measured = bench.measure(args, chunk, kernel)
            print(f"  {name:>18}: {measured['seconds'] * 1e3:8.1f} ms, peak {measured['peak_mib']:7.0f} MiB",
                  flush=True)
        except Exception as error:  # noqa: BLE001 - one configuration (say out of memory) does not stop the rest
            failures += 1
            print(f"  {name:>18}: failed: {type(error).__name__}: {str(error).splitlines()[0][:120]}", flush=True)
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return 1 if failures else 0


# --- the command -------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stages", nargs="*", metavar="STAGE|CHECK", help="quick (default), full, or check names")
    parser.add_argument("--out", type=Path, default=None, help="logs and gpu_check.json (default $OUT, else "
                                                               "/tmp/gpu_check)")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="seconds for the whole run; 0 = none")
    parser.add_argument("--wheels", type=Path, help="unpack the wheels in this folder onto the checks' PYTHONPATH")
    parser.add_argument("--list", action="store_true", help="print the checks and exit")
    parser.add_argument("--environment", action="store_true", help=argparse.SUPPRESS)  # the checks' helpers
    parser.add_argument("--ssm-scan", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def check_env(work: Path, wheels: Path | None) -> dict[str, str]:
    """The checks' environment: the repository and any carried wheels on PYTHONPATH, output unbuffered (a check
    cut at its timeout still leaves its lines), no curves.png drawn."""
    paths = [str(REPO)]
    if wheels is not None:
        site = work / "site-packages"
        print(f"[gpu_check] unpacked onto PYTHONPATH: {', '.join(unpack_wheels(wheels, site)) or 'nothing'}",
              flush=True)
        paths.insert(0, str(site))
    existing = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([*paths, *([existing] if existing else [])]),
            "PYTHONUNBUFFERED": "1", "MAMBAOUT_CURVES": "off"}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.environment:
        return environment()
    if args.ssm_scan:
        return ssm_scan()
    out = args.out or Path(os.environ.get("OUT") or "/tmp/gpu_check")
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    chosen = [("all", environment_check(sys.executable)),
              *select(args.stages or ["quick"], stages(sys.executable, work))]
    if args.list:
        for stage, check in chosen:
            print(f"{stage:>5} {check.name:<18} timeout {check.timeout_s:>3} s, expected ~{check.expected_s:>3} s, "
                  f"{'GPUs: ' + str(check.gpus) if check.gpus else 'CPU'}: {' '.join(check.command)}")
        shutil.rmtree(work)
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds: the running check's group is killed
    runner = Runner(out, args.budget, check_env(work, args.wheels))
    try:
        for stage, check in chosen:
            runner.run(check, stage)
            if check.name == "environment":
                runner.gpus = gpus_seen(out / "environment.log")
                seen = {None: "unknown, so the GPU checks run", 0: "none, so the GPU checks are skipped"}
                runner.echo(f"[gpu_check] GPUs: {seen.get(runner.gpus, runner.gpus)}")
        runner.write_json(finished=True)
    finally:  # interrupted too: what ran so far is in the table and the JSON
        shutil.rmtree(work, ignore_errors=True)
        print(f"\n{runner.table()}\n\n{len(runner.results)} checks in {time.monotonic() - runner.start:.0f} s; logs "
              f"and gpu_check.json in {out}", flush=True)
    return 1 if runner.failed else 0

if __name__ == "__main__":
    sys.exit(main())
