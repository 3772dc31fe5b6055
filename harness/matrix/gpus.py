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


def match_nvml_name(nvml_name: str) -> Gpu | None:
    """The table row whose patterns match the name NVML reports, or None for a card we do not know."""
    for gpu in table().values():
        if any(re.search(p, nvml_name, re.IGNORECASE) for p in gpu.nvml_names):
            return gpu
    return None
