"""One error type for bad user input, and the guard that turns it into a one-line exit.

Every command of the pipeline raises `UserError` for input the user can fix (a missing folder,
a damaged split list, an unknown config key); `cli_main` prints it as one line naming the
problem and the fix, and exits with status 2, so that a traceback always means a bug. Input that
is accepted but odd gets one `warning:` line (`warn`).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import gc
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

from common.status import (
    EXIT_INTERRUPTED,
    EXIT_USER_ERROR,
    after_peer_error,
    record_exit_status,
    user_error_recorded,
)

T = TypeVar("T")
# How torch re-raises an exception from a DataLoader worker: the worker's traceback as the message.
WORKER_WRAPPER = "Caught UserError in DataLoader worker"


class UserError(Exception):
    """Input the user can fix; the message names the file or value and the fix."""


def user_message(err: UserError) -> str:
    """The one line a user needs. Raised in a DataLoader worker, a UserError arrives wrapped in
    the worker's traceback ("Caught UserError in DataLoader worker ... UserError: <message>"):
    only the message is kept. A message of several lines is joined, never cut."""
    text = str(err).strip()
    if text.startswith(WORKER_WRAPPER):
        text = text.rsplit("UserError: ", 1)[-1]
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def warn(message: str) -> None:
    """One `warning:` line on stderr: accepted, but the user should know."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


@functools.cache
def end_without_final_collections() -> None:
    """When the interpreter ends, the objects still alive are left to the OS (`gc.freeze`):
    Python's last garbage collections over the million objects of torch, torchvision and timm
    took 0.8 s of a 6 s training command on the tiny dataset (farm-bench, 5.99 -> 5.16 s;
    2-core Intel Xeon, 2026-12-07). atexit handlers still run, and objects freed by their
    reference count are finalised as before; only cycles are not collected, which the exit
    frees anyway. In a process that calls a command's main in-process (a notebook, the tests),
    this happens only at that process's own exit."""
    atexit.register(gc.freeze)


@contextlib.contextmanager
def sigterm_held() -> Iterator[None]:
    """SIGTERM held until the block ends, then taken as it would have been: between recording
    the line that its peers then leave unprinted and printing it, a process must not die."""
    previous = signal.getsignal(signal.SIGTERM)
    if previous is None or threading.current_thread() is not threading.main_thread():
        yield  # a handler set outside Python, or a thread that cannot set one: left as is
        return
    held: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        if held:
            os.kill(os.getpid(), signal.SIGTERM)


def cli_main(fn: Callable[..., T]) -> Callable[..., T]:
    """Run a command's main; report `UserError` as `error: <message>` and exit 2, and Ctrl-C
    as one line and death by SIGINT (status 130 in a shell)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        end_without_final_collections()
        try:
            result = fn(*args, **kwargs)
        except UserError as err:
            line = f"error: {user_message(err)}"
            with sigterm_held():  # torchrun's agent SIGTERMs the rest once a process has ended
                if record_exit_status(EXIT_USER_ERROR, line):
                    # Process 0 draws the progress bar: another's line starts a line of its own.
                    ahead = "\n" if os.environ.get("RANK", "0") != "0" else ""
                    print(ahead + line, file=sys.stderr, flush=True)
            raise SystemExit(EXIT_USER_ERROR) from None
        except RuntimeError as err:
            if not user_error_recorded():
                raise
            # A peer of a launch ended on bad input and this process's next collective failed
            # (gloo: "Connection closed by peer"): one line, not a traceback after its error.
            # (torch's errors are RuntimeErrors; a TypeError or the like keeps its traceback.)
            detail = f"{type(err).__name__}: {user_message(err)}"
            print(after_peer_error(detail), file=sys.stderr, flush=True)
            raise SystemExit(1) from None
        except KeyboardInterrupt:
            # Ctrl-C: one line instead of a traceback (every output is written atomically, so
            # what was cut short is absent), then death by SIGINT as Python's own: a shell
            # loop over commands stops only for a child that SIGINT killed.
            print("interrupted (Ctrl-C)", file=sys.stderr, flush=True)
            record_exit_status(EXIT_INTERRUPTED)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
            raise SystemExit(EXIT_INTERRUPTED) from None  # (where SIGINT cannot kill: Windows)
        if isinstance(result, int) and not isinstance(result, bool) and result != 0:
            record_exit_status(result)
        return result

    return wrapper
