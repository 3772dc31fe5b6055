"""Know before you run, per device: the device map transformers will choose for a cell's placement, and the
predicted peak on every device it uses.

The split is not re-derived: a meta-device model of the cell's architecture (no memory) goes through the
same functions `from_pretrained(device_map=...)` calls (transformers' port of accelerate's
`get_balanced_memory` and `infer_auto_device_map`, with the model's own `_no_split_modules`), so the
predicted map is the map a load produces. Peaks then come from the module sizes on each device and the
activations of `plan.predict`. Imports torch and transformers: CLI and worker only.
"""

from __future__ import annotations

import logging
import math
import re
from contextlib import contextmanager
from dataclasses import asdict, dataclass

from harness.matrix import placement as placement_mod
from harness.matrix.cells import Cell
from harness.plan.memory import ALLOCATOR_SLACK, CPU_RUNTIME_MIB, CUDA_CONTEXT_MIB, MIB, config_for, meta_model, predict


@contextmanager
def _quiet():
    """accelerate warns about GPU indices this host does not have: planning another card's cells is the point."""
    logger = logging.getLogger("accelerate.utils.modeling")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def auto_max_memory(free: dict[int | str, int]) -> dict[int | str, int]:
    """What transformers gives accelerate for `device_map="auto"` without `max_memory`: each GPU's free memory
    (90 % of it when there is one GPU) and 90 % of the available RAM."""
    gpus = [k for k in free if isinstance(k, int)]
    out: dict[int | str, int] = {i: int(free[i] * 0.9) if len(gpus) == 1 else free[i] for i in gpus}
    out["cpu"] = int(free["cpu"] * 0.9)
    return out


def device_map_for(model, value, *, free: dict[int | str, int]) -> dict[str, int | str]:
    """The device map `from_pretrained` will build for this placement on a host with `free` bytes per device."""
    from transformers.integrations.accelerate import _get_device_map

    kwargs = placement_mod.from_pretrained_kwargs(value, model, free=free, offload_folder=None)
    device_map = kwargs["device_map"]
    if isinstance(device_map, dict):
        return device_map
    if device_map in ("cuda", "cpu"):
        return {"": 0 if device_map == "cuda" else "cpu"}
    max_memory = kwargs.get("max_memory")
    if max_memory is None:
        max_memory = auto_max_memory(free)
    with _quiet():
        return dict(_get_device_map(model, "auto", dict(max_memory), None))


@dataclass
class PlacementPrediction:
    id: str
    placement: str | dict
    device_map: dict
    summary: str
    weights_mib: dict  # device label -> weights held there (disk included)
    peaks_mib: dict  # device label -> predicted peak (GPUs and the host; disk holds no working memory)
    budget_devices: list  # the devices the cell's budget applies to: its GPUs, or the host on a CPU-only run
    verdict: str  # fits | tight | over (the worst budget device)
    budget_mib: float | None

    def to_dict(self) -> dict:
        return asdict(self)


def _tensor_bytes(model) -> dict[str, int]:
    """Bytes of every parameter and buffer; a tied weight (lm_head to the embedding) counts once, as it is held
    once after loading (the meta model is built untied)."""
    tied = set(getattr(model, "all_tied_weights_keys", {}))
    tensors = [*model.named_parameters(), *model.named_buffers()]
    return {name: t.numel() * t.element_size() for name, t in tensors if name not in tied}


def _largest_leaf(model, names: set[str]) -> int:
    """Bytes of the largest module with its own tensors among `names`: accelerate streams offloaded weights to the
    execution device one such module at a time."""
    sizes: dict[str, int] = {}
    for name, size in _tensor_bytes(model).items():
        if name in names:
            owner = name.rpartition(".")[0]
            sizes[owner] = sizes.get(owner, 0) + size
    return max(sizes.values(), default=0)


def host_free(card_mib: float | None, gpus: int) -> dict[int | str, int]:
    """Free bytes per device of the host a cell is planned for: each GPU its card less the CUDA context; the CPU
    this machine's available RAM (what transformers itself would read here)."""
    import psutil

    free: dict[int | str, int] = {"cpu": psutil.virtual_memory().available}
    for index in range(gpus if card_mib else 0):
        free[index] = int((card_mib - CUDA_CONTEXT_MIB) * MIB)
    return free


def predict_placement(
    cell: Cell,
    value,
    *,
    free: dict[int | str, int] | None = None,
    text_tokens: int | None = None,
    visual_tokens: int | None = None,
) -> PlacementPrediction:
    """Predicted device map and per-device peaks of `cell` under placement `value`.

    `free` (bytes per GPU index and `cpu`) describes the host; by default the cell's card, as many of them as the
    placement asks for (one otherwise), and this machine's RAM.
    """
    from transformers.integrations.accelerate import expand_device_map

    from harness.matrix.budgets import parse_budget_mib
    from harness.matrix.gpus import table

    gpu = table()[cell.device]
    if free is None:
        free = host_free(gpu.memory_mib if gpu.is_gpu else None, placement_mod.gpus_requested(value) or 1)
    model = meta_model(cell)
    device_map = device_map_for(model, value, free=free)
    sizes = _tensor_bytes(model)
    where = expand_device_map(device_map, list(sizes))
    labels = {name: placement_mod.device_label(device) for name, device in where.items()}
    gpus_used = sorted({d for d in where.values() if isinstance(d, int)})
    main = placement_mod.device_label(gpus_used[0]) if gpus_used else "cpu"
    execution = {name: (label if label.startswith("cuda") else main) for name, label in labels.items()}

    weights: dict[str, float] = {}
    for name, label in labels.items():
        weights[label] = weights.get(label, 0) + sizes[name]
    offloaded = {name for name, label in labels.items() if label in ("cpu", "disk") and label != main}
    streamed = _largest_leaf(model, offloaded)

    base = predict(
        cell, text_tokens=text_tokens, visual_tokens=visual_tokens, device_kind="cuda" if gpus_used else "cpu"
    )
    parts = base.parts
    config = config_for(cell)
    layers = config["text_config"]["num_hidden_layers"]
    layer_devices = [
        execution.get(f"{placement_mod.DECODER_LAYERS}.{i}.input_layernorm.weight", main) for i in range(layers)
    ]
    vision_device = next((d for n, d in execution.items() if n.startswith(placement_mod.VISION + ".")), main)

    peaks: dict[str, float] = {}
    for label in sorted({main, *execution.values()}):
        share = layer_devices.count(label) / layers
        kv = parts["kv_cache_mib"] * MIB * share
        text = parts["text_activations_mib"] * MIB if share else 0
        vision = parts["vision_activations_mib"] * MIB if label == vision_device else 0
        resident = weights.get(label, 0) if label.startswith("cuda") or label == "cpu" else 0
        body = resident + (streamed if label == main else 0) + max(vision, kv + text)
        if label.startswith("cuda"):
            peaks[label] = (body * (1 + ALLOCATOR_SLACK) + CUDA_CONTEXT_MIB * MIB) / MIB
        else:
            peaks[label] = (body + CPU_RUNTIME_MIB * MIB) / MIB
    if gpus_used:  # the host holds the runtime and the CPU-offloaded weights; the work runs on the GPUs
        peaks["cpu"] = (weights.get("cpu", 0) + CPU_RUNTIME_MIB * MIB) / MIB

    budget_devices = [placement_mod.device_label(i) for i in gpus_used] or ["cpu"]
    budget = parse_budget_mib(cell.budget, cell.device) if cell.budget else gpu.memory_mib
    worst = max(peaks[d] for d in budget_devices)
    verdict = "fits" if budget is None else "over" if worst > budget else "tight" if worst > 0.9 * budget else "fits"
    param_names = [n for n, _ in model.named_parameters()]
    return PlacementPrediction(
        id=cell.id,
        placement=placement_mod.normalize(value),
        device_map={k: v for k, v in device_map.items()},
        summary=summarize(device_map, param_names),
        weights_mib={k: round(v / MIB, 1) for k, v in weights.items()},
        peaks_mib={k: round(v, 1) for k, v in peaks.items()},
        budget_devices=budget_devices,
        verdict=verdict,
        budget_mib=round(budget, 1) if budget else None,
    )


def with_placement(prediction, planned):
    """A cell's memory plan (plan.Prediction) with its placement's: the peak the budget is checked against is the
    largest on the budget devices (the GPUs, or the host on a CPU-only run)."""
    if prediction is None or planned is None:
        return prediction
    prediction.predicted_peak_mib = max(planned.peaks_mib[d] for d in planned.budget_devices)
    prediction.verdict = planned.verdict
    prediction.placement = planned.to_dict()
    return prediction


def offload_remedy(cell: Cell, budget_mib: float | None = None) -> tuple[dict, str] | None:
    """For a GPU cell over its budget with `single`: the fewest modules kept on the CPU that bring its GPU peak
    under budget — the vision tower first, then the first N decoder layers — as (placement, sentence); None
    when the cell fits already, is not a GPU cell, or does not fit even with every layer on the CPU."""
    from harness.matrix.gpus import table

    gpu = table()[cell.device]
    if not gpu.is_gpu:
        return None
    budget = budget_mib or gpu.memory_mib
    single = predict_placement(cell, "single")
    if single.peaks_mib["cuda:0"] <= budget:
        return None

    def gpu_peak(value) -> float:
        return predict_placement(cell, value).peaks_mib.get("cuda:0", math.inf)

    vision_only = {"offload": ["vision"]}
    if gpu_peak(vision_only) <= budget:
        return vision_only, f"fits with the vision tower on the CPU ({gpu_peak(vision_only) / 1024:.1f} GiB on the GPU)"
    layers = config_for(cell)["text_config"]["num_hidden_layers"]
    low, high = 1, layers
    if gpu_peak({"offload": ["vision", f"layers:{high}"]}) > budget:
        return None
    while low < high:  # fewest layers: the GPU peak falls as layers leave it
        mid = (low + high) // 2
        if gpu_peak({"offload": ["vision", f"layers:{mid}"]}) <= budget:
            high = mid
        else:
            low = mid + 1
    value = {"offload": ["vision", f"layers:{low}"]}
    return value, (
        f"fits with the vision tower and {low} layer{'s' if low > 1 else ''} on the CPU "
        f"({gpu_peak(value) / 1024:.1f} GiB on the GPU)"
    )


# --- where the modules landed, in one line ------------------------------------------------------------


def _part(param: str) -> tuple[str, int | str]:
    """(unit, item) of a parameter for the summary: ('vision', block index or sub-module), ('layers', index), or
    a module's own name (embed_tokens, norm, lm_head)."""
    if param.startswith(placement_mod.VISION + "."):
        module = param[len(placement_mod.VISION) + 1 :].rpartition(".")[0]
        block = re.match(r"blocks\.(\d+)", module)
        return "vision", int(block.group(1)) if block else module
    if param.startswith(placement_mod.DECODER_LAYERS + "."):
        return "layers", int(param[len(placement_mod.DECODER_LAYERS) + 1 :].split(".")[0])
    module = param.rpartition(".")[0]
    return module.rpartition(".")[2] or module, module


def _ranges(indices: list[int]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for i in sorted(set(indices)):
        if out and i == out[-1][1] + 1:
            out[-1][1] = i
        else:
            out.append([i, i])
    return [(a, b) for a, b in out]


def _items(items: list[int | str], numbered: str) -> str:
    """'patch_embed, blocks 0–1, merger.ln_q' from the items of one run."""
    spans = ", ".join(f"{a}–{b}" if a != b else f"{a}" for a, b in _ranges([i for i in items if isinstance(i, int)]))
    names = [i for i in dict.fromkeys(items) if isinstance(i, str)]
    first_number = next((n for n, i in enumerate(items) if isinstance(i, int)), len(items))
    before = [n for n in names if items.index(n) < first_number]
    after = [n for n in names if n not in before]
    return ", ".join([*before, *([f"{numbered}{spans}"] if spans else []), *after])


def summarize(device_map: dict[str, int | str], param_names: list[str]) -> str:
    """One line: where the modules landed, e.g. 'vision: cpu, layers 0–13: cuda:0, 14–27: cuda:1, lm_head: disk'."""
    from transformers.integrations.accelerate import expand_device_map

    per_param = expand_device_map(device_map, param_names)
    if len({placement_mod.device_label(d) for d in per_param.values()}) <= 1:
        return f"all: {placement_mod.device_label(next(iter(per_param.values()), 'cpu'))}"
    units: dict[str, list[tuple[int | str, str]]] = {}
    for param, device in per_param.items():
        unit, item = _part(param)
        units.setdefault(unit, []).append((item, placement_mod.device_label(device)))
    parts = []
    for unit, entries in units.items():
        if len({device for _, device in entries}) == 1:
            parts.append(f"{unit}: {entries[0][1]}")
            continue
        runs: list[tuple[list, str]] = []
        for item, device in entries:
            if runs and runs[-1][1] == device:
                runs[-1][0].append(item)
            else:
                runs.append(([item], device))
        if unit == "layers":
            parts.append("layers " + ", ".join(f"{_items(items, '')}: {device}" for items, device in runs))
        else:
            parts += [f"{unit} {_items(items, 'blocks ')}: {device}" for items, device in runs]
    return ", ".join(parts)
