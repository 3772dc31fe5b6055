"""Synthetic, deterministic visual inputs (or a user's file), so every run sees the same pixels."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
from PIL import Image

from harness.errors import HarnessFault, UserError

VIDEO_FRAMES = 4  # two temporal patches of two frames each


@contextlib.contextmanager
def built_by_the_harness(what: str):
    """Building a cell's input is the harness's part: its failure (a MemoryError on a huge picture) is a
    HarnessFault, never the model's; the matrix's own mistakes stay UserErrors."""
    try:
        yield
    except (UserError, HarnessFault):
        raise
    except Exception as exc:
        raise HarnessFault(
            f"the harness could not build {what}",
            exc,
            fix="lower the resolution or the number of images, or give the runner more memory.",
        ) from exc


def synthetic_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A gradient with a coloured square: structure at every scale, same bytes on every machine."""
    rng = np.random.default_rng(seed)
    y, x = np.ogrid[0:height, 0:width]  # broadcast, not two full int64 grids
    base = np.empty((height, width, 3), dtype=np.uint8)
    base[..., 0] = x * 255 // max(width - 1, 1)
    base[..., 1] = y * 255 // max(height - 1, 1)
    base[..., 2] = (x + y) * 255 // max(width + height - 2, 1)
    side = max(min(width, height) // 3, 1)
    top, left = rng.integers(0, height - side + 1), rng.integers(0, width - side + 1)
    base[top : top + side, left : left + side] = rng.integers(0, 256, size=3, dtype=np.uint8)
    return Image.fromarray(base, "RGB")


def solid_image(width: int, height: int, rgb: tuple[int, int, int]) -> Image.Image:
    """A plain colour, for answer checks on real checkpoints ("what colour is this?")."""
    return Image.new("RGB", (width, height), rgb)


def synthetic_video(width: int, height: int, frames: int = VIDEO_FRAMES) -> np.ndarray:
    """Frames (T, H, W, 3) uint8: the synthetic image, shifted a little each frame."""
    first = np.asarray(synthetic_image(width, height))
    return np.stack([np.roll(first, shift=4 * i, axis=1) for i in range(frames)])


def load_image(path: str | Path) -> Image.Image:
    return Image.open(path).convert("RGB")


def image_source(spec: str | None) -> dict:
    """The picture fields for a matrix's `image:`: a solid colour `rgb(R,G,B)` or a file path."""
    if not spec:
        return {}
    if spec.startswith("rgb("):
        return {"color": tuple(int(v) for v in spec[4:-1].split(","))}
    return {"image_path": spec}


def pictures(
    kind: str,
    width: int,
    height: int,
    count: int,
    image_path: str | None = None,
    color: tuple[int, int, int] | None = None,
) -> list[Image.Image]:
    """A cell's images (kind image or images): the user's file or colour, or distinct synthetic images."""
    n = count if kind == "images" else 1
    if image_path:
        try:
            return [load_image(image_path)] * n
        except (OSError, Image.DecompressionBombError) as exc:  # missing file, not an image, a decompression bomb
            raise UserError(
                f"the matrix's image cannot be read: {exc}", key="defaults.image", fix="point it at a PNG or JPEG file."
            ) from None
    if color:
        return [solid_image(width, height, color)] * n
    return [synthetic_image(width, height, seed=i) for i in range(n)]
