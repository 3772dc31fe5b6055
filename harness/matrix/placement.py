"""Placement: where a cell's model lives — one device, accelerate's `device_map="auto"`, memory caps, or
named modules kept on the CPU or on disk — and what that means for `from_pretrained`.

The matrix value (`placement:` axis) is validated here, rendered into cell ids, turned into the
`device_map` / `max_memory` / `offload_folder` keyword arguments transformers takes, checked against
the model's modules, and a resolved device map is summarised for reports. Pure data except where a
model object is passed in (the worker's loaded model, or the planner's meta-device model).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from harness.errors import UserError

MIB = 2**20
SIZE_PATTERN = r"^\s*\d+(\.\d+)?\s*(GiB|MiB)\s*$"
Size = Annotated[str, Field(pattern=SIZE_PATTERN, description="e.g. 20GiB, 900MiB or 0.5MiB")]
MemoryKey = Union[int, Literal["gpu", "cpu"]]

# Module aliases, the same in all four families (transformers 5: `model.visual`, `model.language_model`).
VISION = "model.visual"
DECODER_LAYERS = "model.language_model.layers"
LAYERS_ALIAS = re.compile(r"^layers:(\d+)$")


class PlacementSpec(BaseModel):
    """A placement other than `single` / `auto`: accelerate's caps, or modules pinned off the GPU."""

    model_config = ConfigDict(extra="forbid")

    gpus: int | None = Field(None, ge=1, description="device_map='auto' over this many GPUs (default: all visible)")
    max_memory: dict[MemoryKey, Size] | None = Field(
        None, description="accelerate's cap per device: GPU index, `gpu` (every GPU) or `cpu`; beyond them, disk"
    )
    offload: list[str] | None = Field(
        None, description="modules kept on the CPU, the rest on the GPU: `vision`, `layers:N` or module prefixes"
    )
    disk: list[str] | None = Field(None, description="modules kept on disk (same names as `offload`)")

    @model_validator(mode="after")
    def _one_kind(self):
        pinned = self.offload is not None or self.disk is not None
        capped = self.gpus is not None or self.max_memory is not None
        if pinned and capped:
            raise ValueError(
                "a placement either pins modules (offload/disk) or caps memory (gpus/max_memory), not both"
            )
        if not (pinned or capped):
            raise ValueError("a placement mapping needs one of gpus, max_memory, offload, disk")
        return self


PlacementValue = Union[Literal["single", "auto"], PlacementSpec]
_ADAPTER = TypeAdapter(PlacementValue)


def parse(value: Any, *, file: str | None = None, key: str = "axes.placement") -> str | PlacementSpec:
    """A matrix (or cell) placement value, validated: 'single', 'auto' or a PlacementSpec."""
    if isinstance(value, PlacementSpec):
        return value
    try:
        if isinstance(value, dict):
            return PlacementSpec.model_validate(value)
        return _ADAPTER.validate_python("single" if value is None else value)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if not str(p).startswith(("literal[", "function-")))
        raise UserError(
            f"invalid placement {value!r}: {where + ': ' if where else ''}{first['msg']}.",
            file=file,
            key=key,
            fix="use single, auto, {gpus: 2}, {max_memory: {gpu: 20GiB, cpu: 64GiB}}, {offload: [vision, layers:6]} "
            "or {disk: [lm_head]}; sizes are GiB or MiB, decimals allowed.",
        ) from None


def normalize(value: Any) -> str | dict:
    """The JSON form a cell carries: 'single', 'auto' or the mapping without unset keys."""
    placement = parse(value)
    return placement if isinstance(placement, str) else placement.model_dump(exclude_none=True)


def size_bytes(size: str) -> int:
    """'20GiB' / '900MiB' / '0.5MiB' -> bytes (the budget syntax; binary units)."""
    text = size.replace(" ", "")
    return int(float(text[:-3]) * (2**30 if text.endswith("GiB") else MIB))


def _size_id(size: str) -> str:
    return size.replace(" ", "").lower()


def cell_id_part(value: Any) -> str | None:
    """The placement's part of a cell id; None for `single` (ids of existing cells stay as they were)."""
    placement = parse(value)
    if placement == "single":
        return None
    if placement == "auto":
        return "auto"
    if placement.offload is not None or placement.disk is not None:
        pinned = (("offload", placement.offload), ("disk", placement.disk))
        return "-".join(f"{kind}-" + "-".join(_slug(m) for m in modules) for kind, modules in pinned if modules)
    parts = ["maxmem" if placement.max_memory else "auto"] + ([f"{placement.gpus}gpu"] if placement.gpus else [])
    order = {"gpu": 1, "cpu": 2}
    for device, size in sorted((placement.max_memory or {}).items(), key=lambda kv: (order.get(kv[0], 0), kv[0])):
        parts.append(f"gpu{device}_{_size_id(size)}" if isinstance(device, int) else f"{device}{_size_id(size)}")
    return "-".join(parts)


def _slug(module: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "", module.lower())


def gpus_requested(value: Any) -> int | None:
    """How many GPUs a placement asks for by name (`gpus`, or the highest GPU index it caps); None: any."""
    placement = parse(value)
    if not isinstance(placement, PlacementSpec):
        return None
    indices = [k for k in (placement.max_memory or {}) if isinstance(k, int)]
    return max([placement.gpus or 0] + [i + 1 for i in indices]) or None


def pins_modules_off_gpu(value: Any) -> bool:
    """True when the placement keeps named modules on the CPU or on disk."""
    placement = parse(value)
    return isinstance(placement, PlacementSpec) and bool(placement.offload or placement.disk)


# --- module names --------------------------------------------------------------------------------


def top_level_modules(module_names: Iterable[str]) -> list[str]:
    """The modules a person would name: the base model's children (model.visual, model.language_model) and
    the head, rather than the one `model` wrapper."""
    names = [n for n in module_names if n]
    children = [n for n in names if "." not in n]
    out = []
    for child in children:
        grand = [n for n in names if n.startswith(child + ".") and n.count(".") == 1]
        out += grand if len(grand) > 1 else [child]
    return out


def module_names(model) -> list[str]:
    return [name for name, _ in model.named_modules()]


def decoder_layer_count(model) -> int:
    return len(model.get_submodule(DECODER_LAYERS))


def resolve_modules(names: list[str], model, *, file: str | None = None) -> list[str]:
    """Module prefixes for `offload` / `disk` entries: aliases expanded, each checked to name a module of `model`."""
    known = module_names(model)
    model_class = type(model).__name__
    out = []
    for name in names:
        layers = LAYERS_ALIAS.match(name)
        if name == "vision":
            expanded = [VISION]
        elif layers:
            count, available = int(layers.group(1)), decoder_layer_count(model)
            if not 1 <= count <= available:
                raise UserError(
                    f"the placement asks for the first {count} decoder layers, and {model_class} has {available}.",
                    file=file,
                    key="axes.placement",
                    fix=f"use layers:N with N from 1 to {available}.",
                )
            expanded = [f"{DECODER_LAYERS}.{i}" for i in range(count)]
        else:
            expanded = [name]
        for prefix in expanded:
            if prefix not in known:
                raise UserError(
                    f"the placement names module '{name}', and {model_class} has no module '{prefix}'.",
                    file=file,
                    key="axes.placement",
                    fix="name a module prefix of the model, or an alias (vision, layers:N). Its top-level modules: "
                    + ", ".join(top_level_modules(known))
                    + ".",
                )
            out.append(prefix)
    return out


def pinned_device_map(model, pinned: dict[str, str], main_device: int | str) -> dict[str, int | str]:
    """A complete device map: `pinned` prefixes on their device ("cpu" / "disk"), everything else on `main_device`.

    Coarsest form: a module goes whole to one device unless a pinned prefix lies inside it; then its direct
    parameters and buffers and its children are placed one by one (as accelerate's own maps do).
    """
    device_map: dict[str, int | str] = {}

    def place(name: str, module) -> None:
        if name in pinned:
            device_map[name] = pinned[name]
        elif name == "" or any(p.startswith(name + ".") for p in pinned):
            prefix = f"{name}." if name else ""
            for tensor_name, _ in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                device_map[prefix + tensor_name] = main_device
            for child_name, child in module.named_children():
                place(prefix + child_name, child)
        else:
            device_map[name] = main_device

    place("", model)
    return device_map


# --- from_pretrained keyword arguments -------------------------------------------------------------


def max_memory_bytes(placement: PlacementSpec, free: dict[int | str, int]) -> dict[int | str, int]:
    """A complete accelerate `max_memory` for this host: the placement's caps, and what transformers would
    measure itself where the placement names none (each visible GPU's free memory, 90 % of available RAM).

    Complete on purpose: accelerate uses only the devices a `max_memory` names, so `{cpu: 64GiB}` alone would
    otherwise leave the GPUs out and `{gpu: 20GiB}` alone would send what does not fit straight to disk.
    """
    caps = placement.max_memory or {}
    visible = sorted(k for k in free if isinstance(k, int))
    out: dict[int | str, int] = {}
    for index in visible[: placement.gpus or len(visible)]:
        cap = caps.get(index, caps.get("gpu"))
        out[index] = size_bytes(cap) if cap else free[index]
    out["cpu"] = size_bytes(caps["cpu"]) if "cpu" in caps else int(free["cpu"] * 0.9)
    return out


def from_pretrained_kwargs(
    value: Any, meta_model, *, free: dict[int | str, int], offload_folder: str | None, file: str | None = None
) -> dict:
    """`device_map` (and `max_memory`, `offload_folder`) for `from_pretrained`, from a placement on this host.

    `single` keeps today's behaviour (the whole model on the first GPU, or on the CPU); pinned modules become an
    explicit device map; `auto` and caps go to accelerate's planner inside transformers. `free` holds the
    free bytes of each visible GPU (by index) and the host's available RAM (`cpu`); `meta_model` is needed
    for pinned modules only. A non-single placement always gets an offload folder: a cap that pushes
    modules past the CPU sends them to disk.
    """
    placement = parse(value)
    gpus = any(isinstance(k, int) for k in free)
    if placement == "single":
        return {"device_map": "cuda" if gpus else "cpu"}
    kwargs: dict = {"offload_folder": offload_folder}
    if placement == "auto":
        return {**kwargs, "device_map": "auto"}
    if placement.offload is not None or placement.disk is not None:
        pinned = {}
        for device, names in (("cpu", placement.offload or []), ("disk", placement.disk or [])):
            for prefix in resolve_modules(names, meta_model, file=file):
                pinned[prefix] = device
        return {**kwargs, "device_map": pinned_device_map(meta_model, pinned, 0 if gpus else "cpu")}
    return {**kwargs, "device_map": "auto", "max_memory": max_memory_bytes(placement, free)}


# --- what a placement costs -----------------------------------------------------------------------


def slowdown(measured: dict, single: dict) -> dict | None:
    """How much slower a cell ran than the same cell with `single` placement, from both cells' measurements:
    time to first token and decode rate as factors (2.0 = twice as slow); None unless both were timed."""
    out = {}
    if measured.get("prefill_s") and single.get("prefill_s"):
        out["ttft"] = round(measured["prefill_s"] / single["prefill_s"], 2)
    if measured.get("decode_tokens_per_s") and single.get("decode_tokens_per_s"):
        out["decode"] = round(single["decode_tokens_per_s"] / measured["decode_tokens_per_s"], 2)
    return out or None


# --- what a resolved device map says --------------------------------------------------------------


def device_label(device: int | str) -> str:
    """'cuda:0' for a GPU index, 'cpu' / 'disk' as they are."""
    return f"cuda:{device}" if isinstance(device, int) or str(device).isdigit() else str(device)
