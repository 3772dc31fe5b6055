"""Seeded weights: values that depend on (model identity, parameter name) only, so that every load of a
true-size `arch:` model, on any machine and in any dtype, holds the same numbers without a download.

Both the worker's load and the folder written for disk offload fill parameters from here."""

from __future__ import annotations

import hashlib
import math

import torch

SEED_CHUNK = 1 << 22  # elements drawn per generator seed: the values do not depend on how a tensor is split


def _chunk_seed(identity: str, name: str, chunk: int) -> int:
    digest = hashlib.sha256(f"{identity}\0{name}\0{chunk}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def seed_std(config) -> float:
    return getattr(config, "initializer_range", None) or getattr(config.get_text_config(), "initializer_range", 0.02)


@torch.no_grad()
def seed_parameter(param: torch.Tensor, identity: str, name: str, *, std: float, norm: bool) -> None:
    """Fill one parameter with the values (identity, name) give it: see `seed_weights`."""
    if name.rpartition(".")[2] == "bias":
        param.zero_()
    elif norm:
        param.fill_(1.0)
    else:
        half_width = std * math.sqrt(3)
        flat = param.view(-1)
        for chunk, start in enumerate(range(0, flat.numel(), SEED_CHUNK)):
            end = min(start + SEED_CHUNK, flat.numel())
            generator = torch.Generator().manual_seed(_chunk_seed(identity, name, chunk))
            values = torch.rand(end - start, generator=generator).mul_(2 * half_width).sub_(half_width)
            flat[start:end].copy_(values.to(param.dtype))


def seeded_parameters(model):
    """(name, parameter, is a norm weight) in the order `seed_weights` fills them; a tied weight comes once per
    name that holds it, the last one seen giving its values."""
    for module_name, module in model.named_modules():
        norm = "norm" in type(module).__name__.lower()
        for param_name, param in module.named_parameters(recurse=False):
            yield (f"{module_name}.{param_name}" if module_name else param_name), param, norm


@torch.no_grad()
def seed_weights(model, identity: str) -> None:
    """Give every parameter values that depend on (identity, parameter name) only.

    Drawn in float32 on the CPU a chunk at a time (the same numbers on every machine, never a float32
    copy of the whole model), cast to the parameter's dtype and copied to its device: a bfloat16 load
    equals the float32 load cast to bfloat16. Norm weights are ones and biases zeros, as transformers
    initialises them; other weights are uniform with the config's `initializer_range` as std.
    """
    std = seed_std(model.config)
    for name, param, norm in seeded_parameters(model):
        seed_parameter(param, identity, name, std=std, norm=norm)
