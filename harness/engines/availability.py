"""Whether a launched server's engine can run a cell here, known before anything starts."""

from __future__ import annotations

from harness.engines.docker import DockerRun
from harness.engines.templates import MIN_CONTEXT, TEMPLATES, EngineMissing, Unsupported, launch_args, user_command
from harness.matrix.capabilities import installed
from harness.matrix.cells import Cell, Expectation
from harness.matrix.gpus import table
from harness.matrix.launch import DOCKER


def serving_expectation(cell: Cell) -> Expectation | None:
    """A launched server's engine must be installed and able to run the cell's axes; the server's card
    and attention kernels are the engine's business, so the in-process rules do not apply. A WebUI is
    driven through gradio_client, which must be installed too."""
    serving = cell.serving or {}
    if cell.backend == "gradio" and not installed("gradio_client"):
        return Expectation(
            "skip",
            ["missing-package"],
            "backend gradio drives the app with gradio_client, which is not installed here: "
            "pip install 'qwen-compat[webui]'",
            source="capability",
        )
    launch = serving.get("launch")
    if not launch:
        return None
    split = tensor_parallel_expectation(cell)
    if split is not None:
        return split

    try:  # what an engine refuses depends on dtype and attention, never on the context length
        args = launch_args(cell, "MODEL", host="127.0.0.1", port=0, max_model_len=MIN_CONTEXT)
        if launch == DOCKER:
            DockerRun.of(serving).check_installed()
        elif launch in TEMPLATES:
            TEMPLATES[launch].check_installed()
            TEMPLATES[launch].argv(args)
        else:
            user_command(launch, args, cell.matrix_file)
    except EngineMissing as exc:
        return Expectation("skip", ["missing-package"], str(exc), source="capability")
    except Unsupported as exc:
        return Expectation("skip", ["other"], f"{launch}: {exc}", source="capability")
    return None


def tensor_parallel_expectation(cell: Cell) -> Expectation | None:
    """A quantized model the launched engine will refuse at its tensor-parallel degree, known from the config alone
    (harness/plan/quantized.py), before a server is started."""
    serving = cell.serving or {}
    tp = serving.get("tensor_parallel_size", 1)
    if cell.quantization == "none" or tp <= 1:
        return None
    from harness.plan.memory import config_for
    from harness.plan.quantized import tensor_parallel_refusal

    refusal = tensor_parallel_refusal(
        config_for(cell), cell.quantization, tp, engine=serving["launch"], gpu_sm=table()[cell.device].sm
    )
    if refusal is None:
        return None
    return Expectation(
        "xfail",
        ["dtype-unsupported"],
        f"{serving['launch']} will refuse {cell.quantization} at tensor_parallel_size {tp}: {refusal}",
        source="capability",
    )
