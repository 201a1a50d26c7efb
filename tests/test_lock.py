"""common/lock.py: one holder at a time, named to the refused; never stale after a kill."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from common import lock as lock_module
from common.errors import UserError
from common.lock import FileLock, holder
from tests.conftest import ROOT

HOLD = """
import os, sys, time
from common.lock import FileLock
with FileLock(sys.argv[1], "the thing", "wait"):
    if len(sys.argv) > 2:
        ready, started = os.pipe()
        if os.fork() == 0:  # a child, as a DataLoader worker is
            # fork returns here after the at-fork hooks; a loaded machine may not have run
            # them yet when the parent goes on, so the parent waits for this line
            os.write(started, b"x")
            time.sleep(60)
            os._exit(0)
        os.read(ready, 1)
    print("held", flush=True)
    time.sleep(60)
"""


def hold(path, fork: bool = False) -> subprocess.Popen:
    """A process that takes the lock on `path` and keeps it (and forks a child if asked)."""
    args = [sys.executable, "-c", HOLD, str(path)] + (["fork"] if fork else [])
    proc = subprocess.Popen(
        args, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_taker_is_refused_naming_host_pid_and_start_time(tmp_path):
    path = tmp_path / "run" / "train.lock"
    proc = hold(path)
    try:
        info = holder(path)
        assert info["pid"] == proc.pid and info["host"] == socket.gethostname()
        with pytest.raises(UserError) as err:
            with FileLock(path, "run x", "wait for it"):
                pass
        assert str(err.value) == (
            f"run x is in use by pid {proc.pid} on {socket.gethostname()}, started "
            f"{info['started']} (lock {path}); wait for it"
        )
    finally:
        proc.kill()
        proc.wait()


def test_a_killed_holder_leaves_no_stale_lock_even_with_a_forked_child_alive(tmp_path):
    path = tmp_path / "train.lock"
    proc = hold(path, fork=True)
    child = int(
        next(line for line in open(f"/proc/{proc.pid}/task/{proc.pid}/children")).split()[0]
    )
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    try:
        os.kill(child, 0)  # the child outlives its parent, as a loader worker does for seconds
        assert holder(path) is None
        with FileLock(path, "run x", "wait"):
            assert holder(path)["pid"] == os.getpid()
        assert holder(path) is None
    finally:
        os.kill(child, signal.SIGKILL)


def test_a_status_reader_never_makes_a_taker_fail(tmp_path):
    path = tmp_path / "train.lock"
    path.touch()
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            holder(path)

    reader = threading.Thread(target=poll)
    reader.start()
    try:
        for _ in range(50):
            with FileLock(path, "run x", "wait"):
                pass
    finally:
        stop.set()
        reader.join()


def test_a_file_system_without_locks_is_used_with_a_warning(tmp_path, monkeypatch, capsys):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(lock_module.fcntl, "flock", no_locks)
    with FileLock(tmp_path / "train.lock", "run x", "wait"):
        pass
    assert capsys.readouterr().err.startswith(
        f"warning: cannot lock {tmp_path / 'train.lock'} (No locks available): this file system"
    )


def test_the_holders_text_is_cleared_on_release(tmp_path):
    path = tmp_path / "train.lock"
    with FileLock(path, "run x", "wait"):
        assert f'"pid": {os.getpid()}' in path.read_text()
    assert path.read_text() == "" and holder(path) is None


def test_a_taker_waiting_while_the_holder_removes_the_folder_locks_the_file_the_path_names(
    tmp_path,
):
    """A run refused before writing anything removes its folder while a second trainer of the
    same name waits: that trainer must end up holding the lock that a third one sees."""
    path = tmp_path / "run" / "train.lock"
    first = FileLock(path, "run x", "wait").__enter__()
    seen = {}

    def second_taker():
        with FileLock(path, "run x", "wait") as second:
            seen["named"] = os.stat(path).st_ino == os.fstat(second.fd).st_ino
            try:
                with FileLock(path, "run x", "wait"):
                    seen["third"] = "got the lock too"
            except UserError:
                seen["third"] = "refused"

    waiter = threading.Thread(target=second_taker)
    waiter.start()
    time.sleep(lock_module.RETRY_S / 5)  # the waiter retries on the file about to go
    first.remove_folder_if_only_lock()
    first.__exit__(None, None, None)
    waiter.join()
    assert seen == {"named": True, "third": "refused"}
