"""The in-process backend: transformers' `from_pretrained` and `generate` inside the worker.

Keeps the current group's model (model, dtype, placement) loaded, switching its attention implementation
between the group's cells, and releases it before another group's; checks the memory plan before loading (a
cell predicted over its card is skipped), then measures each cell's generation: memory, visual tokens, timings
and drift against float32.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time

from harness.matrix import inputs
from harness.matrix.cells import Cell
from harness.run.backends import RunContext


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
            from harness.run.inference import input_device

            torch.empty(2**50, dtype=torch.uint8, device=input_device(model))

    return inject


class TransformersBackend:
    """Today's in-process path: the group's model loaded in this worker, each cell generated on it."""

    def __init__(self):
        from harness.devices.memory import GpuMemory

        self.group = None
        self.processor = self.model = None
        self.attention: str | None = None  # the loaded model's attention implementation now
        self.identity: dict = {}
        self.gpu = GpuMemory()  # reads what others hold on the device when it creates the CUDA context
        self.cuda = None
        self.offload_dir: tempfile.TemporaryDirectory | None = None  # the loaded group's disk offload, if placed
        self.free: dict = {}  # free bytes per device when the loaded group was placed

    def stop(self) -> None:
        """Release the loaded model (before another group's model, or a server, takes the memory)."""
        import gc

        self.processor = self.model = None
        self.group = self.attention = None
        if self.offload_dir:  # a placed group's offloaded weights go with it
            self.offload_dir.cleanup()
            self.offload_dir = None
        if self.cuda:  # on the CPU, reference counting already returned the memory
            gc.collect()
            self.cuda.empty_cache()

    def device(self) -> str:
        import torch

        if torch.cuda.is_available() and self.cuda is None:
            from harness.devices.memory import TorchCuda

            self.cuda = TorchCuda()
            self.gpu.attach(self.cuda)  # creates the CUDA context and measures it
        return "cuda" if self.cuda else "cpu"

    def load(self, cell: Cell, emit) -> float:
        """Load the cell's group's model unless it is loaded (then switch its attention to the cell's); the
        seconds a load took (0 when there was none)."""
        from harness.models.checkpoints import checkpoint_for, model_identity, weights_seed
        from harness.run import inference

        if self.group == cell.group and self.attention == cell.attn_implementation:
            return 0.0
        if self.group == cell.group and inference.switch_attention(self.model, cell.attn_implementation):
            self.attention = cell.attn_implementation
            return 0.0
        self.stop()
        emit({"event": "loading", "group": cell.group})
        t0 = time.perf_counter()
        placed = cell.placement != "single"
        quantizing = cell.quantization != "none" and not cell.prequantized
        # A placed `arch:` model reads its seeded weights from files: offloaded modules are filled from them; so does
        # one quantized at load (the quantizer packs the weights it reads).
        folder = checkpoint_for(cell.source, dtype=cell.dtype, with_weights=placed or quantizing)
        unquantized = folder
        folder, quantization_kwargs = _quantized_folder(cell, folder) if quantizing else (folder, {})
        if cell.prequantized and "path" in cell.source:
            from harness.matrix.quantization import check_path_checkpoint

            check_path_checkpoint(folder, cell.quantization)
        self.processor, self.model = inference.load(
            folder,
            source=cell.source,
            dtype=cell.dtype,
            attn_implementation=cell.attn_implementation,
            device=self.device(),
            weights_seed=weights_seed(cell.source, folder),
            placement_kwargs=self.placement_kwargs(cell) if placed else None,
            quantization_kwargs=quantization_kwargs,
        )
        # A quantized model is the same model as its float32 twin: drift is keyed by the unquantized checkpoint.
        self.identity = model_identity(cell.source, checkpoint_for(cell.source) if quantizing else unquantized)
        self.group, self.attention = cell.group, cell.attn_implementation
        emit({"event": "loaded", "group": cell.group})
        return time.perf_counter() - t0

    def free_memory(self) -> dict:
        """Free bytes of each visible GPU (by index) and the host's available RAM (`cpu`): what placements see."""
        import psutil

        free: dict = {"cpu": psutil.virtual_memory().available}
        if self.cuda:
            for index in range(self.cuda.cuda.device_count()):
                free[index] = self.cuda.cuda.mem_get_info(index)[0]
        return free

    def free_before_load(self, cell: Cell) -> dict:
        """What the cell's model was (or will be) placed against: measured at load, not after it."""
        return self.free if self.group == cell.group else self.free_memory()

    def placement_kwargs(self, cell: Cell) -> dict:
        """from_pretrained's device_map / max_memory / offload_folder for the cell's placement; the offload folder
        is this group's and is removed when the group is released."""
        from harness.matrix.placement import from_pretrained_kwargs
        from harness.plan.placement import meta_model

        self.offload_dir = tempfile.TemporaryDirectory(prefix="qwen-compat-offload-")
        self.free = self.free_memory()
        return from_pretrained_kwargs(
            cell.placement,
            meta_model(cell),
            free=self.free,
            offload_folder=self.offload_dir.name,
            file=cell.matrix_file,
        )

    def placement_skip(self, cell: Cell, kind: str) -> str | None:
        """Why a placed cell cannot run in this worker: more GPUs asked for than it sees, or flash-attention-2 with
        modules the plan puts on the CPU or disk."""
        from harness.matrix.placement import gpus_requested

        wanted, seen = gpus_requested(cell.placement), self.cuda.cuda.device_count() if self.cuda else 0
        if wanted and wanted > seen:
            return (
                f"placement {cell.placement_id} asks for {wanted} GPUs, and this worker sees {seen} "
                f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})"
            )
        if cell.attn_implementation == "flash_attention_2":
            planned = _predict_placement(cell, self.free_before_load(cell))
            off = planned and {d for d in planned.device_map.values() if d in ("cpu", "disk")}
            if off and kind != "cpu":
                return (
                    f"flash_attention_2 with modules on {'/'.join(sorted(off))} (placement {cell.placement_id}: "
                    f"{planned.summary}): flash-attn runs on CUDA tensors only; use sdpa or eager"
                )
        return None

    def placement_measurements(self, device_map: dict, peaks: dict, tracked: dict, planned) -> dict:
        """Where the modules landed and the peak on every device used, labelled; the budget applies to the GPUs
        (the host on a CPU-only run), and on several GPUs to the largest of their peaks."""
        from transformers.integrations.accelerate import expand_device_map

        from harness.matrix.placement import device_label
        from harness.plan.placement import summarize

        names = [name for name, _ in self.model.named_parameters()]
        gpus = sorted({d for d in device_map.values() if isinstance(d, int)})
        peaks = {**peaks, **({device_label(gpus[0]): tracked.get("peak_memory_mib")} if gpus else {})}
        budget_devices = [device_label(i) for i in gpus] or ["cpu"]
        sources = {d: "worker_rss" if d == "cpu" else "torch_reserved_plus_context" for d in peaks}
        sources[budget_devices[0]] = tracked.get("peak_memory_source")  # MemoryTracker's method for the first
        out = {
            "device_map": device_map,
            "device_map_summary": summarize(device_map, names),
            "device_map_as_planned": planned is not None
            and expand_device_map(device_map, names) == expand_device_map(planned.device_map, names),
            "peaks_mib": peaks,
            "peak_sources": sources,
            "budget_devices": budget_devices,
        }
        if len(gpus) > 1 and all(peaks.get(d) for d in budget_devices):
            out["peak_memory_mib"] = max(peaks[d] for d in budget_devices)
            out["peak_memory_source"] = "largest GPU peak of " + ", ".join(budget_devices)
        return out

    def card_mib(self, emulate: str | None) -> float | None:
        """Physical memory of the card cells run on: the emulated card's, or this GPU's; None on the CPU."""
        from harness.matrix.gpus import table

        if emulate:
            return table()[emulate].memory_mib
        if self.cuda:
            return self.cuda.cuda.get_device_properties(0).total_memory / 2**20
        return None

    def run(self, cell: Cell, context: RunContext) -> dict:
        from harness.devices.memory import DevicePeaks, MemoryTracker
        from harness.judge.drift import drift, reference_key
        from harness.plan.placement import with_placement
        from harness.run import inference

        emulate = context.emulate

        kind = self.device()
        if emulate:
            from harness.devices.emulation import apply_memory_cap

            apply_memory_cap(emulate, self.gpu.context_mib)
        if cell.device != "cpu" and kind == "cpu":
            from harness.errors import UserError

            raise UserError(
                f"cell targets {cell.device}, but torch sees no CUDA GPU on this host.",
                key="--compat-device",
                fix="run with --compat-device auto, or on the card the cell targets (check CUDA_VISIBLE_DEVICES).",
            )
        # a percentage budget is of the device this worker has (a MIG slice's own), or of the emulated card
        device_mib = self.gpu.device_memory_mib(self.cuda) if self.cuda and not emulate else None
        placed, card = cell.placement != "single", self.card_mib(emulate)
        # the plan before the run decides a skip on a card and a placement; on the CPU it would decide nothing
        before = _predict(cell, device_kind=kind, device_mib=device_mib) if card or placed else None
        if placed:
            why = self.placement_skip(cell, kind)
            if why:
                return {"ok": False, "skipped": why}
            before = with_placement(before, _predict_placement(cell, self.free_before_load(cell)))
        if before and card and before.predicted_peak_mib > card and not context.run_predicted_oom:
            p = before.parts
            remedy = _offload_remedy(cell, card) if not placed else None
            return {
                "ok": False,
                "prediction": before.to_dict(),
                "skipped": f"predicted peak {before.predicted_peak_mib:.0f} MiB exceeds the card's {card:.0f} MiB "
                f"(weights {p['weights_mib']:.0f}, KV cache {p['kv_cache_mib']:.0f}, vision activations "
                f"{p['vision_activations_mib']:.0f}, overhead {p['overhead_mib']:.0f} MiB); "
                + (f"it {remedy[1]}: placement {remedy[0]}; " if remedy else "")
                + "--compat-run-predicted-oom runs it anyway",
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
        context.emit({"event": "cell"})  # the cell's timeout starts here, after the set-up
        prepared = inference.prepare(self.processor, self.model, spec)  # inputs are not the cell's memory
        device_map = dict(getattr(self.model, "hf_device_map", None) or {"": 0 if kind != "cpu" else "cpu"})
        other_gpus = sorted({d for d in device_map.values() if isinstance(d, int)})[1:]
        device_peaks = DevicePeaks(other_gpus, self.gpu.context_mib) if placed else contextlib.nullcontext()
        with device_peaks, MemoryTracker(kind, self.gpu, self.cuda) as tracker:
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
            **({"device_memory_mib": round(device_mib, 1)} if device_mib else {}),
        }
        generation = {"new_token_ids": gen.new_token_ids, "text": gen.text, "nonfinite_steps": gen.nonfinite_steps}
        if cell.backend == "transformers":
            from harness.judge import agreement

            agreement.save(cell, gen.text, context.reference_dir)  # for the served twin, if the matrix has one
        tokens = {"text_tokens": gen.input_tokens - gen.visual_tokens, "visual_tokens": gen.visual_tokens}
        after = _predict(cell, **tokens, device_kind=kind, device_mib=device_mib)
        if placed:
            planned = _predict_placement(cell, self.free, **tokens)
            after = with_placement(after, planned)
            measurements.update(self.placement_measurements(device_map, device_peaks.result, tracker.result, planned))
        prediction = after.to_dict() if after else {}
        return {"ok": True, "generation": generation, "measurements": measurements, "prediction": prediction}


def _quantized_folder(cell: Cell, folder: str) -> tuple[str, dict]:
    """The folder a cell in a format built here loads from (a tiny model's quantized checkpoint, built once), and
    what from_pretrained needs besides (a GGUF file name, or the quantizer of a model quantized at load)."""
    from harness.matrix.quantization import parse
    from harness.models.quantized import load_kwargs, quantized_checkpoint
    from harness.plan.placement import meta_model

    fmt = parse(cell.quantization).format
    if "tiny" in cell.source:
        library = fmt.pip.split()[0]
        folder = str(
            quantized_checkpoint(
                cell.source, cell.quantization, cell.dtype, group_size=fmt.layout.group_size, library=library
            )
        )
    kwargs = load_kwargs(cell.source, cell.quantization, group_size=fmt.layout.group_size, meta_model=meta_model(cell))
    return folder, kwargs


def _predict(cell: Cell, **kwargs):
    """The memory plan of a cell, or None when its config defeats the planner: a plan is advice, and
    a model the planner does not understand must still run."""
    from harness.plan import memory as plan

    try:
        return plan.predict(cell, **kwargs)
    except Exception as exc:  # noqa: BLE001
        print(f"qwen-compat: no memory plan for {cell.id}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None


def _offload_remedy(cell: Cell, card_mib: float):
    """(placement, sentence) that would fit the cell on its card, or None; advice never fails a cell."""
    from harness.plan.placement import offload_remedy

    try:
        return offload_remedy(cell, card_mib)
    except Exception as exc:  # noqa: BLE001
        print(f"qwen-compat: no offload advice for {cell.id}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None


def _predict_placement(cell: Cell, free: dict, **kwargs):
    """The placement plan of a cell (device map and per-device peaks), or None when the planner fails for its
    config; a placement that names no module is the matrix's error and is raised."""
    from harness.errors import UserError
    from harness.plan.placement import predict_placement

    try:
        return predict_placement(cell, cell.placement, free=free, **kwargs)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001
        print(f"qwen-compat: no placement plan for {cell.id}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None
