#!/usr/bin/env python3
"""Fine-tune Mask R-CNN with a MambaOut backbone on COCO-format data (the paper's COCO setup), evaluating box and
mask AP with pycocotools.

    python scripts/finetune_detection.py --config configs/downstream/maskrcnn_mambaout_tiny_coco.yaml \\
        data.root=/data/coco model.checkpoint=mambaout_tiny.pth
    torchrun --nproc_per_node=8 scripts/finetune_detection.py --config ... data.root=/data/coco

The run folder, checkpoints, resume and preemption are train.py's (`--resume`, `--print-config`,
`--help-config`, KEY=VALUE overrides). Exit status: 0 done, 2 bad input or a run folder in use, 3 non-finite
loss, 75 preempted (rerun to go on). Needs the downstream extra: pip install -e '.[downstream]'.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from mambaout.cli import requires_extra, run_cli  # noqa: E402
from mambaout.trainer import ResumeError  # noqa: E402

with requires_extra("downstream", "finetune_detection.py"):
    from mambaout.downstream.detection import DETECTION
    from mambaout.downstream.finetune import finetune_command


def main(argv=None) -> int:
    return finetune_command(DETECTION, "finetune_detection.py", __doc__, argv)


if __name__ == "__main__":
    run_cli(main, "finetune_detection.py", extra_errors=(ResumeError,))
