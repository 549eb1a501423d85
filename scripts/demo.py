#!/usr/bin/env python3
"""The demo in a browser: upload a photo, see the model's top-5 classes (mambaout/demo.py).

    python scripts/demo.py --checkpoint runs/quickstart-<time>/best.pth    # after the quickstart
    python scripts/demo.py --model mambaout_femto --pretrained              # the released weights
    python scripts/demo.py --checkpoint exports/mambaout_small --port 8080  # an export folder

Needs gradio: pip install -e '.[demo]'. Then open the address it prints (http://127.0.0.1:7860).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from mambaout.cli import requires_extra  # noqa: E402

with requires_extra("demo", "demo.py"):
    from mambaout.demo import main

if __name__ == "__main__":
    sys.exit(main())
