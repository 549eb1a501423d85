"""What the command lines share: user mistakes end in one readable line, never a traceback."""
from __future__ import annotations

import sys
from typing import Callable

from .checkpoint import CheckpointError
from .config import ConfigError
from .data import DatasetFormatError, DatasetNotFoundError
from .runtime import DistributedRuntimeError
from .tracking import RunFolderError

# Errors whose message already says what is wrong and how to fix it.
USER_ERRORS: tuple[type[BaseException], ...] = (
    CheckpointError, ConfigError, DatasetFormatError, DatasetNotFoundError, DistributedRuntimeError, RunFolderError)


def run_cli(main: Callable[[], int], program: str, extra_errors: tuple[type[BaseException], ...] = ()) -> None:
    """Runs ``main`` and exits with its status; a known user error prints ``program: error: ...`` (status 2)."""
    try:
        sys.exit(main())
    except USER_ERRORS + extra_errors as error:
        print(f"{program}: error: {error}", file=sys.stderr)
        sys.exit(2)
