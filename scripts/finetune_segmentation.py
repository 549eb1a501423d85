#!/usr/bin/env python3
"""Fine-tune UperNet with a MambaOut backbone on ADE20K-layout data (the paper's ADE20K setup), evaluating mIoU
and pixel accuracy.

    python scripts/finetune_segmentation.py --config configs/downstream/upernet_mambaout_tiny_ade20k.yaml \\
        data.root=/data/ADEChallengeData2016 model.checkpoint=mambaout_tiny.pth
    torchrun --nproc_per_node=8 scripts/finetune_segmentation.py --config ... data.root=/data/ADEChallengeData2016

The run folder, checkpoints, resume and preemption are train.py's (`--resume`, `--print-config`,
`--help-config`, KEY=VALUE overrides). Exit status: 0 done, 2 bad input or a run folder in use, 3 non-finite
loss, 75 preempted (rerun to go on). Needs the downstream extra: pip install -e '.[downstream]'.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from mambaout.cli import requires_extra, run_cli  # noqa: E402
from mambaout.trainer import ResumeError  # noqa: E402

with requires_extra("downstream", "finetune_segmentation.py"):
    from mambaout.downstream.finetune import finetune_command
    from mambaout.downstream.segmentation import SEGMENTATION


def main(argv=None) -> int:
    return finetune_command(SEGMENTATION, "finetune_segmentation.py", __doc__, argv)


if __name__ == "__main__":
    run_cli(main, "finetune_segmentation.py", extra_errors=(ResumeError,))
