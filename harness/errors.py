"""The errors a user ever sees: one paragraph that names the file, the key and the fix (bad input), the
report that could not be written, or the harness's own part of a cell that failed (the runner's disk, never
a model). Every layer may raise them."""

import errno
import os
import re
from pathlib import Path


class UserError(Exception):
    """Bad input from the user (a matrix, a model name, a missing package).

    Printed as one paragraph, never as a traceback, by the CLI and the pytest plugin.
    """

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None, fix: str | None = None):
        self.file, self.key, self.fix = file, key, fix
        parts = []
        where = ", ".join(p for p in (file and f"file {file}", key and f"key '{key}'") if p)
        parts.append(f"{where}: {message}" if where else message)
        if fix:
            parts.append(f"Fix: {fix}")
        super().__init__(" ".join(parts))


class ReportWriteError(Exception):
    """A report could not be written (a full disk, a read-only folder): the run stops, nothing counts
    against a model, and everything already written stays valid."""

    def __init__(self, path: Path, exc: OSError, lost: str):
        self.path, self.lost = Path(path), lost
        super().__init__(
            f"qwen-compat could not write {path} ({exc.strerror or exc}); the run stops here. "
            f"Lost: {lost}. Everything written before is kept and valid. Fix: free space in {Path(path).parent} "
            "(or point --compat-reports elsewhere), then run again with --compat-resume to finish the rest."
        )


def write_whole(path: Path, data: bytes, lost: str) -> None:
    """Write a file whole or not at all (a temporary file beside it, then a rename): a full disk leaves the
    old file or none, never a truncated one, and is a ReportWriteError saying what was lost."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ReportWriteError(path, exc, lost) from None


class HarnessFault(Exception):
    """The harness could not do its own part of a cell: the runner's disk is full, it could not build the
    cell's input, or the prompt it built carries no image token. The verdict is an error of category
    `harness`, never a failure of the model."""

    def __init__(self, what: str, exc: BaseException | None = None, fix: str = ""):
        detail = f" ({type(exc).__name__}: {str(exc) or 'no message'})" if exc is not None else ""
        super().__init__(
            f"{what}{detail}; this is the harness's failure, not the model's." + (f" Fix: {fix}" if fix else "")
        )


DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
# How libraries that wrap the OS error say it: safetensors "(os error 28)", Rust's StorageFull, Python's text
DISK_FULL_TEXT = re.compile(r"No space left on device|Disk quota exceeded|\bos error 28\b|\[Errno 28\]|StorageFull")


def is_disk_full(exc: BaseException) -> bool:
    """A full disk (or quota) anywhere in the exception's chain, as an OSError or in a wrapping library's words."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS or DISK_FULL_TEXT.search(str(exc)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False
