"""Matrix files: YAML read with a safe loader, validated by a pydantic schema, errors as one paragraph.

A matrix declares models x devices x axes (dtype, attention, resolution, input, pixel budget,
backend, and user axes), per-device memory budgets, `expect` / `exclude` rules keyed by
selectors, `faults` for testing the harness itself, and per-cell `defaults`.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    model_validator,
)

from harness.errors import UserError
from harness.matrix.gpus import table
from harness.matrix.placement import PlacementValue
from harness.matrix.quantization import check as check_quantization
from harness.models.families import FAMILIES

Outcome = Literal["pass", "xfail", "skip"]
CATEGORIES = [
    "kernel-launch",
    "out-of-memory",
    "dtype-unsupported",
    "attention-backend-unsupported",
    "numerical",
    "missing-package",
    "driver-or-arch",
    "input-mismatch",
    "timeout",
    "crash",
    "version-skew",
    "over-budget",
    "wrong-answer",
    "other",
]
Category = Literal[tuple(CATEGORIES)]  # type: ignore[valid-type]


PIXELS_PATTERN = r"^\s*\d+(\s*\*\s*\d+)*\s*$"


def _pixels(value: Any) -> Any:
    """Accept `800*28*28` as written in Qwen's docs, as well as a plain integer."""
    if isinstance(value, str) and re.fullmatch(PIXELS_PATTERN, value):
        product = 1
        for factor in value.split("*"):
            product *= int(factor)
        return product
    return value


Pixels = Annotated[
    int,
    BeforeValidator(_pixels),
    WithJsonSchema(
        {
            "anyOf": [{"type": "integer"}, {"type": "string", "pattern": PIXELS_PATTERN}],
            "description": "pixels (an area), e.g. 627200 or 800*28*28",
        }
    ),
]
MAX_ASPECT_RATIO = 200  # Qwen's smart_resize rejects a longer side over 200 times the shorter
# The harness builds each picture in memory before the processor resizes it to its pixel budget: beyond this a
# picture tests nothing but the runner's memory (16384x16384, 2**28 pixels, is 768 MiB of RGB before any model runs).
MAX_SIDE = 16384


def _resolution(value: Any) -> Any:
    """WIDTHxHEIGHT with both sides at least 1 and an aspect ratio Qwen's processors accept.

    YAML reads an unquoted `0x0` (or `0x1F`) as a hexadecimal number: that is a resolution too.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        raise ValueError(
            f"a resolution is WIDTHxHEIGHT, e.g. 448x448 (YAML read this one as the number {value}: an "
            "unquoted 0x.. is hexadecimal); both sides must be at least 1 pixel"
        )
    if isinstance(value, str) and re.fullmatch(r"\d+x\d+", value):
        width, height = (int(side) for side in value.split("x"))
        if width < 1 or height < 1:
            raise ValueError(f"resolution {value}: both sides must be at least 1 pixel, e.g. 448x448")
        if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
            raise ValueError(f"resolution {value}: Qwen-VL processors reject an aspect ratio over {MAX_ASPECT_RATIO}")
        if max(width, height) > MAX_SIDE:
            raise ValueError(
                f"resolution {value} is larger than the harness builds: at most {MAX_SIDE} pixels a side; the "
                "processor resizes every picture to its max_pixels anyway, so a larger one tests only the runner's "
                "memory. Use e.g. 3840x2160, and max_pixels for the pixel budget"
            )
    return value


Resolution = Annotated[
    str,
    BeforeValidator(_resolution),
    Field(pattern=r"^\d+x\d+$", description="WIDTHxHEIGHT in pixels, e.g. 1024x1024"),
]


WEEK_S = 7 * 24 * 3600  # no limit a cell may wait is longer; 1e400 is a typo, not a limit


class Strict(BaseModel):
    # `.nan` and `.inf` are YAML floats, never a bound a check can use
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Launch(Strict):
    """A server the harness starts for each group of a model's served cells (`backend: openai` or `gradio`)."""

    command: str = Field(
        ...,
        description="a template (transformers-serve, vllm, sglang, lmdeploy; docker for a WebUI image) or a "
        "command of your own with placeholders {model} {dtype} {attn} {host} {port} {device} {max_model_len} "
        "{max_images} {max_videos} {min_pixels} {max_pixels} {gpu_memory_utilization} {tensor_parallel_size}",
    )
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="fraction of the card the engine may take")
    tensor_parallel_size: int = Field(1, ge=1)
    startup_timeout_s: float = Field(600, gt=0, le=WEEK_S, description="until the server's readiness route answers")
    image: str | None = Field(
        None, description="command docker: the image to run, e.g. ghcr.io/acme/qwen3-vl-webui:1.4"
    )
    port: int = Field(7860, ge=1, le=65535, description="command docker: the port the app listens on in the container")
    shm_size: str = Field(
        "16g",
        pattern=r"^\d+(\.\d+)?[kKmMgGtTpP]?[iI]?[bB]?$",  # what docker's size parser (go-units) takes: 16g, 16gb, 16GiB
        description="command docker: --shm-size",
    )
    env: dict[str, str] = Field(
        {"MODEL": "{model}", "DTYPE": "{dtype}"},
        description="command docker: -e NAME=VALUE for the image, values with {placeholders}",
    )
    args: str | None = Field(None, description="command docker: the image's command and arguments, with {placeholders}")

    @model_validator(mode="after")
    def _image_with_docker(self):
        if (self.command == "docker") != bool(self.image):
            raise ValueError(
                "`launch: {command: docker}` needs `image:`, and `image:` belongs to the docker command only"
            )
        return self


class Step(Strict):
    """One thing a person does on a WebUI: upload the cell's pictures, send its prompt, read the answer
    (each the name of the app's endpoint that does it, e.g. /add_file), or `call` another endpoint."""

    upload: str | None = Field(None, description="the endpoint that takes the pictures, e.g. /add_file")
    text: str | None = Field(None, description="the endpoint that takes the prompt, e.g. /add_text")
    answer: str | None = Field(None, description="the endpoint whose output is the answer, e.g. /predict")
    call: str | None = Field(None, description="another endpoint to call at this point, e.g. /load_model")
    with_: dict[str, Any] = Field({}, alias="with", description="values for the endpoint's other parameters, by name")

    @model_validator(mode="after")
    def _one_endpoint(self):
        named = {v for v in (self.upload, self.text, self.answer, self.call) if v}
        if len(named) != 1 or (self.call and (self.upload or self.text or self.answer)):
            raise ValueError(
                "a step names one endpoint: with `upload:`, `text:` and `answer:` (one or more, naming the same "
                "endpoint), or with `call:`"
            )
        return self


class ModelEntry(Strict):
    """One model: exactly one of `tiny`, `arch`, `hub`, `path`; for `backend: openai` cells, how its
    server is reached: `endpoint:` (already running) or `launch:` (started by the harness); for
    `backend: gradio` cells, its WebUI: `webui:` (running) or `launch:`, and `steps:` where the
    app's API does not say which endpoint does what."""

    id: str | None = Field(None, description="short name used in cell ids; derived when absent")
    tiny: str | None = Field(None, description="tiny random-weight family: " + ", ".join(FAMILIES))
    variant: str = Field("default", description="tiny checkpoint variant, e.g. fp16-overflow")
    arch: str | None = Field(None, description="true-size architecture shipped with qwen-compat (random weights)")
    hub: str | None = Field(None, description="Hugging Face hub id of a real checkpoint")
    path: str | None = Field(None, description="local folder of a checkpoint")
    family: str | None = Field(None, description="model family when it cannot be read from the source")
    seed: int = Field(0, ge=0, description="arch: models: the random weights are a function of (architecture, seed)")
    endpoint: str | None = Field(
        None,
        pattern=r"^https?://\S+$",
        description="backend openai: base URL of a running OpenAI-compatible server, e.g. http://10.0.0.5:8000/v1",
    )
    api_key_env: str | None = Field(
        None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="backend openai: NAME of the environment variable holding the server's API key "
        "(the key itself is never written to a matrix or a report)",
    )
    launch: str | Launch | None = Field(
        None, description="backend openai: a template name or command (see Launch), started per group"
    )
    served_model: str | None = Field(
        None, description="backend openai: the name the server knows the model by (default: the first it lists)"
    )
    webui: str | None = Field(
        None,
        pattern=r"^https?://\S+$",
        description="backend gradio: URL of a running Gradio app, e.g. http://host:7860/",
    )
    steps: list[Step] | None = Field(
        None,
        description="backend gradio: the app's endpoints in the order a person uses them, e.g. "
        "[{upload: /add_file}, {text: /add_text}, {answer: /predict}] (default: read from the app's API)",
    )
    greedy: bool = Field(
        False,
        description="backend gradio: the app decodes greedily, so its answer is compared with the in-process cell's",
    )
    quantization: Annotated[str, AfterValidator(check_quantization)] | None = Field(
        None,
        description="hub:/path: the format of a pre-quantized checkpoint when neither its config.json nor its name "
        "says (awq, gptq, fp8, ...); its cells run in that format whatever the quantization axis lists",
    )

    @model_validator(mode="after")
    def _one_source(self):
        given = [k for k in ("tiny", "arch", "hub", "path") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(f"a model needs exactly one of tiny, arch, hub, path (got {given or 'none'})")
        if self.endpoint and self.launch:
            raise ValueError("a model is served either from its `endpoint:` or by `launch:`, not both")
        if self.launch == "docker":
            raise ValueError("`launch: docker` needs the image: write `launch: {command: docker, image: IMAGE}`")
        if self.webui and self.launch:
            raise ValueError("a model's WebUI is either running at `webui:` or started by `launch:`, not both")
        if self.tiny and self.tiny not in FAMILIES:
            raise ValueError(f"unknown tiny family '{self.tiny}'; use one of {', '.join(FAMILIES)}")
        return self


class PixelBudget(Strict):
    min_pixels: Pixels | None = None
    max_pixels: Pixels | None = None


class Axes(Strict):
    dtype: list[Literal["float32", "float16", "bfloat16"]] = ["float32"]
    attn_implementation: list[Literal["sdpa", "eager", "flash_attention_2"]] = ["sdpa"]
    resolution: list[Resolution] = ["448x448"]
    input: list[Literal["image", "images", "video"]] = ["image"]
    pixel_budget: list[PixelBudget | None] = Field([None], description="null = the processor's default budget")
    backend: list[Literal["transformers", "openai", "gradio", "vllm"]] = Field(
        ["transformers"],
        description="transformers: in the worker; openai: over the model's `endpoint:` or `launch:` server; "
        "gradio: a conversation with the model's WebUI (`webui:` or `launch:`)",
    )
    placement: list[PlacementValue] = Field(
        ["single"],
        description="where the model lives: single (one device), auto (device_map='auto'), {gpus: N}, "
        "{max_memory: {gpu: 20GiB, cpu: 64GiB}} (accelerate's caps; beyond them, disk), "
        "{offload: [vision, layers:N]} (modules kept on the CPU) or {disk: [...]} (kept on disk)",
    )
    quantization: list[Annotated[str, AfterValidator(check_quantization)]] = Field(
        ["none"],
        description="weight format: none, torchao-int8, torchao-int4, bnb-int8, bnb-nf4, fp8, fp8-block, w4a16, w8a16, "
        "awq, gptq, gguf-q8_0; +vision (e.g. bnb-nf4+vision) quantizes the vision tower too. A pre-quantized "
        "checkpoint's cells take its own format",
    )
    extra: dict[str, list[Union[str, int, float, bool]]] = Field(
        {}, description="user axes: name -> values; they appear in cell ids and selectors"
    )


Budget = Annotated[str, Field(pattern=r"^\s*\d+(\.\d+)?\s*(GiB|MiB|%)\s*$", description="e.g. 14GiB, 900MiB or 90%")]


PIXEL_AXES = ("min_pixels", "max_pixels")


def normalise_selector(when: dict[str, Any]) -> dict[str, Any]:
    """Selector values written as the axes are (`max_pixels: 800*28*28`) compare equal to the cells' values."""
    out = {}
    for axis, wanted in when.items():
        if axis in PIXEL_AXES:
            wanted = [_pixels(v) for v in wanted] if isinstance(wanted, list) else _pixels(wanted)
        out[axis] = wanted
    return out


class Rule(Strict):
    when: Annotated[dict[str, Any], AfterValidator(normalise_selector)] = Field(
        ..., description="axis -> value or list of values; all must match"
    )


class ExpectRule(Rule):
    outcome: Outcome = "pass"
    category: list[Category] | Category | None = None
    reason: str | None = None
    strict: bool = True
    answer: str | None = Field(None, description="regex the generated text must match (real checkpoints)")


class FaultRule(Rule):
    inject: Literal["segfault", "abort", "hang", "oom"] | dict[Literal["raise"], str]


class Claim(Rule):
    """A published memory figure for matching cells, printed beside the plan's prediction."""

    peak_gb: float = Field(..., description="the claimed peak memory in GB")
    source: str = Field(..., description="where the figure was published")


class Defaults(Strict):
    prompt: str = "Describe this image."
    max_new_tokens: int = Field(8, ge=1)
    timeout_s: float = Field(
        300, gt=0, le=WEEK_S, description="seconds of inference a cell may take (its set-up not included)"
    )
    load_timeout_s: float = Field(
        1800, gt=0, le=WEEK_S, description="seconds a cell's set-up (memory plan, model load) may take"
    )
    repeats: int = Field(
        1,
        ge=1,
        description="timed generations per cell; above 1, one warm-up first and latency kept as median/min/spread",
    )
    images: int = Field(2, ge=2, description="how many images the `images` input kind sends")
    image: str | None = Field(
        None,
        pattern=r"^(rgb\(\d{1,3},\d{1,3},\d{1,3}\)|[^()]+)$",
        description="instead of the synthetic image: a file path, or rgb(R,G,B) for a solid colour at the cell's "
        "resolution (for `answer:` checks on real checkpoints, e.g. rgb(255,0,0) and answer: red)",
    )
    drift_max_abs_diff: float = Field(
        0.25,
        ge=0,
        description="largest first-step |logit - float32 logit| allowed for reduced dtypes, relative to the "
        "float32 logits' largest magnitude",
    )
    drift_top1: bool = Field(
        True, description="reduced dtypes must agree with float32 on the first token (within each other's top-k)"
    )
    drift_top_k: int = Field(5, ge=1, description="a differing first token is accepted when in the other's top-k")
    degenerate_check: bool = Field(True, description="fail when every new token is the same token")


class SectionDefaults(Defaults):
    """A section's own defaults: the keys given override the matrix's `defaults`."""


class Section(Strict):
    name: str | None = None
    defaults: SectionDefaults | None = Field(None, description="per-section overrides of the matrix defaults")
    models: list[ModelEntry]
    devices: list[str] = ["cpu"]
    axes: Axes = Axes()
    budgets: dict[str, Budget] = {}
    expect: list[ExpectRule] = []
    exclude: list[Rule] = []


class Matrix(Strict):
    name: str | None = None
    description: str | None = None
    defaults: Defaults = Defaults()
    models: list[ModelEntry] | None = None
    devices: list[str] = ["cpu"]
    axes: Axes = Axes()
    budgets: dict[str, Budget] = Field({}, description="device key (or 'default') -> peak memory budget")
    expect: list[ExpectRule] = []
    exclude: list[Rule] = []
    faults: list[FaultRule] = []
    claims: list[Claim] = []
    sections: list[Section] = []

    def all_sections(self) -> list[Section]:
        top = []
        if self.models:
            top = [Section(name=self.name, models=self.models, devices=self.devices, axes=self.axes)]
        return top + self.sections


# The fields of a cell that selectors (`when:`) and reports name; user axes come on top.
AXIS_FIELDS = (
    "model",
    "family",
    "device",
    "dtype",
    "attn_implementation",
    "resolution",
    "input",
    "min_pixels",
    "max_pixels",
    "backend",
    "placement",
    "quantization",
)
SELECTOR_AXES = {*AXIS_FIELDS, "variant"}


def schema() -> dict:
    """JSON Schema of matrix files, for editors and CI checks."""
    out = Matrix.model_json_schema()
    out["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    out["title"] = "qwen-compat matrix"
    return out


# --- loading, with errors that name the file, the line, the key and the fix -------------------------


def _line_of(root: yaml.Node | None, loc: tuple) -> int | None:
    node, line = root, None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = [(k, v) for k, v in node.value if k.value == part]
            if not match:
                break
            key, node = match[0]
            line = key.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _field_names(model: type[BaseModel]) -> list[str]:
    return [field.alias or name for name, field in model.model_fields.items()]


def _telling(errors: list[dict]) -> dict:
    """The first error; where it is one branch of a union refusing the value's type (`launch:` given as a
    mapping is not a string), the error of the branch that took the type and refused its content, its
    location without the branch's name."""
    first = errors[0]
    if not first["type"].endswith("_type"):
        return first
    union = len(first["loc"]) - 1  # where a union's errors name their branch
    telling = next(
        (
            e
            for e in errors[1:]
            if e["loc"][:union] == first["loc"][:union]
            and len(e["loc"]) > union
            and e["loc"][union] != first["loc"][union]
            and not e["type"].endswith("_type")
        ),
        None,
    )
    if telling is None:
        return first
    return {**telling, "loc": telling["loc"][:union] + telling["loc"][union + 1 :]}


def _describe(error: dict, path: str, root) -> UserError:
    loc = tuple(p for p in error["loc"] if not (isinstance(p, str) and p.startswith(("function-", "literal["))))
    key = ".".join(str(p) for p in loc) or "(top level)"
    line = _line_of(root, loc)
    where = f"{path}" + (f", line {line}" if line else "")
    if error["type"] == "extra_forbidden":
        parent = _model_at(loc[:-1])
        options = _field_names(parent) if parent else []
        close = difflib.get_close_matches(str(loc[-1]), options, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        return UserError(
            f"unknown key '{loc[-1]}'.", file=where, key=key, fix=f"{hint}allowed keys here: {', '.join(options)}."
        )
    return UserError(
        f"{error['msg']} (got {error.get('input')!r}).",
        file=where,
        key=key,
        fix="correct the value; `qwen-compat schema` prints every key and type.",
    )


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The schema class that holds the key at `loc` (for "did you mean")."""
    model: type[BaseModel] | None = Matrix
    for part in loc:
        if isinstance(part, int) or model is None:
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        model = _inner_model(field.annotation)
    return model


def _inner_model(annotation) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _inner_model(arg)
        if found:
            return found
    return None


MAX_MATRIX_BYTES = 1 << 20  # a hand-written matrix is a few KiB; past 1 MiB it is generated by mistake
MAX_ALIASES = 100  # YAML anchors are for sharing a block, not for multiplying one (a "billion laughs" bomb)


def _duplicate_key(node) -> tuple[str, int] | None:
    """The first mapping key written twice (YAML keeps the last silently), with its line."""
    stack = [node]
    while stack:
        current = stack.pop()
        if isinstance(current, yaml.MappingNode):
            keys = set()
            for key, value in current.value:
                if isinstance(key, yaml.ScalarNode):
                    if key.value in keys:
                        return key.value, key.start_mark.line + 1
                    keys.add(key.value)
                stack.append(value)
        elif isinstance(current, yaml.SequenceNode):
            stack.extend(current.value)
    return None


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise UserError(
            "matrix file not found." if not path.exists() else "the matrix path is not a file.",
            file=str(path),
            fix="pass an existing file with --compat-matrix, e.g. matrices/default.yaml.",
        )
    raw = path.read_bytes()
    if len(raw) > MAX_MATRIX_BYTES:
        raise UserError(
            f"the matrix file is {len(raw):,} bytes; a matrix is at most {MAX_MATRIX_BYTES:,}.",
            file=str(path),
            fix="split it into several matrices; axes multiply, so a short file describes many cells.",
        )
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(
            f"the matrix is not UTF-8 text (byte {exc.start} is 0x{raw[exc.start]:02x}).",
            file=str(path),
            fix="save it as UTF-8 (or check that this is the matrix and not another file).",
        ) from None


def load(path: str | Path) -> Matrix:
    """Read and validate a matrix file; any problem is a UserError naming file, line, key and fix."""
    path = Path(path)
    text = _read_text(path)
    try:
        aliases = sum(isinstance(event, yaml.AliasEvent) for event in yaml.parse(text, Loader=yaml.SafeLoader))
        if aliases > MAX_ALIASES:
            raise UserError(
                f"the matrix uses {aliases} YAML aliases (*name); at most {MAX_ALIASES} are read.",
                file=str(path),
                fix="write the repeated blocks out, or use `sections:` and `defaults:` to share settings.",
            )
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        duplicate = _duplicate_key(root) if root is not None else None
        if duplicate:
            raise UserError(
                f"the key '{duplicate[0]}' is written twice in one mapping; YAML would keep only the last.",
                file=f"{path}, line {duplicate[1]}",
                key=duplicate[0],
                fix="keep one of them (merge their values).",
            )
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(
            f"this is not valid YAML: {problem}.", file=where, fix="check the indentation and quoting around that line."
        ) from None
    if not isinstance(data, dict):
        raise UserError(
            "a matrix must be a YAML mapping with keys such as models, devices, axes.",
            file=str(path),
            fix="see matrices/default.yaml for an example.",
        )
    try:
        matrix = Matrix.model_validate(data)
    except ValidationError as exc:
        raise _describe(_telling(exc.errors()), str(path), root) from None
    _check_references(matrix, path, root)
    return matrix


def _check_references(matrix: Matrix, path: Path, root) -> None:
    """What the schema cannot see: device keys, selector axes, at least one model."""
    if not matrix.all_sections():
        raise UserError(
            "the matrix declares no models.",
            file=str(path),
            key="models",
            fix="add a `models:` list (or `sections:` with models), e.g. `- tiny: qwen2_vl`.",
        )
    devices = set(table())
    device_lists = [("devices", matrix.devices)] + [
        (f"sections.{i}.devices", s.devices) for i, s in enumerate(matrix.sections)
    ]
    for where, listed in device_lists:
        for i, device in enumerate(listed):
            if device not in devices:
                loc = tuple(int(p) if p.isdigit() else p for p in where.split(".")) + (i,)
                close = difflib.get_close_matches(device.lower(), devices, n=1)
                hint = f"did you mean '{close[0]}'? " if close else ""
                line = _line_of(root, loc)
                raise UserError(
                    f"unknown device '{device}'.",
                    file=f"{path}" + (f", line {line}" if line else ""),
                    key=where,
                    fix=f"{hint}devices are GPU table keys: {', '.join(sorted(devices))}; "
                    f"a new card is one row in harness/data/gpus.yaml.",
                )
    extra_axes = set(matrix.axes.extra) | {k for s in matrix.sections for k in s.axes.extra}
    known = SELECTOR_AXES | extra_axes
    rule_lists = [
        ("expect", matrix.expect),
        ("exclude", matrix.exclude),
        ("faults", matrix.faults),
        ("claims", matrix.claims),
    ] + [
        (f"sections.{i}.{kind}", getattr(s, kind))
        for i, s in enumerate(matrix.sections)
        for kind in ("expect", "exclude")
    ]
    for where, rules in rule_lists:
        for i, rule in enumerate(rules):
            for axis in rule.when:
                if axis not in known:
                    close = difflib.get_close_matches(axis, known, n=1)
                    hint = f"did you mean '{close[0]}'? " if close else ""
                    loc = tuple(int(p) if p.isdigit() else p for p in where.split(".")) + (i, "when", axis)
                    line = _line_of(root, loc)
                    raise UserError(
                        f"the selector names no axis: '{axis}'.",
                        file=f"{path}" + (f", line {line}" if line else ""),
                        key=f"{where}[{i}].when.{axis}",
                        fix=f"{hint}selectors may use {', '.join(sorted(known))}.",
                    )
