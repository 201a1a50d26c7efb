"""Stop requests: SIGTERM/SIGUSR1/Ctrl-C end a run with a checkpoint, or in bounded time without
one; a second Ctrl-C quits at once.

The loop reads `requested` at every step boundary, checkpoints and exits with EXIT_PREEMPTED
(under torchrun's agent: exits 0 with EXIT_PREEMPTED recorded, common/status.py).
A run that cannot reach a boundary (a loader worker stuck on a hung network disk, a peer process
that died inside a collective) must still end, or `timeout` and a cluster's time limit could not
stop it: `timeout_s` after the first stop signal the process says so in one line, kills its
loader workers and exits with EXIT_PREEMPTED (a rerun resumes from the newest checkpoint).

Python runs signal handlers only between bytecodes of the main thread, so a main thread blocked
in C would never start that clock. The C-level handler also writes the signal number to a
wake-up pipe (`signal.set_wakeup_fd`); a watchdog thread reads it and keeps the clock instead.

A run started from Python (a notebook, a sweep driver, the tests) must leave the process as it
found it: `close()` (or the end of a `with` block) puts back the previous handlers and wake-up
fd and ends the watchdog, whose clock, if running, is cancelled, or handed to the enclosing
request when one is open: what runs after the run (a tracker's flush, the next `batch_size:
auto` attempt) is held to the same deadline.

`python -m train` holds a request of its own around the whole run, opened before torch is
imported: a stop that comes before the run's request exists (train.launch relays one as soon as
the process catches it), between `batch_size: auto` attempts or after the run, is neither fatal
nor lost. A request opened inside another starts with the stops the open ones have seen, and a
stop marks every open request. This module imports torch only when a watchdog fires.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import threading
import time

from common.status import (
    EXIT_INTERRUPTED,
    EXIT_PREEMPTED,
    after_peer_error,
    record_exit_status,
    status_for_agent,
    user_error_recorded,
)

# Ctrl-C (SIGINT) stops like the others; a second one, or one after a stop signal, interrupts
# at once (KeyboardInterrupt, no checkpoint).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
# How long a second Ctrl-C waits for the main thread to take its KeyboardInterrupt and close
# the request: a run inside a notebook unwinds (its loader workers joined) rather than the
# kernel ending; a main thread blocked in C never does.
GRACE_S = 10.0
CTRL_C = (
    "Ctrl-C: stopping at the next step, with a checkpoint (press it again to quit at once, "
    "without one)"
)
_open: list[StopRequest] = []  # the requests now open, outermost first
NO_CHECKPOINT = (
    "error: no checkpoint within stop_timeout_s={:g} s of the stop signal (a data loader worker "
    "or another process hangs); exiting without one: a rerun resumes from the newest checkpoint\n"
)
AFTER_THE_RUN = (
    "error: the process did not end within stop_timeout_s={:g} s of the stop signal (what ran "
    "after the run, a tracker's flush or another process, hangs); exiting: a rerun resumes from "
    "the newest checkpoint\n"
)


class StopRequest:
    """Remembers SIGTERM/SIGUSR1/SIGINT; ends the process `timeout_s` later if the loop has not.
    Must be made and closed on the main thread (Python's signal API requires it)."""

    def __init__(self, timeout_s: float) -> None:
        self.requested = any(request.requested for request in _open)
        self.timeout_s = timeout_s
        self._started: float | None = None  # when a stop signal started the clock
        self._inherited: tuple[float, str] | None = None  # a closed inner request's clock
        self._closed = threading.Event()
        self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._write_fd, False)  # set_wakeup_fd requires it: a signal never blocks
        self._previous_fd = signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
        self._watchdog = threading.Thread(target=self._watch, daemon=True, name="stop")
        self._watchdog.start()
        _open.append(self)
        if self.requested:  # a stop already came: its clock starts now
            os.write(self._write_fd, bytes([STOP_SIGNALS[0]]))

    def __enter__(self) -> StopRequest:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Give the process back its previous handlers and wake-up fd; end the watchdog."""
        if self._closed.is_set():
            return
        self._closed.set()
        _open.remove(self)
        signal.set_wakeup_fd(self._previous_fd)
        for sig, handler in self._previous.items():
            # None: a handler installed from C, which Python cannot reinstall; the default is
            # the closest it can give back.
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        # Wake the watchdog with a byte (not by closing the pipe: forked loader workers hold
        # copies of its write end, so its reader would never see the end of it).
        with contextlib.suppress(BlockingIOError):  # a full pipe wakes it anyway
            os.write(self._write_fd, b"\0")
        self._watchdog.join()
        os.close(self._write_fd)
        os.close(self._read_fd)
        clock = self._clock()
        if clock is not None and _open:
            _open[-1]._keep_clock(clock[0], self.timeout_s)

    def _clock(self) -> tuple[float, str] | None:
        """When the clock runs out and the line the process then exits with; None before a stop
        signal started it."""
        if self._started is None:
            return None
        own = (self._started + self.timeout_s, NO_CHECKPOINT.format(self.timeout_s))
        return own if self._inherited is None else min(own, self._inherited)

    def _keep_clock(self, deadline: float, timeout_s: float) -> None:
        """Run the clock of a closed inner request to its deadline (or this one's, if sooner)."""
        self._inherited = (deadline, AFTER_THE_RUN.format(timeout_s))
        with contextlib.suppress(BlockingIOError):  # wakes the watchdog, starting its clock
            os.write(self._write_fd, bytes([STOP_SIGNALS[0]]))

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            if self.requested:
                raise KeyboardInterrupt  # the watchdog exits if the main thread cannot take it
            write_stderr(f"\n{CTRL_C}\n")
        for request in _open:  # the enclosing ones too: the next request opened starts stopped
            request.requested = True

    def _watch(self) -> None:
        # Every signal with a Python handler writes its number here (SIGCHLD of the loader's
        # workers too): wait for a stop signal among them, or for close().
        while not any(byte in STOP_SIGNALS for byte in os.read(self._read_fd, 64)):
            if self._closed.is_set():
                return  # closed before any stop signal
        self._started = time.monotonic()
        while not self._closed.is_set():
            deadline, late = self._clock()  # again at each wake: an inner clock may be handed in
            left = deadline - time.monotonic()
            if left <= 0:  # (stuck in a collective whose peer ended on bad input: say so)
                _exit(f"{after_peer_error()}\n" if user_error_recorded() else late, EXIT_PREEMPTED)
            if not select.select([self._read_fd], [], [], left)[0]:
                continue
            if signal.SIGINT in os.read(self._read_fd, 64) and not self._closed.wait(GRACE_S):
                # A second Ctrl-C the main thread did not act on: it is blocked in C (a hung
                # collective, a loader), where KeyboardInterrupt cannot reach it.
                _exit("Ctrl-C again: quitting without a checkpoint\n", EXIT_INTERRUPTED)


def write_stderr(text: str) -> None:
    """One write to stderr: a signal handler must not re-enter a stream's buffer (a print
    interrupted by a signal whose handler prints raises "reentrant call")."""
    os.write(sys.stderr.fileno(), text.encode())


def _exit(message: str, code: int) -> None:
    """End the process now, its loader workers first: the main thread cannot be unwound."""
    write_stderr(message)
    from train.data import kill_loader_workers  # torch: not before the run needs it

    kill_loader_workers()
    record_exit_status(code)
    os._exit(status_for_agent(code))
