"""The torch build this environment has, against the card this host has.

A torch wheel carries kernels for a list of CUDA architectures (`sm_75 sm_80 ...`), built for one CUDA
version, which needs a driver of at least that CUDA major. A V100 (sm_70) under a CUDA 13 build has no
kernel at all: every cell would fail with "no kernel image is available", which is the harness's
environment, not the model. This is checked once, before any cell runs."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from importlib import util
from pathlib import Path

from harness.errors import UserError

PROBE = (
    "import json, torch\n"
    "flags = getattr(torch._C, '_cuda_getArchFlags', lambda: '')() or ''\n"
    "print(json.dumps({'version': torch.__version__, 'cuda': torch.version.cuda, 'arch_list': flags.split()}))\n"
)


@dataclass(frozen=True)
class TorchBuild:
    version: str  # the full build string, e.g. 2.14.1+cu130
    cuda: str | None  # torch.version.cuda; None for a CPU build
    arch_list: tuple[str, ...]  # sm_XY (binary) and compute_XY (PTX) entries

    def to_dict(self) -> dict:
        return {"version": self.version, "cuda": self.cuda, "arch_list": list(self.arch_list)}

    @classmethod
    def from_dict(cls, data: dict) -> TorchBuild:
        return cls(data["version"], data.get("cuda"), tuple(data.get("arch_list") or ()))

    def runs_on(self, compute_capability: str) -> bool:
        """CUDA's rules: a cubin runs on its own major at an equal or higher minor; PTX is compiled by
        the driver for any newer card."""
        major, minor = (int(x) for x in compute_capability.split("."))
        for entry in self.arch_list:
            kind, _, number = entry.partition("_")
            if not number.isdigit():
                continue
            m, n = int(number[:-1]), int(number[-1])
            if kind == "sm" and m == major and n <= minor:
                return True
            if kind == "compute" and (m, n) <= (major, minor):
                return True
        return False


def installed() -> TorchBuild | None:
    """The build string and CUDA version of the installed torch, read from torch/version.py without
    importing torch (the arch list needs the import: `probe`)."""
    spec = util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return None
    facts: dict = {}
    try:
        exec(compile(Path(spec.submodule_search_locations[0], "version.py").read_text(), "version.py", "exec"), facts)
    except Exception:  # noqa: BLE001 - an unreadable version file: unknown, said as such
        return None
    return TorchBuild(str(facts.get("__version__")), facts.get("cuda"), ())


def probe(python: str = sys.executable, timeout_s: float = 120) -> TorchBuild | None:
    """The build of the torch `python` imports, asked in a child process (this one stays torch-free)."""
    if python == sys.executable and util.find_spec("torch") is None:
        return None
    try:
        done = subprocess.run([python, "-c", PROBE], capture_output=True, text=True, timeout=timeout_s)
        return TorchBuild.from_dict(json.loads(done.stdout.strip().splitlines()[-1]))
    except Exception:  # noqa: BLE001 - no torch, or a torch that cannot start: said by the caller
        return None


def install_command(compute_capability: str | None) -> str:
    """The pip line that gives this card a torch with its kernels (PyTorch's own index per CUDA build)."""
    if compute_capability is None:
        return "pip install torch==2.14.1 torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cpu"
    if float(compute_capability) < 7.5:  # CUDA 13 dropped Volta (sm_70) and older
        return "pip install torch==2.14.1 torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cu126"
    return "pip install torch==2.14.1 torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cu130"


def check(build: TorchBuild | None, *, card: str, compute_capability: str | None, driver_cuda: str | None) -> None:
    """One paragraph, raised before any cell runs, when this torch cannot run on this card."""
    if compute_capability is None:  # the CPU: any torch runs
        return
    fix = f"install a torch built for compute capability {compute_capability}: `{install_command(compute_capability)}`"
    if build is None:
        raise UserError(f"this host has a {card} but no torch that imports.", key="torch", fix=fix + ".")
    if build.cuda is None:
        raise UserError(
            f"this host has a {card} (compute capability {compute_capability}), and torch {build.version} is a "
            "CPU build: every GPU cell would run nowhere.",
            key="torch",
            fix=fix + ".",
        )
    if not build.runs_on(compute_capability):
        raise UserError(
            f"torch {build.version} (CUDA {build.cuda}) has kernels for {' '.join(build.arch_list) or 'nothing'}, "
            f"none of which runs on this host's {card} (compute capability {compute_capability}, "
            f"sm_{compute_capability.replace('.', '')}): every cell would fail with 'no kernel image is available "
            "for execution on the device'.",
            key="torch",
            fix=fix + ".",
        )
    if driver_cuda and int(build.cuda.split(".")[0]) > int(driver_cuda.split(".")[0]):
        raise UserError(
            f"torch {build.version} is built for CUDA {build.cuda}, and this host's driver supports CUDA "
            f"{driver_cuda} at most: CUDA would not initialise.",
            key="torch",
            fix=f"update the NVIDIA driver to one for CUDA {build.cuda.split('.')[0]}, or install the CUDA 12 "
            f"build: `{install_command('7.0')}`.",
        )
