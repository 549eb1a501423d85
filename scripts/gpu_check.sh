#!/usr/bin/env bash
# The checks that need an NVIDIA GPU, in one command, ending with one summary table.
#
#   bash scripts/gpu_check.sh            # from the repository root, on a machine with a CUDA GPU
#
# Runs on the machine's own python3 (torch, torchvision and timm preinstalled, no registry needed): no venv,
# the repository on PYTHONPATH; a check whose optional package is missing is skipped with a note. Carry the
# pinned timm as a wheel when the machine's differs (README, "GPU check"). What it runs, each with its time:
#   1. the tests marked `cuda` (nvJPEG decoding and the device augmentation against the CPU's; checkpoints
#      written on the GPU load on a CPU-only machine);
#   2. the input pipelines on ImageNet-sized JPEGs: per CPU core (timm, tensor, its host part, nvjpeg's
#      workers) and the GPU part of nvjpeg (decode + crop + augment) in img/s (goal: >= 5k img/s on an H200);
#   3. the speed cost of runtime.deterministic (the recipes' default): train.py's img/s on MambaOut-Small with
#      synthetic images (no decoding, so the GPU sets the pace), deterministic kernels against torch's defaults;
#   4. validate.py on that run's checkpoint; with 2+ GPUs a 2-process NCCL run of train.py;
#   5. the model step (bf16, channels-last), eager and compiled: ours in both block formulations vs timm's;
#   6. train.py's full step against a bare loop and timm's model (benchmark_train.py), femto/tiny/small, MFU.
#   7. the selective scan (forward + backward at stage-1 length): portable chunks vs mamba_ssm's kernel if installed.
# The cuda tests include the sync-debug test: no host synchronisation inside a training step.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT_DIR=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT_DIR"
declare -a rows=()

check() {  # check NAME COMMAND...: runs it, logs to $OUT_DIR/NAME.log, records status, time and its last line
  local name=$1; shift
  local start=$SECONDS
  "$@" >"$OUT_DIR/$name.log" 2>&1
  local status=$?
  local last
  last=$(grep -v '^\s*$' "$OUT_DIR/$name.log" | tail -n 1 | cut -c1-110)
  rows+=("$(printf '| %-22s | %-4s | %4ss | %s |' "$name" "$([ $status -eq 0 ] && echo ok || echo FAIL)" \
    $((SECONDS - start)) "$last")")
  echo "== $name: status $status"
}

"$PYTHON" - <<'PY' | tee "$OUT_DIR/environment.log"
import torch, torchvision, timm
print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__}, "
      f"CUDA {torch.version.cuda}, GPU: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
if not timm.__version__.startswith("1.0."):
    print(f"note: timm {timm.__version__} is outside the pinned range (>=1.0.31,<1.1); carry the pinned wheel")
PY

check cuda-tests "$PYTHON" -m pytest -q -m cuda -p no:cacheprovider tests
if "$PYTHON" -c "import sklearn" 2>/dev/null; then
  check make-jpegs "$PYTHON" scripts/benchmark_data.py --make-jpegs "$OUT_DIR/jpegs"
  check data-pipelines "$PYTHON" scripts/benchmark_data.py --data "$OUT_DIR/jpegs" --cores 4 --rounds 3
else
  rows+=("| data-pipelines         | skip |    0s | scikit-learn (its sample photos make the JPEGs) is missing |")
fi

for deterministic in true false; do  # the run folders are made anew: a second check would resume the first
  rm -rf "$OUT_DIR/deterministic-$deterministic"
  check "deterministic-$deterministic" "$PYTHON" train.py --config configs/mambaout_small.yaml \
    data.format=synthetic data.synthetic_val_size=1024 data.num_workers=8 optim.global_batch_size=128 \
    train.max_steps=60 train.log_interval=10 runtime.deterministic=$deterministic \
    train.output_dir="$OUT_DIR/deterministic-$deterministic"
done
"$PYTHON" - "$OUT_DIR" >"$OUT_DIR/deterministic-cost.log" 2>&1 <<'PY'
import csv, statistics, sys
from pathlib import Path

rates, mfu = {}, {}
for deterministic in ("true", "false"):
    with open(Path(sys.argv[1]) / f"deterministic-{deterministic}" / "steps.csv") as f:
        rows = list(csv.DictReader(f))[1:]  # the first interval holds the warm-up
    rates[deterministic] = statistics.median(float(row["img_per_s"]) for row in rows)
    mfu[deterministic] = statistics.median(float(row["mfu"] or "nan") for row in rows)
print(f"runtime.deterministic=true: {rates['true']:.0f} img/s (MFU {mfu['true']:.1%}), false: {rates['false']:.0f} "
      f"img/s (MFU {mfu['false']:.1%}), cost {1 - rates['true'] / rates['false']:.1%}")
PY

check validate "$PYTHON" validate.py --model mambaout_small --checkpoint "$OUT_DIR/deterministic-true/last.pth" \
  --device cuda data.format=synthetic data.synthetic_val_size=1024
if [ "$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
  rm -rf "$OUT_DIR/two-gpus"
  check two-gpus "$PYTHON" -m torch.distributed.run --nproc_per_node 2 train.py --config configs/mambaout_femto.yaml \
    data.format=synthetic data.synthetic_val_size=512 data.num_workers=4 optim.global_batch_size=256 \
    train.max_steps=20 train.log_interval=5 train.output_dir="$OUT_DIR/two-gpus"
else
  rows+=("| two-gpus               | skip |    0s | one GPU on this machine |")
fi

for mode in eager compiled; do
  check "model-small-$mode" "$PYTHON" scripts/benchmark_model.py --model mambaout_small --batch-size 128 \
    --device cuda --precision bf16 --channels-last --rounds 10 --warmup 3 $([ $mode = compiled ] && echo --compile)
done
check ssm-scan "$PYTHON" scripts/benchmark_ssm.py --device cuda --batch 64 --chunks 64,256
for variant in femto tiny small; do
  check "train-step-$variant" "$PYTHON" scripts/benchmark_train.py --model "mambaout_$variant" --batch 128 \
    --steps 15 --rounds 2 --device cuda train.precision=bf16 train.channels_last=true data.num_workers=8
done

echo
echo "| check | status | time | last line |"
echo "|---|---|---|---|"
printf '%s\n' "${rows[@]}"
echo
echo "data pipelines:"
grep -E "img/s" "$OUT_DIR/data-pipelines.log" 2>/dev/null
echo
echo "deterministic kernels:"
tail -n 1 "$OUT_DIR/deterministic-cost.log"
echo
echo "model step (img/s, ratio to timm):"
cat "$OUT_DIR"/model-small-*.log 2>/dev/null | grep -E "img/s|block form|mambaout"
echo
echo "selective scan:"
grep -E "ms, peak|selective" "$OUT_DIR/ssm-scan.log" 2>/dev/null
echo
echo "train.py step against the bare loop:"
for variant in femto tiny small; do grep -aE "x the bare loop|batch" "$OUT_DIR/train-step-$variant.log" | tr '\r' '\n' \
  | grep -E "x the bare loop|^mambaout"; done
