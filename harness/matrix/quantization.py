"""Quantization: the weight format a cell's model runs in, as the `quantization` axis names it.

Values are `none` and the formats of harness/data/quantization.yaml (torchao-int8, bnb-nf4, fp8, awq, ...),
each optionally with `+vision` to quantize the vision tower too (real recipes keep it unquantized, and so
does every value without the suffix). A real checkpoint is recognised from its config's
`quantization_config` (or, for a hub id nothing can be read for offline, from its name), and its cells
take that format whatever the axis says: a checkpoint cannot be re-quantized. Pure data, no torch.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path

import yaml

from harness.errors import UserError

NONE = "none"
VISION_SUFFIX = "+vision"
ENGINES = ("transformers", "vllm", "sglang")


@dataclass(frozen=True)
class Layout:
    """How a quantized nn.Linear is stored (see the table's header)."""

    bits: float
    group_size: int | None
    scale_bytes: float | str
    zero_bytes: float | str
    resident: str  # packed | dense (what transformers holds after the first forward pass)
    index_bytes: float = 0
    module_bytes: float = 0
    block_rows: int = 1  # output rows sharing one scale (fine-grained FP8: 128x128 blocks)


@dataclass(frozen=True)
class EngineRule:
    min_sm: int | None
    says: str | None = None
    source: str = ""
    native_sm: int | None = None
    marlin: bool = False
    note: str | None = None


@dataclass(frozen=True)
class Format:
    key: str
    name: str
    method: str
    package: str
    pip: str
    made_here: str  # tiny | none
    layout: Layout
    drift_max: float
    engines: dict[str, EngineRule] = field(default_factory=dict)
    why: str | None = None
    cpu_only: str | None = None
    refused: dict | None = None  # engines, says, why, sources
    vision_tower: str | None = None  # why transformers fails it with the vision tower quantized (+vision)

    def refusal_of_every_qwen_vl(self, engine: str, arch: str) -> str | None:
        """What `engine` says to this format on every Qwen-VL architecture (GGUF), or None."""
        if not self.refused or engine not in self.refused["engines"]:
            return None
        return f'{self.refused["why"]}: "{self.refused["says"].format(arch=arch)}"'

    def refusal(self, engine: str, gpu_sm: int) -> str | None:
        """Why `engine` cannot run this format on a card of compute capability `gpu_sm` (70 for 7.0), in the
        engine's own words where the table has them; None when it runs there."""
        rule = self.engines.get(engine)
        if rule is None or rule.min_sm is None or gpu_sm >= rule.min_sm:
            return None
        words = rule.says.format(sm=gpu_sm, capability=f"({gpu_sm // 10}, {gpu_sm % 10})") if rule.says else None
        return f"{self.key} needs sm{rule.min_sm} in {engine}, and the card is sm{gpu_sm}" + (
            f': "{words}"' if words else f" ({rule.source})"
        )


@cache
def _table() -> dict:
    return yaml.safe_load(resources.files("harness.data").joinpath("quantization.yaml").read_text())


@cache
def formats() -> dict[str, Format]:
    out = {}
    for key, row in _table()["formats"].items():
        engines = {name: EngineRule(**rule) for name, rule in row.pop("engines", {}).items()}
        out[key] = Format(key=key, layout=Layout(**row.pop("layout")), engines=engines, **row)
    return out


def marlin() -> dict:
    """vLLM's Marlin tile sizes and refusals (the table's `marlin` entry)."""
    return _table()["marlin"]


def values() -> list[str]:
    """Every value the axis accepts (each format also with +vision)."""
    return [NONE, *formats(), *(f"{key}{VISION_SUFFIX}" for key in formats())]


@dataclass(frozen=True)
class Quantization:
    format: Format | None  # None: unquantized
    vision: bool = False  # the vision tower quantized too

    @property
    def value(self) -> str:
        if self.format is None:
            return NONE
        return self.format.key + (VISION_SUFFIX if self.vision else "")


def check(value: str) -> str:
    """An axis value, or a ValueError that offers the closest one (pydantic turns it into the matrix's error)."""
    if value in values():
        return value
    close = difflib.get_close_matches(str(value).lower(), values(), n=1, cutoff=0.5)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise ValueError(
        f"unknown quantization '{value}'; {hint}use one of {', '.join([NONE, *formats()])} "
        f"(add {VISION_SUFFIX} to quantize the vision tower too)"
    )


def parse(value: str) -> Quantization:
    check(value)
    if value == NONE:
        return Quantization(None)
    key = value.removesuffix(VISION_SUFFIX)
    return Quantization(formats()[key], vision=value.endswith(VISION_SUFFIX))


def cell_id_part(value: str) -> str | None:
    """The quantization's part of a cell id; None for `none` (ids of unquantized cells stay as they were)."""
    return None if value == NONE else value


# --- real checkpoints -------------------------------------------------------------------------------


def recognise(quantization_config: dict | None) -> str | None:
    """The format a checkpoint's `quantization_config` describes, or None (unquantized, or a method the table
    does not know: such a checkpoint still loads, through whatever transformers does with it)."""
    if not quantization_config:
        return None
    q = quantization_config
    method = str(q.get("quant_method", "")).lower()
    if method in ("awq", "gptq"):
        return method
    if method == "fp8":  # transformers' fine-grained FP8 (Qwen3-VL *-FP8 checkpoints)
        return "fp8-block"
    if method == "bitsandbytes":
        if q.get("load_in_4bit"):
            return "bnb-nf4" if q.get("bnb_4bit_quant_type", "fp4") == "nf4" else None
        return "bnb-int8" if q.get("load_in_8bit") else None
    if method == "torchao":
        kind = json.dumps(q.get("quant_type", "")).lower()
        return "torchao-int4" if "int4" in kind else "torchao-int8" if "int8" in kind else None
    if method == "compressed-tensors":
        for group in (q.get("config_groups") or {}).values():
            weights = group.get("weights") or {}
            activations = group.get("input_activations")
            if weights.get("type") == "float" and weights.get("num_bits") == 8:
                return "fp8"
            if weights.get("type", "int") == "int" and activations is None:
                return {4: "w4a16", 8: "w8a16"}.get(weights.get("num_bits"))
    return None


_FROM_NAME = [
    (r"-awq\b", "awq"),
    (r"-gptq\b", "gptq"),
    (r"fp8-dynamic", "fp8"),
    (r"-fp8\b", "fp8-block"),
    (r"bnb-4bit|-nf4\b", "bnb-nf4"),
    (r"bnb-8bit", "bnb-int8"),
    (r"w4a16", "w4a16"),
    (r"w8a16", "w8a16"),
    (r"\.gguf$|-gguf\b", "gguf-q8_0"),
]


def from_name(name: str) -> str | None:
    """The format a hub id's name declares (Qwen/Qwen2.5-VL-72B-Instruct-AWQ), when its config cannot be read."""
    return next((fmt for pattern, fmt in _FROM_NAME if re.search(pattern, name.lower())), None)


def checkpoint_format(source: dict, config: dict | None, declared: str | None, matrix_file: str) -> str | None:
    """The format a real checkpoint is in: its config's `quantization_config`, else the model entry's own
    `quantization:`, else its hub name. A `path:` whose config says one format and whose entry another is the
    matrix's mistake."""
    found = recognise((config or {}).get("quantization_config"))
    if found and declared and declared.removesuffix(VISION_SUFFIX) != found:
        where = source.get("path") or source.get("hub") or source.get("arch")
        raise UserError(
            f"model '{where}' is declared `quantization: {declared}`, and its config.json says {found}.",
            file=matrix_file,
            key="models.quantization",
            fix=f"remove `quantization:` from this model (its config decides), or set it to {found}.",
        )
    if found or declared:
        return found or declared
    if "hub" in source:
        return from_name(source["hub"])
    return None


# A tensor-name fragment every checkpoint of a method holds (as save_pretrained writes them).
EXPECTED_TENSOR = {"awq": "qweight", "gptq": "qweight", "torchao": "_qdata", "compressed-tensors": "weight_scale"}


def check_path_checkpoint(folder: str | Path, fmt: str) -> None:
    """A `path:` checkpoint whose config says it is quantized must hold the files that format needs; a folder
    whose files do not match is the matrix's input, said with the file named (never a load traceback)."""
    folder = Path(folder)
    method = formats()[fmt.removesuffix(VISION_SUFFIX)].method
    if method == "gguf":
        if not any(folder.glob("*.gguf")):
            raise UserError(
                f"the GGUF checkpoint '{folder}' holds no .gguf file.",
                file=str(folder),
                key="models.path",
                fix="point `path:` at the folder holding the .gguf file (and its config.json).",
            )
        return
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        raise UserError(
            f"the {fmt} checkpoint '{folder}' has no .safetensors weights.",
            file=str(folder / "config.json"),
            key="quantization_config",
            fix="point `path:` at a folder written by save_pretrained of the quantized model.",
        )
    expected = EXPECTED_TENSOR.get(method)
    if method == "bitsandbytes":
        expected = "quant_state" if fmt.startswith("bnb-nf4") else "SCB"
    if expected is None:
        return
    names = _tensor_names(weights)
    if not any(expected in name for name in names):
        raise UserError(
            f"config.json says {fmt} ({method}), and no tensor in {', '.join(w.name for w in weights)} is a "
            f"{method} weight (no '{expected}' tensor).",
            file=str(folder / "config.json"),
            key="quantization_config",
            fix="the weights were saved unquantized or by another method: remove `quantization_config` from "
            "config.json, or save the quantized model again with save_pretrained.",
        )


def _tensor_names(files: list[Path]) -> list[str]:
    """Tensor names from safetensors headers (8-byte length, then JSON), without loading any tensor."""
    names = []
    for file in files:
        with open(file, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            names += [k for k in json.loads(handle.read(size)) if k != "__metadata__"]
    return names
