"""The errors a user ever sees: one paragraph that names the file, the key and the fix (bad input), or the
report that could not be written (the runner's disk, never a model). Every layer may raise them."""

from pathlib import Path


class HarnessFault(Exception):
    """The harness's own failure while running a cell (a prompt it built wrong, its own input that could not
    be made): an error of the run, never counted against the model."""


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
