"""One run at a time per device folder: a second run on a folder in use is refused at once.

The lock is a file beside the folder, among what runs keep for themselves at the reports root
(`<reports>/.qwen-compat/locks/<device>.lock`, outside the device folder that CI uploads), created
whole and exclusively (a hard link to a file already written: atomic on local file systems and on
NFS), so a second run is refused whatever its temporary directory, container or host; where the file
system cannot do that, the run is refused with a paragraph saying so. The file says who holds it (pid,
host, start time, boot, pid namespace). A run killed before it could remove the file leaves it
behind: a later run takes it over only when it can tell that the owner is gone (the same host, boot
and pid namespace, and that pid no longer running, or running a younger process); an owner elsewhere
cannot be checked, and the message names the file to remove once that run is known to be gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path

import psutil

from harness.errors import UserError
from harness.report.results import INTERNAL_DIR


def _read(path: str) -> str | None:
    with contextlib.suppress(OSError):
        return Path(path).read_text()
    return None


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _machine() -> dict:
    """What makes a pid meaningful: the host, its boot, and the pid namespace (a container has its own)."""
    return {
        "host": socket.gethostname(),
        "boot": (_read("/proc/sys/kernel/random/boot_id") or "").strip(),
        "pid_namespace": _pid_namespace(),
    }


class RunLock:
    def __init__(self, reports_dir: Path):
        self.reports_dir = Path(reports_dir).resolve()
        self.path = self.reports_dir.parent / INTERNAL_DIR / "locks" / f"{self.reports_dir.name}.lock"
        self._mine: str | None = None  # the lock file's text while this run holds it

    def acquire(self) -> None:
        """Take the folder, or say in one paragraph which run has it and what to do."""
        text = json.dumps({"pid": os.getpid(), **_machine(), "started": time.time()})
        for _ in range(3):  # a stale lock is removed, then taken like a free one
            try:
                self._create(text)
            except FileExistsError:
                held = _read(self.path)
                if held is not None and not self._stale(held):
                    raise self._busy(held) from None
                if held is not None and _read(self.path) == held:
                    self.path.unlink(missing_ok=True)  # its owner is gone
                continue
            except OSError as exc:
                raise UserError(
                    f"qwen-compat cannot lock the reports folder {self.reports_dir}: creating {self.path} failed "
                    f"({exc.strerror or exc}), so it cannot make sure that no other run writes there.",
                    key="--compat-reports",
                    fix="point --compat-reports at a folder this user may write, on a file system with hard links "
                    "(any local one, NFS).",
                ) from None
            self._mine = text
            return
        raise self._busy(_read(self.path) or "{}")

    def _create(self, text: str) -> None:
        """Write the owner to a file of this process's, then hard-link it as the lock: the link appears whole or
        fails with FileExistsError, atomically, on NFS too (where O_EXCL was not always so)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        mine = self.path.with_name(f"{self.path.name}.{socket.gethostname()}.{os.getpid()}")
        try:
            mine.write_text(text)
            os.link(mine, self.path)
        finally:
            mine.unlink(missing_ok=True)

    def _stale(self, held: str) -> bool:
        """The owner can be seen to be gone: same host, boot and pid namespace, and its pid runs no more (or runs
        a process younger than the lock). A lock that is not the harness's JSON is no run's."""
        try:
            owner = json.loads(held)
            pid, started = int(owner["pid"]), float(owner["started"])
        except (ValueError, KeyError, TypeError):
            return True
        if any(owner.get(k) != v for k, v in _machine().items()):
            return False  # another host or container: nothing here can tell whether it still runs
        try:
            return psutil.Process(pid).create_time() > started + 1
        except psutil.NoSuchProcess:
            return True
        except psutil.Error:
            return False

    def _busy(self, held: str) -> UserError:
        try:
            owner = json.loads(held)
        except ValueError:
            owner = {}
        started = owner.get("started")
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if started else "an unknown time"
        return UserError(
            f"another qwen-compat run is writing {self.reports_dir} (pid {owner.get('pid', '?')} on "
            f"{owner.get('host', '?')}, started {when}); two runs in one folder would destroy each "
            "other's cells.",
            key="--compat-reports",
            fix="wait for that run to finish, or give this one a folder of its own with --compat-reports DIR; if "
            f"that run is known to be gone (on another host it cannot be checked from here), remove {self.path}.",
        )

    def release(self) -> None:
        """Remove the lock file if it is still this run's."""
        if self._mine is not None and _read(self.path) == self._mine:
            self.path.unlink(missing_ok=True)
        self._mine = None
