#!/usr/bin/env python3
"""The quickstart: train MambaOut-Femto on scikit-learn's handwritten digits, then validate it.

Runs, and prints, the three commands a real run uses:
    python scripts/make_digits_dataset.py data/digits
    python train.py --config configs/quickstart_digits.yaml train.output_dir=runs/quickstart-<time>
    python validate.py --config configs/quickstart_digits.yaml --checkpoint runs/quickstart-<time>/best.pth
"""
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(*args: str) -> None:
    command = [sys.executable, *args]
    print("$ " + shlex.join(["python", *args]), flush=True)
    subprocess.run(command, cwd=REPO, check=True)


def main() -> int:
    start = time.perf_counter()
    data = REPO / "data" / "digits"
    if not (data / "val").is_dir():
        run("scripts/make_digits_dataset.py", str(data.relative_to(REPO)))
    output = f"runs/quickstart-{time.strftime('%Y%m%d-%H%M%S')}"
    config = "configs/quickstart_digits.yaml"
    try:
        run("train.py", "--config", config, f"train.output_dir={output}")
        run("validate.py", "--config", config, "--checkpoint", f"{output}/best.pth",
            "--results", f"{output}/validation.json")
    except subprocess.CalledProcessError as error:
        return error.returncode
    top1 = json.loads((REPO / output / "validation.json").read_text())["top1"]
    print(f"quickstart done in {time.perf_counter() - start:.0f} s: validation top-1 {top1:.2f}% "
          f"(run folder: {output})")
    print(f"see it: python scripts/demo.py --checkpoint {output}/best.pth   (its curves: {output}/curves.png)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
