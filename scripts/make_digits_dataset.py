"""Exports scikit-learn's handwritten digits (shipped with scikit-learn, no download) as an ImageFolder
dataset for quick end-to-end runs:

    python scripts/make_digits_dataset.py OUT [--size 32]

writes ``OUT/train/<digit>/<sample>.png`` (1,497 images) and ``OUT/val/<digit>/<sample>.png`` (300 images,
30 per digit). The split is fixed: within each digit, the validation samples are evenly spaced over the
dataset order. Images are the 8x8 digits (values 0..16 scaled to 0..255), upscaled with nearest-neighbour
(exact on every Pillow version) to RGB PNGs.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

VAL_PER_CLASS = 30


def split_indices(targets: np.ndarray, val_per_class: int) -> tuple[list[int], list[int]]:
    """Deterministic stratified split: ``val_per_class`` evenly spaced samples of each class go to val."""
    val = []
    for digit in np.unique(targets):
        members = np.flatnonzero(targets == digit)
        positions = np.linspace(0, len(members) - 1, val_per_class).round().astype(int)
        val += members[positions].tolist()
    val_set = set(val)
    return [i for i in range(len(targets)) if i not in val_set], sorted(val)


def to_image(pixels: np.ndarray, size: int) -> Image.Image:
    gray = np.round(pixels * (255 / 16)).astype(np.uint8)
    return Image.fromarray(gray).resize((size, size), Image.Resampling.NEAREST).convert("RGB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="output folder (must not exist or be empty)")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels (default: 32)")
    args = parser.parse_args()
    if args.out.exists() and any(args.out.iterdir()):
        parser.error(f"{args.out} is not empty; choose a new folder or delete its content first")

    digits = load_digits()
    train, val = split_indices(digits.target, VAL_PER_CLASS)
    for split, indices in (("train", train), ("val", val)):
        for index in indices:
            folder = args.out / split / str(digits.target[index])
            folder.mkdir(parents=True, exist_ok=True)
            to_image(digits.images[index], args.size).save(folder / f"{index:04d}.png")
    print(f"wrote {len(train)} train and {len(val)} val images of 10 digits "
          f"({args.size}x{args.size} RGB PNG) to {args.out}")


if __name__ == "__main__":
    sys.exit(main())
