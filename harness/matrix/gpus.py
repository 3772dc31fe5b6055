"""The GPU table (shipped data, one row per card) and the facts derived from it."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
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
    family: str = ""  # the card without its size (v100 for v100-16gb); a row of its own is its own family
    sizes: tuple[str, ...] = ()  # a family's entry: the table keys of its sizes, smallest first
    ray_accelerator: str | None = None  # the resource `accelerator_type:<name>` a Ray node with this card advertises

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
    """Every key a matrix may name: each card's row, and each family of several sizes (`v100`), whose
    entry carries the facts the sizes share and the smallest size's memory (what a plan for "any V100"
    must fit)."""
    rows = yaml.safe_load(resources.files("harness.data").joinpath("gpus.yaml").read_text())
    cards = {
        key: Gpu(key=key, **{**row, "nvml_names": tuple(row["nvml_names"]), "family": row.get("family", key)})
        for key, row in rows.items()
    }
    families: dict[str, list[Gpu]] = {}
    for gpu in cards.values():
        if gpu.family != gpu.key:
            families.setdefault(gpu.family, []).append(gpu)
    for family, sizes in families.items():
        sizes.sort(key=lambda g: g.physical_mib or 0)
        name = re.sub(r"\s*\d+\s*GB$", "", sizes[0].name)
        cards[family] = replace(
            sizes[0],
            key=family,
            name=name,
            nvml_names=(),
            family=family,
            sizes=tuple(g.key for g in sizes),
            ray_accelerator=_family_ray_name(sizes),
        )
    return cards


def _family_ray_name(sizes: list[Gpu]) -> str | None:
    """The accelerator type every size's Ray node has: Ray's own label where the sizes have their own
    (A100 for A100-40G and A100-80G, which Ray adds to a node only in addition to A100)."""
    names = sorted({g.ray_accelerator or "" for g in sizes})
    return os.path.commonprefix(names).rstrip("-") or None


def cards() -> dict[str, Gpu]:
    """The rows of real cards, without the family entries (what a host can be)."""
    return {key: gpu for key, gpu in table().items() if not gpu.sizes}


def covers(target: str, card: str) -> bool:
    """Whether cells targeting `target` (a card or a family) run on a host whose card is `card`."""
    return target == card or table()[card].family == target


def selectors(card: str) -> tuple[str, ...]:
    """The keys that select a card's cells: the card and, for a size, its family."""
    family = table()[card].family
    return (card,) if family == card else (card, family)


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
    for gpu in cards().values():
        if any(re.fullmatch(p, card, re.IGNORECASE) for p in gpu.nvml_names):
            return gpu
    return None
