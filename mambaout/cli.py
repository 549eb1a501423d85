"""What the command lines share: user mistakes end in one readable line, never a traceback."""
from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Callable

from .checkpoint import CheckpointError
from .config import ConfigError
from .data import DatasetFormatError, DatasetNotFoundError
from .data.sources import DataSourceError, ShardUnreachableError
from .runtime import DistributedRuntimeError
from .tracking import RunFolderError

# Errors whose message already says what is wrong and how to fix it.
USER_ERRORS: tuple[type[BaseException], ...] = (
    CheckpointError, ConfigError, DataSourceError, DatasetFormatError, DatasetNotFoundError, DistributedRuntimeError,
    RunFolderError)
STORAGE_UNREACHABLE_EXIT_CODE = 4  # the data's storage stayed unreachable: rerun to resume once it answers


def run_cli(main: Callable[[], int], program: str, extra_errors: tuple[type[BaseException], ...] = ()) -> None:
    """Runs ``main`` and exits with its status; a known user error prints ``program: error: ...`` (status 2)."""
    try:
        sys.exit(main())
    except USER_ERRORS + extra_errors as error:
        print(f"{program}: error: {user_message(error)}", file=sys.stderr)
        sys.exit(STORAGE_UNREACHABLE_EXIT_CODE if isinstance(error, ShardUnreachableError) else 2)


def user_message(error: BaseException) -> str:
    """The error's own message; raised in a DataLoader worker, torch re-raises it with the worker's traceback in
    the message, whose last line is the original ``module.Error: message``."""
    text = str(error)
    if not text.startswith("Caught ") or "Original Traceback" not in text:
        return text
    last = [line for line in text.splitlines() if line.strip()][-1]
    return last.split(": ", 1)[1] if ": " in last else last


@contextlib.contextmanager
def requires_extra(extra: str, program: str) -> Iterator[None]:
    """Imports inside it that fail for a missing third-party package end in one line naming the extra to install
    (``pip install -e '.[demo]'``), status 2."""
    try:
        yield
    except ModuleNotFoundError as error:
        if error.name is None or error.name.split(".")[0] == "mambaout":
            raise
        print(f"{program}: error: this needs {error.name.split('.')[0]}, which is not installed: "
              f"pip install -e '.[{extra}]'", file=sys.stderr)
        sys.exit(2)
