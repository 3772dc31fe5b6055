"""The one error type a user ever sees: a paragraph that names the file, the key and the fix."""


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
