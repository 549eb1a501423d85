"""Detection and segmentation with MambaOut backbones: the paper's COCO (Mask R-CNN) and ADE20K (UperNet) setups,
fine-tuned by scripts/finetune_detection.py and scripts/finetune_segmentation.py with train.py's run machinery.

Needs the ``downstream`` extra (pycocotools, segmentation-models-pytorch).
"""
from .backbone import MambaOutBackbone
from .detection import build_maskrcnn
from .segmentation import build_upernet

__all__ = ["MambaOutBackbone", "build_maskrcnn", "build_upernet"]
