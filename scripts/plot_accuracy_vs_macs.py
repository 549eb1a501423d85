#!/usr/bin/env python3
"""Plot ImageNet top-1 against GMACs (log scale), marker area by parameters: the paper's MambaOut models, and
the runs of validate.py results files beside them.

    python validate.py --model mambaout_femto --checkpoint best.pth --data /data/imagenet --results results.csv
    python scripts/plot_accuracy_vs_macs.py results.csv --out accuracy_vs_macs.png

Each RESULTS file is written by validate.py --results (.json: one run; .csv: a row per run). Without any, the
figure shows the paper's models alone. Needs matplotlib: pip install -e '.[plots]'.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from mambaout.cli import requires_extra  # noqa: E402

with requires_extra("plots", "plot_accuracy_vs_macs.py"):
    from mambaout.plots import plot_accuracy_vs_macs, save_figure


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="*", metavar="RESULTS", help="validate.py --results files (.json, .csv)")
    parser.add_argument("--out", required=True, metavar="FILE.png", help="figure to write (.png, .pdf, .svg)")
    args = parser.parse_args(argv)
    try:
        figure = plot_accuracy_vs_macs(args.results)
    except (OSError, ValueError) as error:
        parser.error(str(error))
    save_figure(figure, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
