"""Whether a launched server's engine can run a cell here, known before anything starts."""

from __future__ import annotations

from harness.engines.templates import MIN_CONTEXT, TEMPLATES, EngineMissing, Unsupported, launch_args, user_command
from harness.matrix.cells import Cell, Expectation


def serving_expectation(cell: Cell) -> Expectation | None:
    """A launched server's engine must be installed and able to run the cell's axes; the server's card
    and attention kernels are the engine's business, so the in-process rules do not apply."""
    launch = (cell.serving or {}).get("launch")
    if not launch:
        return None

    try:  # what an engine refuses depends on dtype and attention, never on the context length
        args = launch_args(cell, "MODEL", host="127.0.0.1", port=0, max_model_len=MIN_CONTEXT)
        if launch in TEMPLATES:
            TEMPLATES[launch].check_installed()
            TEMPLATES[launch].argv(args)
        else:
            user_command(launch, args, cell.matrix_file)
    except EngineMissing as exc:
        return Expectation("skip", ["missing-package"], str(exc), source="capability")
    except Unsupported as exc:
        return Expectation("skip", ["other"], f"{launch}: {exc}", source="capability")
    return None
