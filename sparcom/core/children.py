"""Child processes that end with the process that started them, however it ends.

- `stop_on_signals()`: SIGTERM (as a CI timeout or a scheduler sends it) raises SystemExit(143)
  in the main thread, as SIGINT raises KeyboardInterrupt, so context managers close what they
  opened (a Dask cluster) and exit handlers run (Prefect stops its temporary server).
- `end_with_this_process(pid)`: a child that must not outlive this process even when it is
  killed outright (SIGKILL, the out-of-memory killer), when no handler runs: a watcher process
  (`python -m sparcom.core.children`), started once, reads the children's ids from a pipe whose
  write end only this process holds; when the pipe closes (this process is gone, however) it
  sends SIGTERM to every child it was given that is still the same process (its start time
  unchanged), and SIGKILL to those left after 10 s.

Dask's worker processes need no watcher: each exits when the pipe to its nanny closes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

_watcher: list[subprocess.Popen] = []
_lock = threading.Lock()


def stop_on_signals() -> None:
    def exit_on_sigterm(signum, frame):
        raise SystemExit(128 + signum)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, exit_on_sigterm)


def _start_time(pid: int | str) -> str | None:
    """The process's start time (clock ticks since boot): with the pid, names one process."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[19]
    except OSError:
        return None


def end_with_this_process(pid: int) -> None:
    start = _start_time(pid)
    if start is None:  # no /proc (not Linux), or already gone
        return
    with _lock:
        if not _watcher:
            _watcher.append(subprocess.Popen([sys.executable, "-m", "sparcom.core.children"], stdin=subprocess.PIPE,
                                             text=True, start_new_session=True))
        _watcher[0].stdin.write(f"{pid} {start}\n")
        _watcher[0].stdin.flush()


def _watch() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # outlives its parent's signals: ends at the pipe's end
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    children = [line.split() for line in sys.stdin]  # until the parent's end of the pipe closes

    def alive() -> list[int]:
        return [int(pid) for pid, start in children if _start_time(pid) == start]

    for pid in alive():
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in alive():
        os.kill(pid, signal.SIGKILL)


if __name__ == "__main__":
    _watch()
