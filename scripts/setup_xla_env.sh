#!/usr/bin/env bash
# Creates .venv-xla/ at the repository root: the torch_xla environment (PJRT) beside the main .venv/.
#
# torch_xla 2.9.0 works only with exactly torch 2.9.0 + torchvision 0.24.0 (its wheel does not say so; with
# another torch `import torch_xla` fails on an undefined symbol), so the `xla` extra in setup.cfg pins all three.
# On PyPI torch 2.9.0 is the CUDA 12.8 build whose nvidia-* wheels are needed even on CPU: ~7 GB, ~2 min.
#
#   bash scripts/setup_xla_env.sh            # CPU (CI): tests run with PJRT_DEVICE=CPU
#   bash scripts/setup_xla_env.sh --tpu      # on a TPU VM: adds libtpu through torch_xla[tpu]
#
# Re-running it reuses an existing .venv-xla/ (pip only installs what is missing).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${XLA_VENV:-.venv-xla}
tpu=""
for arg in "$@"; do
  case "$arg" in
    --tpu) tpu=1 ;;
    *) echo "usage: $0 [--tpu]" >&2; exit 2 ;;
  esac
done
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# what the XLA suite needs (pytest; scikit-learn's photos for the augmentation check), not dev's demo, plot and
# fine-tuning packages: their test files skip here
"$VENV/bin/python" -m pip install -q -e ".[xla]" "pytest>=8" "scikit-learn>=1.3"
if [ -n "$tpu" ]; then
  version=$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("torch_xla"))')
  "$VENV/bin/python" -m pip install -q "torch_xla[tpu]==$version"
fi
# fails here, not in the tests, when torch_xla cannot load (e.g. a torch it was not built for)
PJRT_DEVICE=${PJRT_DEVICE:-CPU} "$VENV/bin/python" - <<'PY'
import torch, torch_xla, torchvision
print(f"{__import__('sys').prefix}: torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"torch_xla {torch_xla.__version__}")
PY
