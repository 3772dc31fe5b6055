"""A model's `launch:` key as the matrix sees it: the template names and the values a command is made of.

Checked when the matrix is expanded, so a mistyped placeholder is a matrix error before anything starts;
how each engine turns these values into its command line lives in harness/engines/templates.py."""

from __future__ import annotations

import shlex
import string
from dataclasses import dataclass, fields

from harness.errors import UserError

TEMPLATE_NAMES = ("transformers-serve", "vllm", "sglang", "lmdeploy")  # OpenAI-compatible engines
DOCKER = "docker"  # a released image, run with `docker run` (harness/engines/docker.py)


@dataclass(frozen=True)
class LaunchArgs:
    """The values a server command is made of (also the placeholders of a user's own command)."""

    model: str
    dtype: str
    attn: str
    host: str
    port: int
    device: str  # cpu | cuda
    max_model_len: int
    max_images: int
    max_videos: int
    min_pixels: int | None
    max_pixels: int | None
    gpu_memory_utilization: float
    tensor_parallel_size: int


PLACEHOLDERS = [f.name for f in fields(LaunchArgs)]


def check_command(command: str, matrix_file: str | None = None, key: str = "launch") -> list[str]:
    """The words of a user's launch command; an unknown `{placeholder}` is bad input, named."""
    words = shlex.split(command)
    for word in words:
        for _, name, _, _ in string.Formatter().parse(word):
            if name is not None and name not in PLACEHOLDERS:
                raise UserError(
                    f"the launch command names an unknown placeholder {{{name}}}.",
                    file=matrix_file,
                    key=key,
                    fix=f"placeholders are {', '.join('{' + k + '}' for k in PLACEHOLDERS)}.",
                )
    return words
