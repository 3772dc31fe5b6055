"""Expand a matrix into cells: one cell per model x device x axis combination, with a readable id.

Pure data (no torch): the pytest process expands thousands of cells at collection time.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import itertools
import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from harness.errors import UserError
from harness.matrix import quantization as quant
from harness.matrix.gpus import covers
from harness.matrix.launch import DOCKER, TEMPLATE_NAMES, check_command
from harness.matrix.placement import cell_id_part, normalize
from harness.matrix.schema import AXIS_FIELDS, ExpectRule, Launch, Matrix, ModelEntry, Rule, Section
from harness.models.architectures import load_config, shipped, shipped_family
from harness.models.families import FAMILIES

DTYPE_ORDER = {"float32": 0, "bfloat16": 1, "float16": 2}  # float32 first: reduced dtypes compare against it
# Attention implementations the in-process backend switches on a loaded model (transformers'
# set_attn_implementation) instead of loading it again: checked equal to a fresh load for every family
# (tests/test_loads.py). flash_attention_2 loads its own model (the switch is not checked on a GPU here), and
# a served model's attention is its server's launch flag.
SWITCHED_ATTENTION = ("eager", "sdpa")


@dataclass
class Expectation:
    outcome: str = "pass"  # pass | xfail | skip
    categories: list[str] = field(default_factory=list)
    reason: str = ""
    strict: bool = True
    answer: str | None = None
    source: str = "default"  # matrix | capability | default


@dataclass
class Cell:
    id: str
    model: str
    family: str
    source: dict  # {"tiny": family, "variant": ...} | {"arch": name} | {"hub": id} | {"path": folder}
    device: str
    dtype: str
    attn_implementation: str
    resolution: str
    input: str
    min_pixels: int | None
    max_pixels: int | None
    backend: str
    placement: Any  # "single" | "auto" | a placement mapping (see harness/matrix/placement.py), as JSON
    quantization: str  # "none" | a format of harness/data/quantization.yaml, maybe with +vision
    extra: dict[str, Any]
    budget: str | None
    prompt: str
    max_new_tokens: int
    timeout_s: float
    load_timeout_s: float
    repeats: int
    images: int
    image: str | None
    drift_max_abs_diff: float
    drift_top1: bool
    drift_top_k: int
    degenerate_check: bool
    expectation: Expectation = field(default_factory=Expectation)
    fault: Any = None
    matrix_file: str = ""
    serving: dict | None = None  # served backends: how the server is reached (the backend's Target's fields)
    single_twin: str | None = None  # the id of the same cell with `single` placement (what slowdown compares to)
    float32_twin: str | None = None  # the id of the float32 cell drift compares to (unquantized, unless pre-quantized)

    @property
    def width(self) -> int:
        return int(self.resolution.split("x")[0])

    @property
    def height(self) -> int:
        return int(self.resolution.split("x")[1])

    @property
    def placement_id(self) -> str:
        """The placement as ids and selectors name it: single, auto, offload-vision, maxmem-cpu6gib, ..."""
        return cell_id_part(self.placement) or "single"

    @property
    def load_attention(self) -> str:
        """The attention part of the loaded model's key: one for the in-process attentions switched on a loaded
        model (`SWITCHED_ATTENTION`), else the cell's own."""
        if self.backend == "transformers" and self.attn_implementation in SWITCHED_ATTENTION:
            return "+".join(SWITCHED_ATTENTION)
        return self.attn_implementation

    @property
    def xdist_group(self) -> str:
        """Cells that run on one xdist worker: a model's dtypes, weight formats, attentions and placements
        together, so that each reduced dtype or quantized form meets its float32 unquantized twin (drift) and
        each placement its `single` twin (slowdown) on one worker."""
        return f"{self.model}/{self.load_attention}"

    @property
    def group(self) -> str:
        """Cells sharing a loaded model: model, dtype, backend, weight format, placement and (unless switched
        on the loaded model) attention implementation."""
        placed = "" if self.placement == "single" else f"/{self.placement_id}"
        quantized = "" if self.quantization == quant.NONE else f"/{self.quantization}"
        return f"{self.model}/{self.dtype}/{self.load_attention}/{self.backend}{quantized}{placed}"

    @property
    def drift_twin(self) -> str:
        """The id of the same cell in float32, unquantized (what drift is measured against)."""
        return self.float32_twin or self.id.replace(f"-{self.dtype}-", "-float32-", 1)

    @property
    def prequantized(self) -> bool:
        """A real checkpoint that is quantized already: its cells run in its own format."""
        return "quantization" in self.source

    @property
    def drift_reference(self) -> bool:
        """Whether this cell's logits are the reference its model's other cells drift from: float32, and
        unquantized (a pre-quantized checkpoint has no unquantized form: its float32 cell is the reference)."""
        return self.dtype == "float32" and (self.quantization == quant.NONE or self.prequantized)

    def axis_values(self) -> dict[str, Any]:
        """What selectors (`when:`) match against."""
        return {
            **{f: getattr(self, f) for f in AXIS_FIELDS},
            "placement": self.placement_id,
            "variant": self.source.get("variant", "default"),
            **self.extra,
        }

    def to_dict(self) -> dict:
        return asdict(self)

    def definition(self) -> dict:
        """What the cell does (model, axes, inputs, limits, checks), without its id and expectation:
        a resumed run may skip a recorded cell only when this is unchanged."""
        return {k: v for k, v in asdict(self).items() if k not in ("id", "expectation", "matrix_file")}

    def fingerprint(self, definition: dict | None = None) -> str:
        """The definition's hash (pass `definition` where it is already made: it is the costly part)."""
        blob = json.dumps(self.definition() if definition is None else definition, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, data: dict) -> Cell:
        return cls(**{**data, "expectation": Expectation(**data["expectation"])})


def selector_matches(when: dict[str, Any], values: dict[str, Any]) -> bool:
    for axis, wanted in when.items():
        options = wanted if isinstance(wanted, list) else [wanted]
        if values.get(axis) not in options:
            return False
    return True


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


_FAMILY_FROM_NAME = [
    (r"qwen3[-_]?vl.*-a\d+b", "qwen3_vl_moe"),
    (r"qwen3[-_]?vl", "qwen3_vl"),
    (r"qwen2\.5[-_]?vl|qwen2_5_vl", "qwen2_5_vl"),
    (r"qwen2[-_]?vl", "qwen2_vl"),
]


def model_identity(entry: ModelEntry, matrix_file: str) -> tuple[str, str, dict]:
    """(id, family, source) of a model entry."""
    if entry.quantization and (entry.tiny or entry.arch):
        raise UserError(
            f"`quantization: {entry.quantization}` is for a pre-quantized hub:/path: checkpoint; "
            f"'{entry.tiny or entry.arch}' is quantized by the quantization axis.",
            file=matrix_file,
            key="models.quantization",
            fix=f"remove it from the model and list {entry.quantization} under `axes: quantization:`.",
        )
    if entry.tiny:
        default_id = "tiny-" + _slug(entry.tiny) + ("" if entry.variant == "default" else "-" + _slug(entry.variant))
        source = {"tiny": entry.tiny, "variant": entry.variant, **({"seed": entry.seed} if entry.seed else {})}
        return entry.id or default_id, entry.tiny, source
    name = entry.arch or entry.hub or entry.path
    kind = "arch" if entry.arch else "hub" if entry.hub else "path"
    family = entry.family
    if family is None and kind == "arch":
        family = shipped_family(name)
        if family is None and "/" not in name:
            close = difflib.get_close_matches(name, shipped(), n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise UserError(
                f"unknown architecture '{name}'.",
                file=matrix_file,
                key="models.arch",
                fix=f"{hint}shipped: {', '.join(shipped())}; or give a hub id (Org/Name) whose config "
                f"can be fetched, or `path:` to a local folder.",
            )
    if family is None and kind == "path" and (Path(name) / "config.json").exists():
        family = json.loads((Path(name) / "config.json").read_text()).get("model_type")
    if family is None:
        family = next((fam for pattern, fam in _FAMILY_FROM_NAME if re.search(pattern, name.lower())), None)
    if family not in FAMILIES:
        raise UserError(
            f"cannot tell the model family of '{name}' (got {family!r}).",
            file=matrix_file,
            key=f"models.{kind}",
            fix=f"add `family:` to this model, one of {', '.join(FAMILIES)}.",
        )
    source = {kind: name, **({"seed": entry.seed} if kind == "arch" or entry.seed else {})}
    fmt = quant.checkpoint_format(source, _readable_config(kind, name), entry.quantization, matrix_file)
    if fmt:
        source["quantization"] = fmt
    plain = urlsplit(name).path if "://" in name else name  # a URL's credentials and query never name a cell
    short = re.sub(r"-instruct$", "", _slug(Path(plain).name if kind == "path" else plain.split("/")[-1]))
    if not short:  # a name of non-ASCII characters only: stable, and not empty
        short = f"{kind}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
    return entry.id or short, family, source


def _readable_config(kind: str, name: str) -> dict | None:
    """The config a model's quantization is read from without the network: a `path:` folder's config.json, a
    shipped architecture's; None for a hub id that is not shipped (its name speaks for it)."""
    if kind == "path":
        config = Path(name) / "config.json"
        return json.loads(config.read_text()) if config.is_file() else None
    if shipped_family(name):
        return load_config(name)
    return None


REMOTE = "endpoint"  # what a cell id says in place of device, dtype and attention for a server it did not start


def _cell_id(
    model: str,
    device: str,
    dtype: str,
    attn: str,
    resolution: str,
    kind: str,
    budget,
    backend: str,
    quantization: str,
    placement,
    extra: dict,
) -> str:
    # A server the harness reaches but did not start: its card, dtype and attention are the server's, unseen
    # here, so the id says `endpoint` instead of naming them.
    parts = [model, "endpoint", resolution] if device == REMOTE else [model, device, dtype, attn, resolution]
    if kind != "image":
        parts.append(kind)
    if budget is not None:
        parts += [f"min{budget.min_pixels}px"] if budget.min_pixels else []
        parts += [f"max{budget.max_pixels}px"] if budget.max_pixels else []
    if backend != "transformers":
        parts.append(backend)
    parts += [quant.cell_id_part(quantization)] if quantization != quant.NONE else []
    parts += [cell_id_part(placement)] if placement != "single" else []
    parts += [f"{k}={v}" for k, v in extra.items()]
    return "-".join(parts)


def _first_rule(rules: list[Rule], values: dict) -> Rule | None:
    return next((r for r in rules if selector_matches(r.when, values)), None)


def _expectation(rule: ExpectRule) -> Expectation:
    cats = rule.category if isinstance(rule.category, list) else [rule.category] if rule.category else []
    return Expectation(
        outcome=rule.outcome,
        categories=cats,
        reason=rule.reason or "",
        strict=rule.strict,
        answer=rule.answer,
        source="matrix",
    )


SERVED_BACKENDS = ("openai", "gradio")  # backends whose cells go to a server, reached or launched
DOCKER_FIELDS = {"image", "port", "shm_size", "env", "args"}


def _launch(entry: ModelEntry, matrix_file: str, backend: str) -> Launch | None:
    """The model's `launch:`, its placeholders checked, for a backend that can run it."""
    launch = Launch(command=entry.launch) if isinstance(entry.launch, str) else entry.launch
    if launch is None:
        return None
    if launch.command == DOCKER:
        if backend != "gradio":
            raise UserError(
                "the docker launch template runs a WebUI image, for `backend: gradio` cells.",
                file=matrix_file,
                key="launch",
                fix="serve `backend: openai` cells with a template (vllm, sglang, lmdeploy, transformers-serve), or "
                "run the container yourself and give its `endpoint:`.",
            )
        for value in launch.env.values():
            check_command(value, matrix_file, "launch.env")
        check_command(launch.args or "", matrix_file, "launch.args")
    elif launch.command in TEMPLATE_NAMES and backend == "gradio":
        raise UserError(
            f"the launch template '{launch.command}' starts an OpenAI-compatible server, not a WebUI.",
            file=matrix_file,
            key="launch",
            fix="give the WebUI's own command with {port} (and {model}, {dtype}), or `{command: docker, image: ...}`.",
        )
    elif launch.command not in TEMPLATE_NAMES:
        check_command(launch.command, matrix_file)
    return launch


def serving(entry: ModelEntry, matrix_file: str, backend: str = "openai") -> dict:
    """How a model's served cells reach their server: for `backend: openai` the fields of
    backends.openai.group.Target, for `backend: gradio` those of backends.gradio.Target."""
    name = entry.tiny or entry.arch or entry.hub or entry.path
    if backend == "gradio" and not (entry.webui or entry.launch):
        raise UserError(
            f"model '{name}' has `backend: gradio` cells but no WebUI to talk to.",
            file=matrix_file,
            key="models.webui",
            fix="give the model `webui: http://host:7860/` (a running app), or `launch:` the app's command with "
            "{port} (and {model}, {dtype}) or `{command: docker, image: IMAGE}`.",
        )
    if backend == "openai" and not (entry.endpoint or entry.launch):
        raise UserError(
            f"model '{name}' has `backend: openai` cells but no server to send them to.",
            file=matrix_file,
            key="models.endpoint",
            fix="give the model `endpoint: http://host:port/v1` (a running server), or `launch:` a template "
            "(transformers-serve, vllm, sglang, lmdeploy) or a command with {model} and {port}.",
        )
    launch = _launch(entry, matrix_file, backend)
    launched = {"launch": launch.command, **launch.model_dump(exclude={"command"})} if launch else {}
    if backend == "gradio":
        return {
            "webui": entry.webui,
            "steps": [step.model_dump(by_alias=True, exclude_none=True) for step in entry.steps or ()] or None,
            "greedy": entry.greedy,
            "matrix_file": matrix_file,
            **{k: v for k, v in launched.items() if k not in DOCKER_FIELDS or launch.command == DOCKER},
        }
    return {
        "endpoint": entry.endpoint,
        "api_key_env": entry.api_key_env,
        "model_name": entry.served_model,
        "matrix_file": matrix_file,
        **{k: v for k, v in launched.items() if k not in DOCKER_FIELDS},
    }


def _drift_bound(defaults, dtype: str, value: str, *, prequantized: bool) -> float:
    """A quantized cell's drift bound: its format's (harness/data/quantization.yaml), plus the dtype's when it runs
    in a reduced dtype too; a matrix that sets `drift_max_abs_diff` itself keeps its own."""
    if value == quant.NONE or prequantized or "drift_max_abs_diff" in defaults.model_fields_set:
        return defaults.drift_max_abs_diff
    return round(quant.parse(value).format.drift_max + (defaults.drift_max_abs_diff if dtype != "float32" else 0), 4)


def _section_cells(matrix: Matrix, section: Section, matrix_file: str) -> list[Cell]:
    defaults = matrix.defaults
    if section.defaults is not None:
        defaults = defaults.model_copy(update=section.defaults.model_dump(exclude_unset=True))
    axes = section.axes
    budgets = {**matrix.budgets, **section.budgets}
    expect = section.expect + matrix.expect
    exclude = section.exclude + matrix.exclude
    extra_names = list(axes.extra)
    cells = []
    for entry in section.models:
        model, family, source = model_identity(entry, matrix_file)
        formats = [source["quantization"]] if "quantization" in source else axes.quantization
        combinations = itertools.product(
            section.devices,
            axes.dtype,
            axes.attn_implementation,
            axes.resolution,
            axes.input,
            axes.pixel_budget,
            axes.backend,
            formats,
            axes.placement,
            *axes.extra.values(),
        )
        for device, dtype, attn, resolution, kind, budget, backend, quantized, placed, *extra_values in combinations:
            extra = dict(zip(extra_names, extra_values, strict=True))
            placed = normalize(placed)
            remote = backend in SERVED_BACKENDS and bool(entry.endpoint or entry.webui)
            axes_of_id = (model, REMOTE if remote else device, dtype, attn, resolution, kind, budget, backend)
            reference = quantized if "quantization" in source else quant.NONE
            cell = Cell(
                id=_cell_id(*axes_of_id, quantized, placed, extra),
                model=model,
                family=family,
                source=source,
                device=device,
                dtype=dtype,
                attn_implementation=attn,
                resolution=resolution,
                input=kind,
                min_pixels=budget.min_pixels if budget else None,
                max_pixels=budget.max_pixels if budget else None,
                backend=backend,
                placement=placed,
                quantization=quantized,
                extra=extra,
                budget=budgets.get(device, budgets.get("default")),
                prompt=defaults.prompt,
                max_new_tokens=defaults.max_new_tokens,
                timeout_s=defaults.timeout_s,
                load_timeout_s=defaults.load_timeout_s,
                repeats=defaults.repeats,
                images=defaults.images,
                image=defaults.image,
                drift_max_abs_diff=_drift_bound(defaults, dtype, quantized, prequantized="quantization" in source),
                drift_top1=defaults.drift_top1,
                drift_top_k=defaults.drift_top_k,
                degenerate_check=defaults.degenerate_check,
                matrix_file=matrix_file,
                serving=serving(entry, matrix_file, backend) if backend in SERVED_BACKENDS else None,
                single_twin=None if placed == "single" else _cell_id(*axes_of_id, quantized, "single", extra),
                float32_twin=_cell_id(model, axes_of_id[1], "float32", *axes_of_id[3:], reference, placed, extra),
            )
            values = cell.axis_values()
            if _first_rule(exclude, values):
                continue
            rule = _first_rule(expect, values)
            if rule is not None:
                cell.expectation = _expectation(rule)
            fault = _first_rule(matrix.faults, values)
            cell.fault = fault.inject if fault else None
            cells.append(cell)
    return cells


def _check_model_ids(matrix: Matrix, matrix_file: str) -> None:
    """Two different models must not share an id: their cells would silently merge into one."""
    owners: dict[str, tuple[str, dict]] = {}
    top = 1 if matrix.models else 0  # all_sections() puts the top-level models first
    for s, section in enumerate(matrix.all_sections()):
        for m, entry in enumerate(section.models):
            model, _, source = model_identity(entry, matrix_file)
            where = f"models[{m}]" if s < top else f"sections[{s - top}].models[{m}]"
            if model in owners and owners[model][1] != source:
                first = next(iter(owners[model][1].values()))
                raise UserError(
                    f"two models get the id '{model}': '{first}' ({owners[model][0]}) and "
                    f"'{next(iter(source.values()))}' ({where}); their cells would merge into one.",
                    file=matrix_file,
                    key=f"{where}.id",
                    fix="give one of them (or both) an explicit `id:`.",
                )
            owners.setdefault(model, (where, source))


MAX_CELLS = 200_000  # a matrix past this is a mistake (an axis multiplied by accident), not a run


def _section_name(matrix: Matrix, index: int) -> str:
    top = 1 if matrix.models else 0  # all_sections() puts the top-level models first
    return "the top-level models" if index < top else f"sections[{index - top}]"


def _product_size(section: Section) -> int:
    """How many cells a section's product has before `exclude`: known without building one."""
    a = section.axes
    size = len(section.models) * len(section.devices)
    for values in (a.dtype, a.attn_implementation, a.resolution, a.input, a.pixel_budget, a.backend, a.placement):
        size *= len(values)
    return math.prod((len(v) for v in a.extra.values()), start=size)


def _differences(a: Cell, b: Cell) -> list[str]:
    da, db = a.definition(), b.definition()
    return [k for k in da if da[k] != db[k]] + (["expect"] if a.expectation != b.expectation else [])


def expand(matrix: Matrix, matrix_file: str) -> list[Cell]:
    """All cells of a matrix in matrix order. A cell that two sections define the same way is one cell;
    one id with two definitions (another budget, prompt or server) is a matrix error naming both, since
    keeping either would silently drop the other. Fails on a matrix with none, or with too many."""
    _check_model_ids(matrix, matrix_file)
    planned = sum(_product_size(section) for section in matrix.all_sections())
    if planned > MAX_CELLS:
        raise UserError(
            f"the matrix would expand to {planned:,} cells (models x devices x every axis), more than {MAX_CELLS:,}.",
            file=matrix_file,
            key="axes",
            fix="split it into several matrices, or narrow an axis (a list multiplied by accident?).",
        )
    seen: dict[str, tuple[Cell, int]] = {}
    for s, section in enumerate(matrix.all_sections()):
        for cell in _section_cells(matrix, section, matrix_file):
            first = seen.setdefault(cell.id, (cell, s))
            if first[0] is not cell and _differences(first[0], cell):
                where = _section_name(matrix, first[1]), _section_name(matrix, s)
                raise UserError(
                    f"the cell '{cell.id}' is defined twice, differently: by {where[0]} and by {where[1]} "
                    f"(they differ in {', '.join(_differences(first[0], cell))}); one of them would never run.",
                    file=matrix_file,
                    key="sections" if where[0] != where[1] else "models",
                    fix="give the models distinct `id:`s (one per server or set-up), or give one of the sections "
                    "another device or axis value, so that each cell has one definition.",
                )
    if not seen:
        raise UserError(
            "the matrix expands to zero cells (every combination is excluded).",
            file=matrix_file,
            key="exclude",
            fix="loosen the `exclude` rules or add models, devices or axis values.",
        )
    return [cell for cell, _ in seen.values()]


def run_order(cells: list[Cell]) -> list[Cell]:
    """Cells sharing a loaded model run together (a group's attentions one after another, switched on it);
    float32 before reduced dtypes and the unquantized model before its quantized forms (drift compares to the
    float32 unquantized cell), in-process before served (a served cell is compared with its in-process twin) and
    `single` before other placements (slowdown compares to it)."""
    first_seen = {}
    for i, cell in enumerate(cells):
        first_seen.setdefault(cell.model, i)
    return sorted(
        cells,
        key=lambda c: (
            first_seen[c.model],
            DTYPE_ORDER[c.dtype],
            c.quantization != quant.NONE and not c.prequantized,
            c.quantization,
            c.backend != "transformers",
            c.backend,
            c.load_attention,
            c.placement != "single",
            c.placement_id,
            c.attn_implementation,
        ),
    )


def on_host(cells: list[Cell], host_key: str) -> list[Cell]:
    """The cells as this host runs them: a family's cells become cells of the host's own size (its memory,
    its budgets, its reports folder), keeping their ids."""
    return [
        dataclasses.replace(c, device=host_key) if c.device != host_key and covers(c.device, host_key) else c
        for c in cells
    ]
