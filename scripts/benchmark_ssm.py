#!/usr/bin/env python3
"""Time and peak memory of the selective scan's forward + backward (mambaout.models.ssm), per chunk size, and on
a GPU against mamba_ssm's kernel when it is installed.

    python scripts/benchmark_ssm.py [--batch 8] [--length 3136] [--channels 96] [--states 16] [--device cpu]

Each configuration runs in a fresh process, so its peak memory is its own: on CPU the growth of the process's
peak resident memory over its state before the inputs were made (glibc is told to hand large blocks back at once,
so the peak is that of live memory), on CUDA torch's peak allocation. ``chunk = L`` is the unchunked parallel
scan, for comparison; ``full tensor`` is the size of one batch x D x L x N fp32 tensor.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def measure(args: argparse.Namespace, chunk: int, use_kernel: bool) -> dict:
    """Forward + backward once to warm up, then timed; peak memory of the timed pass's process."""
    sys.path.insert(0, str(REPO))
    import torch

    from mambaout.models.ssm import selective_scan

    device = torch.device(args.device)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    torch.manual_seed(0)
    b, d, length, n = args.batch, args.channels, args.length, args.states

    def leaf(*shape, scale=1.0):
        return (torch.randn(*shape, device=device) * scale).requires_grad_()
    tensors = dict(u=leaf(b, d, length), delta=leaf(b, d, length, scale=0.5),
                   A=(-torch.arange(1, n + 1, device=device, dtype=torch.float32).repeat(d, 1)).requires_grad_(),
                   B=leaf(b, n, length), C=leaf(b, n, length), D=leaf(d), z=leaf(b, d, length),
                   delta_bias=leaf(d, scale=0.5))
    times = []
    for _ in range(2):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        selective_scan(**tensors, delta_softplus=True, chunk_size=chunk, use_kernel=use_kernel).sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024  # kB on Linux
    return {"seconds": times[-1], "peak_mib": peak}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=3136, help="sequence length (3136 = stage 1 at 224 px)")
    parser.add_argument("--channels", type=int, default=96)
    parser.add_argument("--states", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--chunks", default="8,16,32")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # chunk:kernel, in the child process
    args = parser.parse_args()
    if args.one:
        chunk, kernel = args.one.split(":")
        print(json.dumps(measure(args, int(chunk), kernel == "1")))
        return 0
    runs = [(int(chunk), False) for chunk in args.chunks.split(",")] + [(args.length, False)]
    if args.device.startswith("cuda"):
        import torch

        from mambaout.models.ssm import kernel_available

        if kernel_available(torch.device(args.device)):
            runs.append((0, True))
        else:
            print("mamba_ssm's kernel is not installed or does not run here: not compared "
                  "(pip install -e '.[ssm-cuda]')")
    full = args.batch * args.channels * args.length * args.states * 4 / 2**20
    print(f"selective scan, batch {args.batch}, L {args.length}, D {args.channels}, N {args.states}, "
          f"{args.device}: forward + backward (full tensor: {full:.0f} MiB)")
    for chunk, kernel in runs:
        name = "mamba_ssm kernel" if kernel else (f"portable, chunk {chunk}" if chunk < args.length
                                                  else "unchunked (chunk = L)")
        command = [sys.executable, __file__, *sys.argv[1:], "--one", f"{chunk}:{int(kernel)}"]
        timed = subprocess.run(command, capture_output=True, text=True)
        # memory in a second run with blocks over 128 KiB mmapped and unmapped when freed (slower, so untimed):
        # resident memory then follows live memory
        sized = subprocess.run(command, capture_output=True, text=True,
                               env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"})
        if timed.returncode != 0 or sized.returncode != 0:
            error = (timed.stderr or sized.stderr).strip().splitlines()
            print(f"  {name:>22}: failed: {error[-1] if error else 'no output'}")
            continue
        seconds = json.loads(timed.stdout.strip().splitlines()[-1])["seconds"]
        peak = json.loads(sized.stdout.strip().splitlines()[-1])["peak_mib"]
        print(f"  {name:>22}: {seconds * 1e3:8.1f} ms, peak {peak:7.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
