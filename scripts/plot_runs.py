#!/usr/bin/env python3
"""Plot training runs overlaid: train loss, lr and img/s per logged step; train/eval loss, top-1 and top-5 per epoch.

    python scripts/plot_runs.py runs/quickstart-20250101-120000 --out curves.png
    python scripts/plot_runs.py runs/mambaout_femto runs/mambaout_kobe --out femto-vs-kobe.png

Each RUN is a train.py run folder (train.output_dir: its steps.csv and metrics.csv), finished or still running;
each has its colour, named by its folder. Needs matplotlib: pip install -e '.[plots]'.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from mambaout.cli import requires_extra  # noqa: E402

with requires_extra("plots", "plot_runs.py"):
    from mambaout.plots import plot_runs, read_run, save_figure


def run_names(folders: list[str]) -> list[str]:
    """Folder names, or the paths as given where two folders share a name."""
    names = [Path(folder).name for folder in folders]
    return names if len(set(names)) == len(names) else list(folders)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folders")
    parser.add_argument("--out", required=True, metavar="FILE.png", help="figure to write (.png, .pdf, .svg)")
    args = parser.parse_args(argv)
    try:
        runs = [read_run(folder, name) for folder, name in zip(args.runs, run_names(args.runs))]
    except FileNotFoundError as error:
        parser.error(str(error))
    save_figure(plot_runs(runs), args.out)
    for run in runs:
        print(f"{run.name}: {len(run.steps)} logged steps, {len(run.epochs)} evaluated epochs")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
