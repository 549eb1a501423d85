"""Put on PYTHONPATH by tests/tpu_standin.py for train.py subprocesses (torchrun's workers too): runtime.device=tpu
then runs on the CPU stand-in for TorchTPU. Other programs (torchrun itself) run untouched."""
import os
import sys

if os.path.basename(sys.argv[0]) == "train.py":
    tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path[:0] = [os.path.dirname(tests), tests]  # the repository first, as `python train.py` has it
    import tpu_standin

    tpu_standin.install()
