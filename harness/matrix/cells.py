"""Expand a matrix into cells: one cell per model x device x axis combination, with a readable id.

Pure data (no torch): the pytest process expands thousands of cells at collection time.
"""

from __future__ import annotations

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
from harness.matrix.launch import TEMPLATE_NAMES, check_command
from harness.matrix.placement import cell_id_part, normalize
from harness.matrix.schema import AXIS_FIELDS, ExpectRule, Launch, Matrix, ModelEntry, Rule, Section
from harness.models.architectures import shipped, shipped_family
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
    serving: dict | None = None  # backend openai: how the server is reached (backends.openai.Target's fields)
    single_twin: str | None = None  # the id of the same cell with `single` placement (what slowdown compares to)

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
        """Cells that run on one xdist worker: a model's placements together, so each can compare to `single`."""
        return f"{self.model}/{self.dtype}/{self.load_attention}/{self.backend}"

    @property
    def group(self) -> str:
        """Cells sharing a loaded model: model, dtype, backend, placement and (unless switched on the loaded
        model) attention implementation."""
        return self.xdist_group + ("" if self.placement == "single" else f"/{self.placement_id}")

    @property
    def drift_twin(self) -> str:
        """The id of the same cell in float32 (what drift is measured against)."""
        return self.id.replace(f"-{self.dtype}-", "-float32-", 1)

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
    plain = urlsplit(name).path if "://" in name else name  # a URL's credentials and query never name a cell
    short = re.sub(r"-instruct$", "", _slug(Path(plain).name if kind == "path" else plain.split("/")[-1]))
    if not short:  # a name of non-ASCII characters only: stable, and not empty
        short = f"{kind}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
    return entry.id or short, family, {kind: name, **({"seed": entry.seed} if kind == "arch" or entry.seed else {})}


def _cell_id(
    model: str,
    device: str,
    dtype: str,
    attn: str,
    resolution: str,
    kind: str,
    budget,
    backend: str,
    placement,
    extra: dict,
) -> str:
    parts = [model, device, dtype, attn, resolution]
    if kind != "image":
        parts.append(kind)
    if budget is not None:
        parts += [f"min{budget.min_pixels}px"] if budget.min_pixels else []
        parts += [f"max{budget.max_pixels}px"] if budget.max_pixels else []
    if backend != "transformers":
        parts.append(backend)
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


def serving(entry: ModelEntry, matrix_file: str) -> dict:
    """How a model's `backend: openai` cells reach their server (the fields of backends.openai.Target)."""
    if not (entry.endpoint or entry.launch):
        name = entry.tiny or entry.arch or entry.hub or entry.path
        raise UserError(
            f"model '{name}' has `backend: openai` cells but no server to send them to.",
            file=matrix_file,
            key="models.endpoint",
            fix="give the model `endpoint: http://host:port/v1` (a running server), or `launch:` a template "
            "(transformers-serve, vllm, sglang, lmdeploy) or a command with {model} and {port}.",
        )
    launch = Launch(command=entry.launch) if isinstance(entry.launch, str) else entry.launch
    if launch:
        if launch.command not in TEMPLATE_NAMES:
            check_command(launch.command, matrix_file)
    return {
        "endpoint": entry.endpoint,
        "api_key_env": entry.api_key_env,
        "model_name": entry.served_model,
        "matrix_file": matrix_file,
        **({"launch": launch.command, **launch.model_dump(exclude={"command"})} if launch else {}),
    }


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
        for device, dtype, attn, resolution, kind, budget, backend, placed, *extra_values in itertools.product(
            section.devices,
            axes.dtype,
            axes.attn_implementation,
            axes.resolution,
            axes.input,
            axes.pixel_budget,
            axes.backend,
            axes.placement,
            *axes.extra.values(),
        ):
            extra = dict(zip(extra_names, extra_values, strict=True))
            placed = normalize(placed)
            axes_of_id = (model, device, dtype, attn, resolution, kind, budget, backend)
            cell = Cell(
                id=_cell_id(*axes_of_id, placed, extra),
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
                extra=extra,
                budget=budgets.get(device, budgets.get("default")),
                prompt=defaults.prompt,
                max_new_tokens=defaults.max_new_tokens,
                timeout_s=defaults.timeout_s,
                load_timeout_s=defaults.load_timeout_s,
                repeats=defaults.repeats,
                images=defaults.images,
                image=defaults.image,
                drift_max_abs_diff=defaults.drift_max_abs_diff,
                drift_top1=defaults.drift_top1,
                drift_top_k=defaults.drift_top_k,
                degenerate_check=defaults.degenerate_check,
                matrix_file=matrix_file,
                serving=serving(entry, matrix_file) if backend == "openai" else None,
                single_twin=None if placed == "single" else _cell_id(*axes_of_id, "single", extra),
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
    float32 before reduced dtypes (drift compares to it), in-process before served (a served cell is compared
    with its in-process twin) and `single` before other placements (slowdown compares to it)."""
    first_seen = {}
    for i, cell in enumerate(cells):
        first_seen.setdefault(cell.model, i)
    return sorted(
        cells,
        key=lambda c: (
            first_seen[c.model],
            DTYPE_ORDER[c.dtype],
            c.backend != "transformers",
            c.backend,
            c.load_attention,
            c.placement != "single",
            c.placement_id,
            c.attn_implementation,
        ),
    )
