"""This host's speeds that a model load depends on, measured once and kept in the checkpoint cache
(`<cache>/host-speeds.json`, keyed by host name, so a cache shared between hosts keeps each one's):

- read: bytes per second reading a file of the checkpoint cache's disk, its pages dropped from the page cache
  first (posix_fadvise DONTNEED; where the file system ignores that, the page cache's speed is what is read);
- seeding: values per second `seed_parameter` fills on the CPU, or on this host's GPU.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from harness.models.checkpoints import cache_root

READ_PROBE_BYTES = 256 * 2**20
SEED_PROBE_VALUES = 1 << 24


def _cache_file() -> Path:
    return cache_root() / "host-speeds.json"


def _cached(kind: str, measure) -> float:
    path = _cache_file()
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    host = known.setdefault(socket.gethostname(), {})
    if kind not in host:
        host[kind] = measure()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(known, indent=1, sort_keys=True))
        tmp.replace(path)
    return host[kind]


def _measure_read(folder: Path, size: int) -> float:
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / f".read-probe-{os.getpid()}"
    block = os.urandom(8 * 2**20)  # incompressible: a compressing file system reads what it stores
    try:
        with open(probe, "wb") as f:
            for _ in range(size // len(block)):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
        buffer = bytearray(len(block))
        with open(probe, "rb", buffering=0) as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            start, read = time.perf_counter(), 0
            while chunk := f.readinto(buffer):
                read += chunk
            return read / (time.perf_counter() - start)
    finally:
        probe.unlink(missing_ok=True)


def read_bytes_per_s() -> float:
    """Bytes per second reading the checkpoint cache's disk, measured once per host."""
    return _cached("read_bytes_per_s", lambda: _measure_read(cache_root(), READ_PROBE_BYTES))


def _measure_seeding(device: str) -> float:
    import torch

    from harness.models.weights import seed_parameter

    param = torch.empty(SEED_PROBE_VALUES, device=device)
    best = float("inf")
    for _ in range(2):  # the first also loads the kernels
        if param.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        seed_parameter(param, "speed-probe", "weight", std=0.02, norm=False)
        if param.is_cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return param.numel() / best


def seed_values_per_s(device: str) -> float:
    """Values per second seeding fills on this host's "cpu" or "cuda" device, measured once per host and card."""
    if device == "cpu":
        return _cached("seed_values_per_s cpu", lambda: _measure_seeding("cpu"))
    import torch

    return _cached(f"seed_values_per_s {torch.cuda.get_device_name()}", lambda: _measure_seeding("cuda"))
