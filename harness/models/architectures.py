"""Real Qwen-VL architectures as config files: the shipped copies, or a hub id's config.json."""

from __future__ import annotations

import copy
import json
from functools import cache
from importlib import resources

import yaml

from harness.errors import UserError


@cache
def index() -> dict:
    text = resources.files("harness.data.architectures").joinpath("index.yaml").read_text()
    return yaml.safe_load(text)


def shipped() -> dict[str, dict]:
    return index()["shipped"]


def _shipped_key(name: str) -> str | None:
    """The shipped entry a name or hub id refers to, or None."""
    key = {entry["hub_id"]: key for key, entry in shipped().items()}.get(name, name)
    return key if key in shipped() else None


def shipped_family(name: str) -> str | None:
    """The model_type of a shipped architecture (by name or hub id), or None when it is not shipped."""
    key = _shipped_key(name)
    return load_config(key)["model_type"] if key else None


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = _merge(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def load_config(name: str) -> dict:
    """The config dict of a shipped architecture (by name or hub id) or, failing that, from the hub."""
    key = _shipped_key(name)
    if key:
        raw = json.loads(resources.files("harness.data.architectures").joinpath(f"{key}.json").read_text())
        config = {k: v for k, v in raw.items() if not k.startswith("_")}
        return _merge(config, shipped()[key].get("completed", {}))
    return _fetch_hub_config(name)


def _fetch_hub_config(name: str) -> dict:
    not_shipped = index()["not_shipped"]
    short = name.split("/")[-1]
    why = f" ({not_shipped[short]})" if short in not_shipped else ""
    fix = (
        f"use a shipped architecture ({', '.join(shipped())}), run where the Hugging Face hub is "
        f"reachable so that its config.json (a few KB) can be fetched, or point the model at a local "
        f"folder holding the real config.json."
    )
    if "/" not in name:
        raise UserError(f"architecture '{name}' is not shipped with qwen-compat{why}.", key="models.arch", fix=fix)
    try:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(name, "config.json")
    except Exception as exc:  # offline, unknown repo, gated: all end the same way for the user
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"the config of '{name}' is not shipped with qwen-compat{why} and could not be "
            f"fetched from the hub ({first}).",
            key="models.arch",
            fix=fix,
        ) from None
    with open(path) as f:
        return json.load(f)


def count_parameters(config_dict: dict) -> int:
    """Parameters of the architecture at true size, counted on the meta device (no memory used)."""
    import torch
    import transformers

    from harness.models.families import get_family

    family = get_family(config_dict["model_type"])
    config = getattr(transformers, family.config_class).from_dict(config_dict)
    with torch.device("meta"):
        model = getattr(transformers, family.model_class)._from_config(config)
    return sum(p.numel() for p in model.parameters())
