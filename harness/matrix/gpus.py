"""The GPU table (shipped data, one row per card) and the facts derived from it."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from importlib import resources

import yaml


@dataclass(frozen=True)
class Gpu:
    key: str
    name: str
    nvml_names: tuple[str, ...]
    compute_capability: str | None
    memory_gb: float | None  # as sold
    physical_mib: float | None  # what NVML reports on the host
    physical_mib_source: str | None
    native_bf16: bool
    flash_attn_2: bool
    source: str

    @property
    def is_gpu(self) -> bool:
        return self.key != "cpu"

    @property
    def memory_mib(self) -> float | None:
        """The card's physical memory (MiB), what budgets, plans and emulation are taken of."""
        return self.physical_mib

    @property
    def sm(self) -> int | None:
        if not self.compute_capability:
            return None
        major, minor = self.compute_capability.split(".")
        return int(major) * 10 + int(minor)


@cache
def table() -> dict[str, Gpu]:
    rows = yaml.safe_load(resources.files("harness.data").joinpath("gpus.yaml").read_text())
    return {key: Gpu(key=key, **{**row, "nvml_names": tuple(row["nvml_names"])}) for key, row in rows.items()}


# CUDA's and NVML's name of a MIG device: "<card> MIG 1g.10gb" (some drivers: "MIG 1g.10gb" alone)
MIG_SUFFIX = re.compile(r"(?:^|\s+)MIG\s+(?P<profile>\S+)$")


def split_mig_name(name: str) -> tuple[str, str | None]:
    """(the card's name, the MIG profile) of a device name; the profile is None for a whole card."""
    found = MIG_SUFFIX.search(name)
    return (name[: found.start()], found["profile"]) if found else (name, None)


def match_nvml_name(nvml_name: str) -> Gpu | None:
    """The table row one of whose patterns matches the whole name NVML reports (a MIG device's without its
    profile), or None for a card we do not know: a pattern that merely occurs in a name is no match
    ("NVIDIA GH200 480GB" is not an H200)."""
    card, _ = split_mig_name(nvml_name.strip())
    for gpu in table().values():
        if any(re.fullmatch(p, card, re.IGNORECASE) for p in gpu.nvml_names):
            return gpu
    return None
