"""Process exit statuses shared by the launcher, the training loop and job scripts.

`accelerate launch` reports any failure of its processes as status 1. So that `make train` exits
like `python -m train` (2 for a user error, 75 when preempted), the launcher names a file in
EXIT_STATUS_ENV and the training processes record their status there before exiting.
"""

import os

EXIT_USER_ERROR = 2  # bad input the user can fix; the one-line message says how
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on request with a checkpoint; rerun to continue
EXIT_STATUS_ENV = "PIPELINE_EXIT_STATUS_FILE"


def record_exit_status(code: int) -> None:
    """Write `code` to the file the launcher named, if it named one (several processes may
    write; each writes its whole status with one small write)."""
    path = os.environ.get(EXIT_STATUS_ENV)
    if path:
        with open(path, "w") as fh:
            fh.write(f"{code}\n")


def read_exit_status(path: str) -> int | None:
    """The status a training process recorded in `path`, or None."""
    try:
        with open(path) as fh:
            return int(fh.read().strip())
    except (OSError, ValueError):
        return None
