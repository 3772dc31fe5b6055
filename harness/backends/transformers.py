"""The in-process backend: transformers' `from_pretrained` and `generate` inside the worker.

Keeps the current group's model (model, dtype, attention) loaded and releases it before another
group's; checks the memory plan before loading (a cell predicted over its card is skipped), then
measures each cell's generation: memory, visual tokens, timings and drift against float32.
"""

from __future__ import annotations

import os
import sys
import time

from .. import inputs
from ..cells import Cell
from . import RunContext


def _fault_action(fault, model):
    """A callable that injects the matrix's fault inside inference, as a real failure would."""
    if fault is None:
        return None

    def inject():
        import ctypes

        import torch

        if isinstance(fault, dict):
            raise RuntimeError(fault["raise"])
        if fault == "segfault":
            ctypes.string_at(0)
        elif fault == "abort":
            os.abort()
        elif fault == "hang":
            while True:
                time.sleep(1)
        elif fault == "oom":
            torch.empty(2**50, dtype=torch.uint8, device=model.device)

    return inject


class TransformersBackend:
    """Today's in-process path: the group's model loaded in this worker, each cell generated on it."""

    def __init__(self):
        from ..measurements import GpuMemory

        self.group = None
        self.processor = self.model = None
        self.identity: dict = {}
        self.gpu = GpuMemory()  # before any CUDA context: what the device used without this worker
        self.cuda = None

    def stop(self) -> None:
        """Release the loaded model (before another group's model, or a server, takes the memory)."""
        import gc

        self.processor = self.model = None
        self.group = None
        if self.cuda:  # on the CPU, reference counting already returned the memory
            gc.collect()
            self.cuda.empty_cache()

    def device(self) -> str:
        import torch

        if torch.cuda.is_available() and self.cuda is None:
            from ..measurements import TorchCuda

            self.cuda = TorchCuda()
            self.gpu.attach(self.cuda)  # creates the CUDA context and measures it
        return "cuda" if self.cuda else "cpu"

    def load(self, cell: Cell, emit) -> float:
        """Load the cell's group's model unless it is loaded; the seconds it took (0 when it was)."""
        from .. import inference
        from ..checkpoints import checkpoint_for, model_identity, weights_seed

        if self.group == cell.group:
            return 0.0
        self.stop()
        emit({"event": "loading", "group": cell.group})
        t0 = time.perf_counter()
        folder = checkpoint_for(cell.source)
        self.processor, self.model = inference.load(
            folder,
            source=cell.source,
            dtype=cell.dtype,
            attn_implementation=cell.attn_implementation,
            device=self.device(),
            weights_seed=weights_seed(cell.source, folder),
        )
        self.identity = model_identity(cell.source, folder)
        self.group = cell.group
        emit({"event": "loaded", "group": cell.group})
        return time.perf_counter() - t0

    def card_mib(self, emulate: str | None) -> float | None:
        """Physical memory of the card cells run on: the emulated card's, or this GPU's; None on the CPU."""
        from ..gpus import table

        if emulate:
            return table()[emulate].memory_mib
        if self.cuda:
            return self.cuda.cuda.get_device_properties(0).total_memory / 2**20
        return None

    def run(self, cell: Cell, context: RunContext) -> dict:
        from .. import inference
        from ..health import drift, reference_key
        from ..measurements import MemoryTracker

        emulate = context.emulate

        kind = self.device()
        if emulate:
            from ..emulation import apply_memory_cap

            apply_memory_cap(emulate, self.gpu.context_mib)
        if cell.device != "cpu" and kind == "cpu":
            from ..errors import UserError

            raise UserError(
                f"cell targets {cell.device}, but torch sees no CUDA GPU on this host.",
                key="--compat-device",
                fix="run with --compat-device auto, or on the card the cell targets (check CUDA_VISIBLE_DEVICES).",
            )
        before = _predict(cell, device_kind=kind)
        card = self.card_mib(emulate)
        if before and card and before.predicted_peak_mib > card and not context.run_predicted_oom:
            p = before.parts
            return {
                "ok": False,
                "prediction": before.to_dict(),
                "skipped": f"predicted peak {before.predicted_peak_mib:.0f} MiB exceeds the card's {card:.0f} MiB "
                f"(weights {p['weights_mib']:.0f}, KV cache {p['kv_cache_mib']:.0f}, vision activations "
                f"{p['vision_activations_mib']:.0f}, overhead {p['overhead_mib']:.0f} MiB); "
                f"--compat-run-predicted-oom runs it anyway",
            }
        load_s = self.load(cell, context.emit)
        spec = inference.CellInput(
            kind=cell.input,
            width=cell.width,
            height=cell.height,
            count=cell.images,
            min_pixels=cell.min_pixels,
            max_pixels=cell.max_pixels,
            prompt=cell.prompt,
            **inputs.image_source(cell.image),
        )
        prepared = inference.prepare(self.processor, self.model, spec)  # inputs are not the cell's memory
        with MemoryTracker(kind, self.gpu, self.cuda) as tracker:
            gen = inference.run(
                self.processor,
                self.model,
                prepared,
                max_new_tokens=cell.max_new_tokens,
                repeats=cell.repeats,
                fault=_fault_action(cell.fault, self.model),
            )
        measurements = {
            **tracker.result,
            "visual_tokens": gen.visual_tokens,
            "input_tokens": gen.input_tokens,
            "load_s": round(load_s, 4),
            "preprocess_s": round(gen.preprocess_s, 4),
            "prefill_s": round(gen.prefill_s, 4),
            "decode_tokens_per_s": round(gen.decode_tokens_per_s, 2) if gen.decode_tokens_per_s else None,
            **({"latency": gen.latency} if gen.latency else {}),
            **drift(cell, gen.first_logits, context.reference_dir, reference_key(cell, self.identity)),
        }
        generation = {"new_token_ids": gen.new_token_ids, "text": gen.text, "nonfinite_steps": gen.nonfinite_steps}
        if cell.backend == "transformers":
            from .. import agreement

            agreement.save(cell, gen.text, context.reference_dir)  # for the served twin, if the matrix has one
        after = _predict(
            cell, text_tokens=gen.input_tokens - gen.visual_tokens, visual_tokens=gen.visual_tokens, device_kind=kind
        )
        prediction = after.to_dict() if after else {}
        return {"ok": True, "generation": generation, "measurements": measurements, "prediction": prediction}


def _predict(cell: Cell, **kwargs):
    """The memory plan of a cell, or None when its config defeats the planner: a plan is advice, and
    a model the planner does not understand must still run."""
    from .. import plan

    try:
        return plan.predict(cell, **kwargs)
    except Exception as exc:  # noqa: BLE001
        print(f"qwen-compat: no memory plan for {cell.id}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None
