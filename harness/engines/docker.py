"""The `docker` launch template: a released image (a WebUI's, say) run for a cell with `docker run`.

    docker run --rm --name qwen-compat-<pid>-<port> -p 127.0.0.1:<port>:<app port> --shm-size 16g
        [--gpus device=<the worker's GPUs>] -e GRADIO_ANALYTICS_ENABLED=False -e GRADIO_SERVER_NAME=0.0.0.0
        -e GRADIO_SERVER_PORT=<app port> -e MODEL=<model> -e DTYPE=<dtype> [-v <model folder>:<same>:ro]
        IMAGE [args]

The port is published on 127.0.0.1 only. The GPUs are the worker's own (its CUDA_VISIBLE_DEVICES:
one index, several in docker's quoted list form, or every GPU when it is unset); a CPU cell gets none.
A local model folder is mounted read-only at the same path, so `{model}` means the same inside. The
GRADIO_* variables are what gradio's `launch()` reads when the app does not say: no version check to
an outside host, and an app that listens where the published port reaches it.

The container runs attached, so what it prints is its log, kept like any launched server's (the
Container of harness/engines/server.py). It is stopped and removed on every path: by `docker stop` and
`docker rm -f` when the harness stops it (after a cell, a failed start, a timeout); when the process
that launched it dies, the kernel sends the `docker run` client SIGTERM, which docker passes on to the
container (`--sig-proxy`, its default), and `--rm` removes it. This module is the command line only:
the pytest process reads it to know whether a cell can run.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from harness.engines.templates import EngineMissing, fill
from harness.matrix.launch import LaunchArgs, check_command

GRADIO_ENV = {"GRADIO_ANALYTICS_ENABLED": "False", "GRADIO_SERVER_NAME": "0.0.0.0"}


def gpus_flag(device: str, visible: str | None) -> list[str]:
    """`--gpus` for the worker's GPUs: none on the CPU, all when CUDA_VISIBLE_DEVICES is unset, else its
    entries (indices, GPU- or MIG- UUIDs); several are one quoted CSV field, as docker parses the flag."""
    if device == "cpu":
        return []
    if visible is None:
        return ["--gpus", "all"]
    ids = [v.strip() for v in visible.split(",") if v.strip()]
    devices = f"device={','.join(ids)}"
    return ["--gpus", devices if len(ids) == 1 else f'"{devices}"']


@dataclass(frozen=True)
class DockerRun:
    """A model entry's `launch: {command: docker, image: ...}`."""

    image: str
    port: int = 7860  # where the app listens inside the container
    shm_size: str = "16g"
    env: dict[str, str] = field(default_factory=lambda: {"MODEL": "{model}", "DTYPE": "{dtype}"})
    args: str | None = None  # the image's command and arguments, with {placeholders}
    matrix_file: str | None = None

    @classmethod
    def of(cls, serving: dict) -> DockerRun:
        """From a cell's `serving` fields (the model entry's `launch:`)."""
        keys = ("image", "port", "shm_size", "env", "args", "matrix_file")
        return cls(**{k: serving[k] for k in keys if serving.get(k) is not None})

    def check_installed(self) -> None:
        """A docker command and an engine that answers it (a CLI without its daemon runs nothing)."""
        problem = engine_problem()
        if problem:
            raise EngineMissing(
                f"the 'docker' launch template needs a running Docker engine ({problem}).",
                file=self.matrix_file,
                key="launch",
                fix="install and start Docker Engine (and the NVIDIA Container Toolkit for --gpus) on this runner; or "
                "start the container yourself and give its URL as `webui:`.",
            )

    def argv(self, a: LaunchArgs, name: str, visible: str | None) -> list[str]:
        """The `docker run` line of the cell's container `name`, publishing the app on a.host:a.port."""
        env = {**GRADIO_ENV, "GRADIO_SERVER_PORT": str(self.port)}
        env.update({key: fill(value, a, self.matrix_file, "launch.env") for key, value in self.env.items()})
        mount = ["-v", f"{a.model}:{a.model}:ro"] if Path(a.model).is_dir() else []
        args = [fill(word, a, self.matrix_file, "launch.args") for word in check_command(self.args or "")]
        return [
            "docker", "run", "--rm",
            "--name", name,
            "-p", f"{a.host}:{a.port}:{self.port}",
            "--shm-size", self.shm_size,
            *gpus_flag(a.device, visible),
            *[word for key, value in env.items() for word in ("-e", f"{key}={value}")],
            *mount,
            self.image,
            *args,
        ]  # fmt: skip


@functools.cache
def engine_problem() -> str | None:
    """Why no container can run here (no docker command, or an engine that does not answer), once per run."""
    if shutil.which("docker") is None:
        return "the docker command is not installed here"
    try:
        done = subprocess.run(
            ["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True, timeout=30
        )
    except subprocess.TimeoutExpired:
        return "`docker info` did not answer within 30 s"
    if done.returncode != 0:
        said = (done.stderr or done.stdout).strip().splitlines()
        return f"the docker command is here, but `docker info` says: {said[-1] if said else f'exit {done.returncode}'}"
    return None


def container_name(port: int) -> str:
    return f"qwen-compat-{os.getpid()}-{port}"
