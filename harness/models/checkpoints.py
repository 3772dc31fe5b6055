"""Build Qwen-VL checkpoint folders without downloading anything.

Two kinds, one output: a folder that `from_pretrained` reads exactly as it reads a downloaded model.
- tiny: a small config that keeps every architectural feature, seeded random weights, saved.
- architecture: a real model's config.json (true size) with no weights file content; transformers
  initialises the missing weights randomly, directly on the target device and dtype, at load time.

Folders are cached under the cache root, keyed by a hash of the recipe, built under a file lock
into a temporary folder and renamed into place, so two processes building at once are safe.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

from filelock import FileLock

from harness.models import architectures
from harness.models.families import Family, get_family

RECIPE_VERSION = 5  # bump when anything below changes what is written

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
TINY_SPECIAL_BASE = 256  # tiny vocab: 256 byte symbols, then the specials
REAL_SPECIAL_BASE = 151643  # Qwen's own id of <|endoftext|>; the specials follow in this order
TINY_VOCAB = 320

TINY_TEXT = dict(
    vocab_size=TINY_VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=32768,
)

# Per family: text and vision sub-configs small enough for CPU, with every feature still present:
# M-RoPE sections, Qwen2.5-VL window + full-attention blocks, Qwen3-VL DeepStack, MoE top-2 of 4.
_SMALL_TOWER = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64)
_MROPE_2 = {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}}
TINY_RECIPES: dict[str, dict] = {
    "qwen2_vl": dict(
        text=_MROPE_2,
        vision=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14),
    ),
    "qwen2_5_vl": dict(
        text=_MROPE_2,
        vision=dict(**_SMALL_TOWER, patch_size=14, window_size=112, fullatt_block_indexes=[1]),
    ),
    "qwen3_vl": dict(
        text={
            "head_dim": 16,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 5e6,
                "mrope_section": [4, 2, 2],
                "mrope_interleaved": True,
            },
        },
        vision=dict(**_SMALL_TOWER, patch_size=16, num_position_embeddings=256, deepstack_visual_indexes=[0]),
    ),
}
TINY_RECIPES["qwen3_vl_moe"] = dict(
    text={
        **TINY_RECIPES["qwen3_vl"]["text"],
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "decoder_sparse_step": 1,
    },
    vision=TINY_RECIPES["qwen3_vl"]["vision"],
)

# Variants of a tiny checkpoint: named edits that make a real behaviour reproducible.
# "fp16-overflow" scales the vision tower's MLP output weights so activations exceed float16's
# range (65504), as the real Qwen2-VL vision tower did in float16 before transformers fixed it.
# "vllm-cpu" is the tiny model with the head size vLLM's CPU build takes: its attention kernels take head
# sizes 32, 64, 80, ... (vLLM 0.32 cpu_attn.py; the default head_dim 16 is refused at the first request,
# "Unsupported CPU attention configuration: head_dim=16"), and its M-RoPE asserts sum(mrope_section) ==
# head_dim // 2. Its Qwen3-VL-MoE reads `norm_topk_prob` (the published config has it) and the experts in
# the published layout (gate_up_proj [experts, hidden, 2 x inter], down_proj [experts, inter, hidden];
# transformers 5 writes them transposed and reads both, telling them apart by shape: the expert size is
# chosen so that no expert matrix is square).
VARIANTS = {
    "default": {},
    "fp16-overflow": {"vision_mlp_scale": 3000.0},
    "vllm-cpu": {
        "text": dict(num_attention_heads=2, num_key_value_heads=1, head_dim=32),
        "mrope_section": [4, 6, 6],
        "published_experts": True,
    },
}
PUBLISHED_TRANSPOSED = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def tiny_recipe(family_key: str, variant: str = "default") -> dict:
    """The text and vision sub-configs of a tiny checkpoint: the family's, changed as the variant says."""
    recipe, change = TINY_RECIPES[family_key], VARIANTS[variant]
    if "text" not in change:
        return recipe
    text = {**recipe["text"], **change["text"]}
    text["rope_parameters"] = {**recipe["text"]["rope_parameters"], "mrope_section": change["mrope_section"]}
    if family_key == "qwen3_vl_moe":
        text.update(norm_topk_prob=True, mlp_only_layers=[], moe_intermediate_size=16)
    return {"text": text, "vision": recipe["vision"]}


def cache_root() -> Path:
    return Path(os.environ.get("QWEN_COMPAT_CACHE", Path.home() / ".cache" / "qwen-compat"))


def chat_template() -> str:
    return resources.files("harness.data").joinpath("chat_template.jinja").read_text()


def special_token_ids(base: int) -> dict[str, int]:
    return {tok: base + i for i, tok in enumerate(SPECIAL_TOKENS)}


# A config's special-token ids and the processor's token they must be: a prompt built with another id
# carries no image at all, and the model then fails for the harness's reason ("tokens: 0").
CONFIG_TOKENS = {
    "image_token_id": "<|image_pad|>",
    "video_token_id": "<|video_pad|>",
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
}


def special_base_for(config_dict: dict, name: str) -> int:
    """Where the processor's special tokens start, read from the config's own ids (not from its vocab size,
    which three shipped configs leave to the library's default), and checked against every id it gives."""
    text = config_dict.get("text_config") or {}
    image = config_dict.get("image_token_id", text.get("image_token_id"))
    if image is None:
        vocab = text.get("vocab_size", config_dict.get("vocab_size", 0))
        return REAL_SPECIAL_BASE if vocab > REAL_SPECIAL_BASE else TINY_SPECIAL_BASE
    base = image - SPECIAL_TOKENS.index("<|image_pad|>")
    ids = special_token_ids(base)
    eos = config_dict.get("eos_token_id", text.get("eos_token_id"))
    wanted = {key: config_dict.get(key, text.get(key)) for key in CONFIG_TOKENS}
    wrong = [
        f"{key} {value} (the processor's {CONFIG_TOKENS[key]} is {ids[CONFIG_TOKENS[key]]})"
        for key, value in wanted.items()
        if value is not None and value != ids[CONFIG_TOKENS[key]]
    ]
    for value in [eos] if isinstance(eos, int) else eos or []:
        if value not in ids.values():
            wrong.append(f"eos_token_id {value} (no special token of the processor has it)")
    if wrong:
        from harness.errors import UserError

        raise UserError(
            f"the config of '{name}' gives special-token ids the processor cannot match: {'; '.join(wrong)}.",
            file=f"harness/data/architectures/{name}.json",
            key=wrong[0].split()[0],
            fix="correct the id from the model's published config.json (shared/architectures/).",
        )
    return base


def _recipe_hash(recipe: dict) -> str:
    blob = json.dumps({"v": RECIPE_VERSION, **recipe}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def _cached_build(name: str, recipe: dict, build) -> Path:
    """Return the cached folder for `recipe`, building it once (under a lock) if absent."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    folder = root / f"{name}-{_recipe_hash(recipe)}"
    if (folder / "config.json").exists():
        return folder
    with FileLock(str(folder) + ".lock"):
        if (folder / "config.json").exists():
            return folder
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
        try:
            build(tmp)
            (tmp / "qwen_compat_recipe.json").write_text(json.dumps(recipe, indent=1, sort_keys=True))
            tmp.rename(folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def build_tokenizer(special_base: int):
    """A real Qwen2Tokenizer: byte-level vocabulary, no merges, Qwen's specials at `special_base`."""
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet(), key=ord))}
    vocab.update(special_token_ids(special_base))
    return Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
        chat_template=chat_template(),
    )


def build_processor(family: Family, special_base: int):
    import transformers

    image_processor = transformers.Qwen2VLImageProcessor(
        patch_size=family.patch_size,
        merge_size=family.merge_size,
        temporal_patch_size=family.temporal_patch_size,
        size={"shortest_edge": family.min_pixels, "longest_edge": family.max_pixels},
        image_mean=family.image_mean,
        image_std=family.image_std,
    )
    video_processor = getattr(transformers, family.video_processor_class)(
        patch_size=family.patch_size,
        merge_size=family.merge_size,
        temporal_patch_size=family.temporal_patch_size,
        image_mean=family.image_mean,
        image_std=family.image_std,
    )
    processor_class = getattr(transformers, family.processor_class)
    return processor_class(
        image_processor=image_processor,
        tokenizer=build_tokenizer(special_base),
        video_processor=video_processor,
        chat_template=chat_template(),
    )


def tiny_config(family: Family, variant: str = "default"):
    import transformers

    recipe = tiny_recipe(family.key, variant)
    ids = special_token_ids(TINY_SPECIAL_BASE)
    text = {
        **TINY_TEXT,
        **recipe["text"],
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }
    return getattr(transformers, family.config_class)(
        text_config=text,
        vision_config=dict(recipe["vision"]),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )


def _apply_variant(model, variant: str) -> None:
    import torch

    scale = VARIANTS[variant].get("vision_mlp_scale")
    if scale:
        with torch.no_grad():
            for block in model.model.visual.blocks:
                for name, param in block.mlp.named_parameters():
                    if name.endswith("weight"):
                        param.mul_(scale)


def _publish_experts(folder: Path) -> None:
    """Rewrite a saved MoE checkpoint's fused experts in the published layout (see VARIANTS)."""
    from safetensors.torch import load_file, save_file

    for path in folder.glob("*.safetensors"):
        tensors = load_file(str(path))
        if any(k.endswith(PUBLISHED_TRANSPOSED) for k in tensors):
            tensors = {
                k: v.transpose(1, 2).contiguous() if k.endswith(PUBLISHED_TRANSPOSED) else v for k, v in tensors.items()
            }
            save_file(tensors, str(path), metadata={"format": "pt"})


def tiny_checkpoint(family_key: str, variant: str = "default", seed: int = 0) -> Path:
    """Folder of a tiny random-weight checkpoint of `family_key`, built once per recipe."""
    family = get_family(family_key)
    if variant not in VARIANTS:
        from harness.errors import UserError

        raise UserError(
            f"unknown tiny-model variant '{variant}'.", key="variant", fix=f"use one of {', '.join(VARIANTS)}."
        )
    recipe = {
        "kind": "tiny",
        "family": family.key,
        "variant": variant,
        "seed": seed,
        **tiny_recipe(family.key, variant),
        **VARIANTS[variant],
    }

    def build(out: Path) -> None:
        import torch
        import transformers

        torch.manual_seed(seed)
        model = getattr(transformers, family.model_class)(tiny_config(family, variant)).eval()
        _apply_variant(model, variant)
        ids = special_token_ids(TINY_SPECIAL_BASE)
        model.generation_config.eos_token_id = ids["<|im_end|>"]
        model.generation_config.pad_token_id = ids["<|endoftext|>"]
        model.save_pretrained(out)
        if VARIANTS[variant].get("published_experts"):
            _publish_experts(out)
        build_processor(family, TINY_SPECIAL_BASE).save_pretrained(out)

    return _cached_build(f"tiny-{family.key}-{variant}", recipe, build)


def empty_weights_checkpoint(name: str, config_dict: dict) -> Path:
    """Folder holding a config, tokenizer and processor, and a weights file with no tensors.

    `from_pretrained` finds a checkpoint whose every key is "missing" and initialises it on the
    requested device and dtype (no float32 copy of a large model on the host); `seed_weights` then
    makes those weights a function of (architecture, seed).
    """
    family = get_family(config_dict["model_type"])
    recipe = {"kind": "architecture", "name": name, "config": config_dict}

    def build(out: Path) -> None:
        from safetensors.torch import save_file

        (out / "config.json").write_text(json.dumps(config_dict, indent=2))
        save_file({}, str(out / "model.safetensors"), metadata={"format": "pt"})
        build_processor(family, special_base_for(config_dict, name)).save_pretrained(out)

    return _cached_build(f"arch-{name.replace('/', '--')}", recipe, build)


def architecture_checkpoint(name: str) -> Path:
    """A true-size architecture's empty-weights folder. `name` is a shipped architecture (see
    `harness.models.architectures`) or a hub id whose config.json can be fetched."""
    return empty_weights_checkpoint(name, architectures.load_config(name))


SHARD_BYTES = 2**30


def seeded_weights_checkpoint(source: dict, dtype: str) -> Path:
    """An `arch:` model's folder with its seeded weights written out in `dtype`: the values `seed_weights` gives
    the empty-weights load, so a cell loaded from here holds the same model as its `single` twin.

    For placements that offload modules to disk: transformers 5 (5.24 checked) disk-offloads a module by
    pointing at its weights in the checkpoint files; weights a checkpoint lacks are initialised in memory and
    lost, and the first forward through them fails (KeyError in accelerate's OffloadedWeightsLoader).
    Written one tensor at a time in 1 GiB shards, never the whole model in memory.
    """
    empty = architecture_checkpoint(source["arch"])
    identity = weights_seed(source, str(empty))
    recipe = {"kind": "seeded-weights", "identity": identity, "dtype": dtype}

    def build(out: Path) -> None:
        for item in empty.iterdir():
            if item.is_file() and item.name not in ("model.safetensors", "qwen_compat_recipe.json"):
                shutil.copy(item, out)
        _write_seeded_weights(out, json.loads((empty / "config.json").read_text()), identity, dtype)

    return _cached_build(f"arch-weights-{source['arch'].replace('/', '--')}-{dtype}", recipe, build)


def _write_seeded_weights(out: Path, config_dict: dict, identity: str, dtype: str) -> None:
    import torch
    import transformers
    from accelerate import init_empty_weights
    from safetensors.torch import save_file

    from harness.models.weights import seed_parameter, seed_std, seeded_parameters

    config = getattr(transformers, get_family(config_dict["model_type"]).config_class).from_dict(config_dict)
    with init_empty_weights():
        model = transformers.AutoModelForImageTextToText.from_config(config, dtype=getattr(torch, dtype))
    tied = dict(model.all_tied_weights_keys)  # lm_head.weight -> the embedding; a loaded model holds it once
    std, weight_map, shard, sizes = seed_std(config), {}, {}, {"shard": 0, "total": 0}

    def flush() -> None:
        name = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        shard.clear()
        sizes["shard"] = 0

    for name, param, norm in seeded_parameters(model):
        if name in tied.values():
            continue  # written under its tie's name below, which seed_weights fills last
        tensor = torch.empty(param.shape, dtype=param.dtype)
        seed_parameter(tensor, identity, name, std=std, norm=norm)
        shard[tied.get(name, name)] = tensor
        sizes["shard"] += tensor.numel() * tensor.element_size()
        sizes["total"] += tensor.numel() * tensor.element_size()
        if sizes["shard"] >= SHARD_BYTES:
            flush()
    if shard:
        flush()
    index = {"metadata": {"total_size": sizes["total"]}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))


def checkpoint_for(source: dict, *, dtype: str | None = None, with_weights: bool = False) -> str:
    """What `from_pretrained` is given for a cell's model: a built folder, a hub id or a local path.
    `with_weights`: an `arch:` model's seeded weights written out in `dtype` (for disk offload)."""
    if "tiny" in source:
        return str(tiny_checkpoint(source["tiny"], source.get("variant", "default"), source.get("seed", 0)))
    if "arch" in source:
        if with_weights:
            return str(seeded_weights_checkpoint(source, dtype))
        return str(architecture_checkpoint(source["arch"]))
    return source.get("hub") or source["path"]


def weights_seed(source: dict, folder: str) -> str | None:
    """For an empty-weights folder (an `arch:` model, or a `path:` to such a folder), the identity its
    random weights are drawn from: the recipe it was built from and the model's seed. None for
    checkpoints that hold their weights."""
    recipe = Path(folder) / "qwen_compat_recipe.json"
    if not recipe.is_file() or json.loads(recipe.read_text()).get("kind") != "architecture":
        return None
    return f"{hashlib.sha256(recipe.read_bytes()).hexdigest()[:16]}/seed={source.get('seed', 0)}"


def model_identity(source: dict, folder: str) -> dict:
    """What makes two loads the same model: the source, the recipe a built folder was made from,
    and, for a local folder, its files' sizes and times."""
    identity = {"source": source}
    if "tiny" in source or "arch" in source:
        identity["recipe"] = Path(folder).name
    elif "path" in source and Path(folder).is_dir():
        identity["files"] = sorted(
            (f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in Path(folder).iterdir() if f.is_file()
        )
    return identity
