#!/usr/bin/env python3
"""Export weights to timm's hub format: OUT_DIR/model.safetensors and OUT_DIR/config.json; or to ONNX:
OUT_DIR/model.onnx.

    python scripts/export.py runs/quickstart-<time>/best.pth exports/digits-femto
    python scripts/export.py mambaout_small.pth exports/mambaout_small --model mambaout_small
    python scripts/export.py runs/quickstart-<time>/best.pth exports/digits-femto --format onnx

CHECKPOINT is any weights this project reads: a run's checkpoint (its config gives the model, the class names and
the preprocessing), the release, a timm/hub file. The folder then loads with
timm.create_model('local-dir:OUT_DIR', pretrained=True), mambaout.create_model(NAME, checkpoint=OUT_DIR),
validate.py --checkpoint OUT_DIR and scripts/demo.py --checkpoint OUT_DIR, and uploads to the Hugging Face hub with
`hf upload USER/REPO OUT_DIR`. The ONNX model takes normalised images of any batch size and carries the
preprocessing and class names in its metadata; scripts/validate_onnx.py evaluates it with onnxruntime.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from mambaout.cli import requires_extra, run_cli  # noqa: E402
from mambaout.export import Export, ExportError, OnnxExport, export_for_hub, export_onnx  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="weights to export (a file, or a run's best.pth)")
    parser.add_argument("out_dir", help="folder to write model.safetensors and config.json (or model.onnx) into")
    parser.add_argument("--format", choices=("hub", "onnx"), default="hub",
                        help="hub: timm's hub format (default); onnx: model.onnx for onnxruntime")
    parser.add_argument("--model", help="architecture, where the checkpoint does not say it")
    parser.add_argument("--ema", action="store_true", help="export the EMA weights of a training checkpoint")
    return parser.parse_args(argv)


def report(export: Export) -> str:
    classifier, folder = export.classifier, export.folder
    size = classifier.preprocessing.img_size
    lines = [f"wrote {folder}/model.safetensors and {folder}/config.json: {classifier.model_name}, "
             f"{classifier.num_classes} classes, evaluated at {size} x {size} px"]
    if export.timm_loads_it:
        lines.append(f"  timm:     timm.create_model('local-dir:{folder}', pretrained=True)")
    else:
        lines.append(f"  timm:     cannot load it: {classifier.model_name} is an architecture of this project, not "
                     "of timm; use the loaders below")
    lines += [f"  mambaout: mambaout.create_model('{classifier.model_name}', checkpoint='{folder}')",
              f"            python validate.py --checkpoint {folder} --data DIR",
              f"            python scripts/demo.py --checkpoint {folder}",
              f"  publish:  hf upload USER/REPO {folder} .   (huggingface_hub's CLI, after hf auth login)"]
    return "\n".join(lines)


def onnx_report(export: OnnxExport) -> str:
    classifier, size = export.classifier, export.classifier.preprocessing.img_size
    return "\n".join([
        f"wrote {export.path} in {export.seconds:.1f} s: {classifier.model_name}, {classifier.num_classes} classes, "
        f"images [batch, 3, {size}, {size}] normalised -> logits",
        f"  preprocessing (in its metadata): {classifier.preprocessing.describe()}",
        f"  onnxruntime gives PyTorch's logits to {export.max_logit_difference:.1e} (random batch)",
        f"  validate: python scripts/validate_onnx.py {export.path} --data DIR"])


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.format == "onnx":
        with requires_extra("onnx", "export.py"):
            print(onnx_report(export_onnx(args.checkpoint, args.out_dir, args.model, args.ema)))
    else:
        print(report(export_for_hub(args.checkpoint, args.out_dir, args.model, args.ema)))
    return 0


if __name__ == "__main__":
    run_cli(main, "export.py", extra_errors=(ValueError, ExportError))
