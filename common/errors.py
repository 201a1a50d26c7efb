"""One error type for bad user input, and the guard that turns it into a one-line exit.

Every command of the pipeline raises `UserError` for input the user can fix (a missing folder,
a damaged split list, an unknown config key); `cli_main` prints it as one line naming the
problem and the fix, and exits with status 2, so that a traceback always means a bug.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TypeVar

from common.status import EXIT_USER_ERROR

T = TypeVar("T")


class UserError(Exception):
    """Input the user can fix; the message names the file or value and the fix."""


def user_message(err: UserError) -> str:
    """The one line a user needs. Raised in a DataLoader worker, a UserError arrives wrapped in
    the worker's traceback ("Caught UserError in DataLoader worker ... UserError: <line>")."""
    return str(err).rstrip().splitlines()[-1].split("UserError: ", 1)[-1] if str(err) else ""


def cli_main(fn: Callable[..., T]) -> Callable[..., T]:
    """Run a command's main; report `UserError` as `error: <message>` and exit 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            print(f"error: {user_message(err)}", file=sys.stderr)
            raise SystemExit(EXIT_USER_ERROR) from None

    return wrapper
