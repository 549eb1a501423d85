"""Put on PYTHONPATH by tests/faults.py for train.py subprocesses (torchrun's workers too): installs the fault
that MAMBAOUT_TEST_FAULT describes, and appends each process's exit status to MAMBAOUT_TEST_EXIT_LOG (torchrun
reports only the statuses it saw before stopping the other workers). Other programs (torchrun itself) run
untouched."""
import os
import sys

if os.path.basename(sys.argv[0]) == "train.py":
    tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # the repository first, as `python train.py` will have it, then tests/ for faults.py
    sys.path[:0] = [os.path.dirname(tests), tests]
    import faults

    faults.install_from_env()
