"""Process exit statuses shared by the launcher, the training loop and job scripts.

`accelerate launch` reports any failure of its processes as status 1. So that `make train` exits
like `python -m train` (2 for a user error, 75 when preempted), the launcher names a file in
EXIT_STATUS_ENV and the training processes record their status there before exiting.
"""

import contextlib
import os
import tempfile
from collections.abc import Iterator

EXIT_USER_ERROR = 2  # bad input the user can fix; the one-line message says how
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on request with a checkpoint; rerun to continue
EXIT_INTERRUPTED = 130  # 128 + SIGINT: a shell's status for a process ended by Ctrl-C
EXIT_STATUS_ENV = "PIPELINE_EXIT_STATUS_FILE"


@contextlib.contextmanager
def launch_status_file() -> Iterator[str]:
    """The file a launcher names in EXIT_STATUS_ENV for the processes it starts, in a folder of
    its own removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="launch-status-") as folder:
        yield os.path.join(folder, "exit_status")


def record_exit_status(code: int, line: str = "") -> bool:
    """Write `code` (and the one line printed for it) to the file the launcher named, if it named
    one and no process of the run has yet: the first to end tells why. The others' statuses are
    its consequences: a process left in a collective by a failed peer is sent SIGTERM by
    torchrun's agent and, stuck, would record 75 after `stop_timeout_s`, turning bad input into a
    requeue (a small file each). False where another process recorded this very status and line
    first: every process met the same bad input (a config each reads), whose line is then
    printed once. A status that cannot be written (a full disk) is left out: the exit and its
    line matter more."""
    path = os.environ.get(EXIT_STATUS_ENV)
    if not path:
        return True
    record = f"{code}\n{line}\n"
    try:
        if _write_first(path, record):
            return True
        with open(path) as fh:
            return fh.read() != record
    except OSError:  # not written, or not read back: the line is printed all the same
        return True


def _write_first(path: str, record: str) -> bool:
    """Whether this process wrote `path`, whole: linked into place where the file system has
    hard links, so that no process reads a record half-written, else created, then written."""
    fd, written = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".status-")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(record)
        os.link(written, path)
    except FileExistsError:
        return False
    except OSError:  # no hard links here (some FUSE mounts)
        try:
            with open(path, "x") as fh:
                fh.write(record)
        except FileExistsError:
            return False
    finally:
        with contextlib.suppress(OSError):
            os.unlink(written)
    return True


def status_for_agent(code: int) -> int:
    """The status a training process exits with. Under torchrun's agent (train.launch's runs of
    several processes), a stopped run exits 0, its 75 recorded for the launcher: the agent
    reports any other status as a failure, with a traceback, and it must see the processes end
    as it would a finished run, since it hosts the store their NCCL uses until then."""
    launched = os.environ.get(EXIT_STATUS_ENV) and os.environ.get("TORCHELASTIC_RUN_ID")
    return 0 if code == EXIT_PREEMPTED and launched else code


def read_exit_status(path: str) -> int | None:
    """The status a training process recorded in `path`, or None."""
    try:
        with open(path) as fh:
            return int(fh.readline().strip())
    except (OSError, ValueError):
        return None


def user_error_recorded() -> bool:
    """Whether a process of this launch has ended on bad input (its one line printed): what
    the others then fail of is that process, not a bug of theirs."""
    path = os.environ.get(EXIT_STATUS_ENV)
    return bool(path) and read_exit_status(path) == EXIT_USER_ERROR


def after_peer_error(detail: str = "") -> str:
    """The one line of a process stopped by another process of its launch ending on bad input
    (whose line is above): its own failure, or its stop's deadline, is that one's consequence."""
    rank = os.environ.get("RANK", "?")
    return f"error: process {rank} stopped after another process's error above" + (
        f" ({detail})" if detail else ""
    )
