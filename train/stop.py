"""Stop requests: SIGTERM/SIGUSR1 end a run with a checkpoint, or in bounded time without one.

The loop reads `requested` at every step boundary, checkpoints and exits with EXIT_PREEMPTED.
A run that cannot reach a boundary (a loader worker stuck on a hung network disk, a peer process
that died inside a collective) must still end, or `timeout` and a cluster's time limit could not
stop it: `timeout_s` after the first stop signal the process says so in one line, kills its
loader workers and exits with EXIT_PREEMPTED (a rerun resumes from the newest checkpoint).

Python runs signal handlers only between bytecodes of the main thread, so a main thread blocked
in C would never start that clock. The C-level handler also writes the signal number to a
wake-up pipe (`signal.set_wakeup_fd`); a watchdog thread reads it and keeps the clock instead.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

from common.status import EXIT_PREEMPTED, record_exit_status
from train.data import kill_loader_workers

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Remembers SIGTERM/SIGUSR1; ends the process `timeout_s` later if the loop has not."""

    def __init__(self, timeout_s: float) -> None:
        self.requested = False
        self.timeout_s = timeout_s
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)  # set_wakeup_fd requires it: a signal never blocks
        signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        threading.Thread(target=self._watch, args=(read_fd,), daemon=True, name="stop").start()

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def _watch(self, read_fd: int) -> None:
        # Every signal with a Python handler writes its number here (SIGCHLD of the loader's
        # workers, SIGINT too): wait for a stop signal among them.
        while not any(byte in STOP_SIGNALS for byte in os.read(read_fd, 64)):
            pass
        time.sleep(self.timeout_s)
        sys.stderr.write(
            f"error: no checkpoint within stop_timeout_s={self.timeout_s:g} s of the stop "
            "signal (a data loader worker or another process hangs); exiting without one: "
            "a rerun resumes from the newest checkpoint\n"
        )
        sys.stderr.flush()
        kill_loader_workers()
        record_exit_status(EXIT_PREEMPTED)
        os._exit(EXIT_PREEMPTED)
