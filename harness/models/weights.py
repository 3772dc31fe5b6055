"""Seeded weights: values that depend on (model identity, parameter name, element index) only, so that every
load of a true-size `arch:` model, on any machine, device and thread count, and in any dtype, holds the same
numbers without a download.

Each value is a counter-based hash (splitmix64's mix of the element's index and the parameter's key) computed
with exact int64 arithmetic on the parameter's own device: a GPU fills a true-size model at its own speed, and
the CPU gives the same bits. Both the worker's load and the folder written for disk offload fill parameters
from here."""

from __future__ import annotations

import hashlib
import math
from concurrent.futures import ThreadPoolExecutor

import torch

# splitmix64 (Steele, Lea, Flood 2014; the reference code: https://prng.di.unimi.it/splitmix64.c)
GOLDEN = 0x9E3779B97F4A7C15
MIX_1 = 0xBF58476D1CE4E5B9
MIX_2 = 0x94D049BB133111EB
CODE_BITS = 24  # a float32 holds every 24-bit integer exactly
# Elements hashed at a time; the values do not depend on it. On the CPU a chunk is torch's grain size
# (at::internal::GRAIN_SIZE): each op runs on its calling thread, its scratch in that core's cache, and the
# chunks are spread over torch's thread count here, never an intra-op barrier per op (a busy machine stalls
# at each: 6 M values/s instead of 90 M on 2 threads here). On a GPU 2**22 keeps the launches few (16 per 4 M
# values) and the scratch under 100 MB beside a model that may fill the card.
CHUNK = {"cpu": 1 << 15, "other": 1 << 22}


def _int64(constant: int) -> int:
    """A 64-bit constant as the int64 torch multiplies with (two's complement: the same product mod 2**64)."""
    return constant - (1 << 64) if constant >= 1 << 63 else constant


def _shift_right(x: torch.Tensor, bits: int, out: torch.Tensor) -> torch.Tensor:
    """Logical right shift of int64 `x` into `out` (torch's `>>` on int64 is arithmetic: the sign is masked off)."""
    torch.bitwise_right_shift(x, bits, out=out)
    return out.bitwise_and_((1 << (64 - bits)) - 1)


def parameter_key(identity: str, name: str) -> int:
    digest = hashlib.sha256(f"{identity}\0{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def uniform_codes(key: int, start: int, count: int, device) -> torch.Tensor:
    """24-bit codes (int64 in [0, 2**24)) of elements start .. start+count-1 of the parameter with `key`: the top
    bits of splitmix64's mix of key + index x golden ratio, all arithmetic exact mod 2**64 on every device.
    (splitmix64's last xor-shift, z ^ (z >> 31), leaves the top 33 bits as they are, so it is not computed.)"""
    x = torch.arange(start, start + count, dtype=torch.int64, device=device)
    x.mul_(_int64(GOLDEN)).add_(_int64(key))
    scratch = torch.empty_like(x)
    x.bitwise_xor_(_shift_right(x, 30, scratch)).mul_(_int64(MIX_1))
    x.bitwise_xor_(_shift_right(x, 27, scratch)).mul_(_int64(MIX_2))
    return _shift_right(x, 64 - CODE_BITS, scratch)


def uniform_values(key: int, start: int, count: int, half_width: float, device) -> torch.Tensor:
    """float32 values uniform on [-half_width, half_width): (code - 2**23) x step, one correctly rounded multiply
    of two float32 numbers (the step is rounded to float32 first), so no device or library rounds differently."""
    step = torch.tensor(half_width / (1 << (CODE_BITS - 1)), dtype=torch.float32).item()
    codes = uniform_codes(key, start, count, device).sub_(1 << (CODE_BITS - 1))
    return codes.to(torch.float32).mul_(step)


def seed_std(config) -> float:
    return getattr(config, "initializer_range", None) or getattr(config.get_text_config(), "initializer_range", 0.02)


@torch.no_grad()
def seed_parameter(param: torch.Tensor, identity: str, name: str, *, std: float, norm: bool) -> None:
    """Fill one parameter with the values (identity, name) give it, on its own device: see `seed_weights`."""
    if name.rpartition(".")[2] == "bias":
        param.zero_()
    elif norm:
        param.fill_(1.0)
    else:
        key, half_width = parameter_key(identity, name), std * math.sqrt(3)
        flat = param.view(-1)
        on_cpu = param.device.type == "cpu"
        chunk = CHUNK["cpu" if on_cpu else "other"]

        @torch.no_grad()  # on each pool thread too: grad mode is per thread
        def fill(start: int) -> None:
            count = min(chunk, flat.numel() - start)
            flat[start : start + count].copy_(uniform_values(key, start, count, half_width, param.device))

        starts = range(0, flat.numel(), chunk)
        if on_cpu and len(starts) > 1 and torch.get_num_threads() > 1:
            with ThreadPoolExecutor(torch.get_num_threads()) as pool:
                list(pool.map(fill, starts))
        else:
            for start in starts:
                fill(start)


def seeded_parameters(model):
    """(name, parameter, is a norm weight) in the order `seed_weights` fills them; a tied weight comes once per
    name that holds it, the last one seen giving its values."""
    for module_name, module in model.named_modules():
        norm = "norm" in type(module).__name__.lower()
        for param_name, param in module.named_parameters(recurse=False):
            yield (f"{module_name}.{param_name}" if module_name else param_name), param, norm


@torch.no_grad()
def seed_weights(model, identity: str) -> None:
    """Give every parameter values that depend on (identity, parameter name, element index) only.

    Computed in float32 on the parameter's device, a chunk at a time, and cast to the parameter's dtype: a
    bfloat16 load equals the float32 load cast to bfloat16, and a GPU's values are the CPU's. Norm weights are
    ones and biases zeros, as transformers initialises them; other weights are uniform with the config's
    `initializer_range` as std.
    """
    std = seed_std(model.config)
    for name, param, norm in seeded_parameters(model):
        seed_parameter(param, identity, name, std=std, norm=norm)
