#!/usr/bin/env bash
# Creates .venv-tpu/ at the repository root: the main .venv/ plus TorchTPU (the `tpu` extra: torch-tpu, libtpu),
# where the CPU suite checks the TorchTPU API that mambaout/runtime/torch_tpu.py calls (pytest -m torch_tpu).
#
# .venv-tpu/ sees .venv/'s packages (a .pth file) and installs only what .venv/ lacks: ~1.1 GB, under a minute.
# TorchTPU loads at every `import torch` once installed (torch's backend autoload); kept apart, it does not slow
# the main suite's hundreds of processes. On a TPU VM install the extra into .venv/ itself (README).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || { echo "setup_tpu_env.sh: create .venv/ first (README's test command)" >&2; exit 2; }
VENV=.venv-tpu
[ -x "$VENV/bin/python" ] || .venv/bin/python -m venv "$VENV"
main_site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
tpu_site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "import site; site.addsitedir('$main_site')" > "$tpu_site/main-venv.pth"
"$VENV/bin/python" -m pip install -q -e ".[tpu]"
