"""One run at a time per reports folder: a second run on a folder in use is refused at once.

The lock lives outside the reports folder (in the temporary directory, keyed by the folder's
absolute path), so that taking it never touches the reports, and the kernel releases it when its
process dies however it dies.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import tempfile
import time
from pathlib import Path

from filelock import FileLock, Timeout

from harness.errors import UserError


class RunLock:
    def __init__(self, reports_dir: Path):
        self.reports_dir = Path(reports_dir).resolve()
        key = hashlib.sha256(str(self.reports_dir).encode()).hexdigest()[:16]
        folder = Path(tempfile.gettempdir()) / "qwen-compat-locks"
        folder.mkdir(exist_ok=True)
        self.owner_file = folder / f"{key}.json"
        self._lock = FileLock(str(folder / f"{key}.lock"))

    def acquire(self) -> None:
        """Take the folder, or say in one paragraph which run has it and what to do."""
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            try:
                owner = json.loads(self.owner_file.read_text())
            except (OSError, ValueError):
                owner = {}
            started = owner.get("started")
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if started else "an unknown time"
            raise UserError(
                f"another qwen-compat run is writing {self.reports_dir} (pid {owner.get('pid', '?')} on "
                f"{owner.get('host', '?')}, started {when}); two runs in one folder would destroy each "
                "other's cells.",
                key="--compat-reports",
                fix="wait for that run to finish, or give this one a folder of its own with --compat-reports DIR.",
            ) from None
        self.owner_file.write_text(
            json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()})
        )

    def release(self) -> None:
        if self._lock.is_locked:
            self.owner_file.unlink(missing_ok=True)
            self._lock.release()
