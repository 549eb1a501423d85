#!/usr/bin/env python3
"""Train one recipe twice with train.py's own code (``mambaout.trainer.train``) and compare the two runs.

    python scripts/compare_runs.py devices [--devices cpu cuda] [--steps 6] [--model mambaout_femto] [KEY=VALUE ...]
    python scripts/compare_runs.py resume [--device cuda] [--steps 30] [--stop-at 20] [KEY=VALUE ...]
    python scripts/compare_runs.py speed --vary runtime.deterministic=true,false [--device cuda] [KEY=VALUE ...]

The recipe is the model's published one (``configs/<model>.yaml``) on synthetic images (made by a keyed generator,
so both runs see the same pixels), with the warm-up off, so the first steps train at the recipe's lr scaled to
the batch; KEY=VALUE overrides follow. Each mode prints one line of figures and exits 1 where it fails:

* ``devices``: the same run on two devices (fp32 and deterministic, as the recipe sets; both start from one set
  of initial weights, written once). PASS when every step's loss agrees within 1e-3 relative and the mean
  |weight difference| is under 1% of the mean |movement from the initial weights|: a max-abs difference says
  little, as Adam turns rounding in near-zero gradients into lr-sized steps (it is printed for information);
* ``resume``: a run to ``--steps`` against one stopped at ``--stop-at`` and resumed in the same folder
  (``train.max_steps`` raised, a change a resume allows). PASS when bit-identical: every step's loss, lr and
  gradient norm, the weights, the optimizer state and the loss scaler;
* ``speed``: the same run with each value of one key: median img/s over the steps after the first and their MFU.
"""
from __future__ import annotations

import argparse
import csv
import logging
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LOSS_RTOL = 1e-3  # devices: per-step loss, relative
MOVEMENT_FRACTION = 0.01  # devices: mean |weight difference| / mean |movement from the initial weights|
TRAJECTORY_COLUMNS = ("step", "lr", "loss", "grad_norm")  # steps.csv's columns that a resume must reproduce


def recipe_overrides(args: argparse.Namespace, out: Path, device: str, steps: int) -> list[str]:
    batch = args.batch
    return [
        "data.format=synthetic", f"data.img_size={args.img_size}", f"data.synthetic_val_size={batch}",
        f"data.num_workers={args.workers}", f"optim.global_batch_size={batch}",
        f"train.micro_batch_size={args.micro_batch or batch}", "sched.warmup_epochs=0", "train.log_interval=1",
        f"train.max_steps={steps}", f"train.output_dir={out}", f"runtime.device={device}", *args.overrides]


def run(args: argparse.Namespace, out: Path, device: str, steps: int, *extra: str, resume: str = "never") -> Path:
    """Trains as train.py does (``resume``: train.py's --resume); returns the run folder."""
    from mambaout.config import load_config
    from mambaout.trainer import train

    config = REPO / "configs" / f"{args.model}.yaml"
    train(load_config(config, [*recipe_overrides(args, out, device, steps), *extra]), resume=resume)
    return out


def steps_csv(out: Path) -> list[dict[str, str]]:
    with open(out / "steps.csv", newline="") as f:
        return list(csv.DictReader(f))


def final_state(out: Path) -> dict[str, Any]:
    from mambaout.checkpoint import load_training_checkpoint

    return load_training_checkpoint(out / "last.pth")


def float_tensors(state: dict[str, Any]) -> dict[str, Any]:
    return {name: value.double() for name, value in state.items() if value.is_floating_point()}


# --- devices -----------------------------------------------------------------------------------------------------

def initial_weights(args: argparse.Namespace, path: Path) -> Path:
    """One set of initial weights for both runs: the devices' runs then differ by their arithmetic alone."""
    import torch

    from mambaout.config import load_config
    from mambaout.models import create_model

    cfg = load_config(REPO / "configs" / f"{args.model}.yaml", args.overrides)
    torch.manual_seed(0)
    model = create_model(cfg.model.name, num_classes=cfg.model.num_classes or cfg.data.synthetic_num_classes)
    torch.save(model.state_dict(), path)
    return path


def compare_devices(args: argparse.Namespace, work: Path) -> bool:
    import torch

    init = initial_weights(args, work / "init.pth")
    first, second = (run(args, work / f"{index}-{device}", device, args.steps, f"model.checkpoint={init}")
                     for index, device in enumerate(args.devices))
    rows = [steps_csv(first), steps_csv(second)]
    losses = [(float(a["loss"]), float(b["loss"])) for a, b in zip(*rows)]
    loss_diff = max(abs(a - b) / max(abs(a), 1e-12) for a, b in losses)
    start = float_tensors(torch.load(init, map_location="cpu"))
    a, b = (float_tensors(final_state(out)["model"]) for out in (first, second))
    flat = {name: torch.cat([tensors[k].flatten() for k in sorted(start)]) for name, tensors
            in (("a", a), ("b", b), ("start", start))}
    diff = (flat["a"] - flat["b"]).abs()
    movement = (flat["a"] - flat["start"]).abs().mean().item()
    fraction = diff.mean().item() / movement if movement > 0 else float("inf")
    passed = [len(r) for r in rows] == [args.steps] * 2 and loss_diff <= LOSS_RTOL and fraction < MOVEMENT_FRACTION
    print(f"{args.devices[0]} vs {args.devices[1]} after {len(losses)} steps ({args.model}, batch {args.batch}, "
          f"{args.img_size} px): max loss difference {loss_diff:.2e} relative (limit {LOSS_RTOL:g}), mean |weight "
          f"difference| {fraction:.3%} of the mean |movement| {movement:.3g} (limit {MOVEMENT_FRACTION:.0%}), "
          f"max |weight difference| {diff.max().item():.3g}: {'PASS' if passed else 'FAIL'}")
    return passed


# --- resume ------------------------------------------------------------------------------------------------------

def differences(a: Any, b: Any, path: str = "") -> list[str]:
    """Where two checkpoint trees differ, bit for bit (tensors: dtype, shape and every value)."""
    import torch

    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{path}: keys {sorted(map(str, a.keys() ^ b.keys()))}"]
        return [found for key in a for found in differences(a[key], b[key], f"{path}/{key}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        return [found for index, (x, y) in enumerate(zip(a, b)) for found in differences(x, y, f"{path}/{index}")]
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        same = a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        return [] if same else [path]
    return [] if a == b else [path]


def training_part(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """What the training trajectory determines; the evaluation's bookkeeping (best top-1, its epoch) differs
    legitimately: the stopped run evaluated at its stop too."""
    kept = {key: checkpoint[key] for key in ("model", "optimizer", "runtime", "state_dict_ema") if key in checkpoint}
    kept["train_state"] = {k: v for k, v in checkpoint["train_state"].items() if k not in ("best_top1", "best_epoch")}
    return kept


def compare_resume(args: argparse.Namespace, work: Path) -> bool:
    whole = run(args, work / "uninterrupted", args.device, args.steps)
    resumed = run(args, work / "resumed", args.device, args.stop_at)
    # named, not "auto": a run that started afresh instead would end the same and pass unnoticed
    run(args, resumed, args.device, args.steps, resume=str(resumed / "last.pth"))
    trajectory = [[[row[c] for c in TRAJECTORY_COLUMNS] for row in steps_csv(out)] for out in (whole, resumed)]
    found = differences(training_part(final_state(whole)), training_part(final_state(resumed)))
    logged_same = trajectory[0] == trajectory[1] and len(trajectory[0]) == args.steps
    passed = logged_same and not found
    rates = [float(row["img_per_s"]) for row in steps_csv(whole)[1:]]
    print(f"{args.model} on {args.device}, stopped at step {args.stop_at} and resumed to {args.steps}, against an "
          f"uninterrupted run: {'the same' if logged_same else 'DIFFERENT'} loss, lr and gradient norm at every "
          f"step, {'identical' if not found else f'{len(found)} differing'} weights, optimizer and scaler state"
          f"{' (' + ', '.join(found[:5]) + ')' if found else ''} "
          f"({statistics.median(rates) if rates else float('nan'):.3g} img/s): {'PASS' if passed else 'FAIL'}")
    return passed


# --- speed -------------------------------------------------------------------------------------------------------

def compare_speed(args: argparse.Namespace, work: Path) -> bool:
    key, values = args.vary.split("=", 1)
    values = values.split(",")
    figures = {}
    for index, value in enumerate(values):
        rows = steps_csv(run(args, work / f"{index}", args.device, args.steps, f"{key}={value}"))[1:]
        rate = statistics.median(float(row["img_per_s"]) for row in rows)
        mfu = [float(row["mfu"]) for row in rows if row["mfu"]]  # none where the device's peak is unknown
        figures[value] = rate
        print(f"{key}={value}: {rate:.3g} img/s, MFU {f'{statistics.median(mfu):.1%}' if mfu else 'n/a'}",
              flush=True)
    first, last = values[0], values[-1]
    print(f"{args.model} on {args.device}, {key}: {', '.join(f'{v} {r:.3g} img/s' for v, r in figures.items())}; "
          f"{first} costs {1 - figures[first] / figures[last]:.1%} against {last}")
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("mode", choices=("devices", "resume", "speed"))
    parser.add_argument("--model", default="mambaout_femto", help="a variant with configs/<model>.yaml")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (devices 6, resume 30, speed 40)")
    parser.add_argument("--batch", type=int, default=32, help="global batch")
    parser.add_argument("--micro-batch", type=int, default=0, help="micro batch (default: the global batch)")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--workers", type=int, default=2, help="data.num_workers")
    parser.add_argument("--devices", nargs=2, default=["cpu", "cuda"], help="devices: the two devices")
    parser.add_argument("--device", default="cuda", help="resume, speed: the device")
    parser.add_argument("--stop-at", type=int, default=20, help="resume: the step the first half stops at")
    parser.add_argument("--vary", default="runtime.deterministic=true,false", help="speed: KEY=VALUE,VALUE...")
    parser.add_argument("--out", type=Path, help="keep the run folders here (default: a temporary folder)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_intermixed_args()  # the mode, options and KEY=VALUE overrides in any order
    args.steps = args.steps or {"devices": 6, "resume": 30, "speed": 40}[args.mode]
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("MAMBAOUT_CURVES", "off")  # no curves.png: nobody looks at these runs' plots
    compare = {"devices": compare_devices, "resume": compare_resume, "speed": compare_speed}[args.mode]
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        return 0 if compare(args, args.out) else 1
    with tempfile.TemporaryDirectory(prefix=f"compare_runs_{args.mode}_") as work:
        return 0 if compare(args, Path(work)) else 1


if __name__ == "__main__":
    sys.exit(main())
