#!/usr/bin/env python3
"""How close the tensor pipelines are to timm's PIL pipeline: the tables of docs/DATA.md.

    python scripts/compare_pipelines.py [--images DIR] [--size 64] [--count 2000]

1. Op by op, the same parameters through timm's PIL op and ours: the largest and mean absolute difference
   (0-255 scale) and the share of values more than one grey level apart; also the random-resized crop, the
   evaluation resize and the JPEG decoding.
2. The recipe (``rand-m9-mstd0.5-inc1``, erasing 0.25) drawn by both on ``--count`` images: per-channel mean and
   std of the normalised output, and how often each op, flip and erasing was applied, with the differences that
   exceed 4 standard errors (none expected).

Images: ``--images DIR`` (JPEGs, e.g. from ``scripts/benchmark_data.py --make-jpegs``), else crops of the two
real photos scikit-learn ships.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RECIPE = "rand-m9-mstd0.5-inc1"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, help="folder of JPEGs (default: crops of scikit-learn's photos)")
    parser.add_argument("--size", type=int, default=64, help="side of the compared images (default 64)")
    parser.add_argument("--count", type=int, default=2000, help="augmented images per pipeline (default 2000)")
    args = parser.parse_args()
    from PIL import Image

    from mambaout.data import fidelity

    if args.images:
        files = sorted(str(p) for p in args.images.rglob("*.jp*g"))
        if not files:
            parser.error(f"{args.images} holds no JPEGs")
        photos = [Image.open(f).convert("RGB") for f in files]
    else:
        files, photos = [], fidelity.sample_photos(64, 4 * args.size)
    squares = [photo.resize((args.size, args.size), Image.BICUBIC) for photo in photos]

    print(f"Same parameters, {len(squares)} images of {args.size} px (0-255 scale)\n")
    print("| op | max | mean | > 1 grey level |\n|---|---|---|---|")
    rows = [*fidelity.op_differences(squares), *fidelity.crop_resize_differences(photos, args.size),
            fidelity.eval_differences(photos, args.size)]
    if files:
        rows.append(fidelity.decode_differences(files))
    for row in rows:
        print(f"| {row.name} | {row.max:.0f} | {row.mean:.4f} | {100 * row.over_one:.2f}% |")

    print(f"\nThe recipe ({RECIPE}, erasing 0.25) drawn by both, {args.count} images of {args.size} px\n")
    timm = fidelity.timm_statistics(photos, args.count, args.size, RECIPE, 0.25)
    ours = fidelity.tensor_statistics(photos, args.count, args.size, RECIPE, 0.25)
    print("| | timm | tensor |\n|---|---|---|")
    for channel in range(3):
        print(f"| channel {channel} mean / std | {timm.channel_mean[channel]:.4f} / {timm.channel_std[channel]:.4f} "
              f"| {ours.channel_mean[channel]:.4f} / {ours.channel_std[channel]:.4f} |")
    for event in sorted(set(timm.events) | set(ours.events)):
        print(f"| {event} per image | {timm.events[event] / timm.count:.4f} | {ours.events[event] / ours.count:.4f} |")
    problems = timm.compare(ours)
    print("\ndifferences beyond 4 standard errors: " + ("; ".join(problems) if problems else "none"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
