"""qwen-compat: hardware-compatibility test harness for Qwen vision-language models.

Layers, each a package that imports only those below it (kept by import-linter, pyproject.toml):
models -> matrix -> plan -> judge -> devices -> engines -> run -> report -> plugin / cli.
`errors` and `secrets` are shared by every layer.
"""

__version__ = "0.1.0"
