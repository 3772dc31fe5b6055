"""A launched server's reaper (`python -m harness.engines.reaper LEADER_PID GRACE_S`): stops the server's whole
process tree when the process that launched it goes, however it goes.

A server is often several processes: a shell wrapper and what it runs, vLLM's API server and its engine
core, SGLang's scheduler and detokenizer. The kernel's PR_SET_PDEATHSIG reaches only the first of them,
and a process that made a session of its own is out of reach of its group's signals. So each launched
server gets this small process, in a session of its own (a signal to the launcher's group spares it),
holding the read end of a pipe whose write end only the launcher holds: the pipe ends when the
launcher stops the server or dies (a cell's timeout, SIGKILL, pytest's own end). Meanwhile it notes
every process of the server's tree twice a second, so that processes left behind when their parent
died are still known; when the pipe ends it stops the server's process group and every process it
noted: SIGTERM, SIGKILL after the grace.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time

import psutil

LOOK_EVERY_S = 0.5


def snapshot(leader: int) -> list[psutil.Process]:
    """The leader and its descendants now; psutil remembers each one's start, so a reused pid is never signalled."""
    try:
        root = psutil.Process(leader)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def _runs(process: psutil.Process) -> bool:
    """Still running: a zombie (which nobody may reap in a container whose first process is no init) is done."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _signal(group: int, processes: list[psutil.Process], sig: int) -> None:
    with contextlib.suppress(OSError):  # ProcessLookupError: nobody is left in the group
        os.killpg(group, sig)
    for process in processes:
        with contextlib.suppress(psutil.Error):  # gone already (psutil never signals a reused pid)
            process.send_signal(sig)


def terminate(group: int, processes: list[psutil.Process], grace_s: float, leader: subprocess.Popen | None = None):
    """SIGTERM to the process group `group` and to each of `processes` (wherever they went), and once they are
    gone or `grace_s` is over, SIGKILL to the group and to them: whatever is left, seen or not, goes. `leader`, a
    child of this process, is waited for (and reaped) too."""
    _signal(group, processes, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while (leader is not None and leader.poll() is None) or any(_runs(p) for p in processes):
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    _signal(group, processes, signal.SIGKILL)
    if leader is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            leader.wait(timeout=5)


def start(leader: int, grace_s: float) -> subprocess.Popen:
    """The reaper of the server whose first process is `leader`; it acts when its stdin (the caller's) closes."""
    return subprocess.Popen(
        [sys.executable, "-m", "harness.engines.reaper", str(leader), str(grace_s)],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def _launcher_gone(timeout_s: float) -> bool:
    readable, _, _ = select.select([sys.stdin.fileno()], [], [], timeout_s)
    return bool(readable) and not os.read(sys.stdin.fileno(), 4096)


def main() -> None:
    leader, grace_s = int(sys.argv[1]), float(sys.argv[2])
    known: dict[tuple[int, float], psutil.Process] = {}
    while True:
        for process in snapshot(leader):
            with contextlib.suppress(psutil.Error):
                known.setdefault((process.pid, process.create_time()), process)
        if _launcher_gone(LOOK_EVERY_S):
            break
    terminate(leader, list(known.values()), grace_s)


if __name__ == "__main__":
    main()
