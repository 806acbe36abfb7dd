"""Tiny random Long-VITA checkpoints in the released HF layout, and the `create-tiny` command.

Owns `create_tiny`: a model of a (small) preset with random weights, written as a released
`*_HF` directory would be: config.json (Qwen2 fields + `visual`), generation_config.json,
sharded safetensors with model.safetensors.index.json. The weights are deliberately far from
the default init (layer scales, norm weights and biases all random and distinct) so that a
converter or a model that swaps, drops or misplaces a tensor gives different outputs.
"""
from __future__ import annotations

import argparse
import os
import re
from typing import Optional, Union

# create-tiny's --dtype choices (names of config.dtypes.DTYPES).
_DTYPE_CHOICES = ("bf16", "fp32")
# Files this command writes (with the shards); --force replaces them and leaves anything else alone.
_OWN_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json")
_SHARD = re.compile(r"^model-\d+-of-\d+\.safetensors$")


def randomize_(model, seed: int = 0) -> None:
    """Overwrite every parameter with seeded random values of a sensible scale, in place.

    Matrices ~ N(0, 1/fan_in), embeddings ~ N(0, 1), biases ~ N(0, 0.1), norm weights in
    [0.5, 1.5), layer scales in [0.1, 1.0): no parameter is a constant, so an equivalence
    test sees every tensor.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)

    def rand(shape, lo=0.0, hi=1.0):
        return torch.rand(shape, generator=gen) * (hi - lo) + lo

    def randn(shape, std):
        return torch.randn(shape, generator=gen) * std

    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("ls1", "ls2"):
                value = rand(p.shape, 0.1, 1.0)
            elif leaf == "weight" and p.dim() == 1:  # LayerNorm / RMSNorm scales
                value = rand(p.shape, 0.5, 1.5)
            elif leaf == "bias":
                value = randn(p.shape, 0.1)
            elif leaf in ("class_embedding", "position_embedding"):
                value = randn(p.shape, 0.5)
            elif name.endswith("embed_tokens.weight"):
                value = randn(p.shape, 1.0)
            else:
                fan_in = p[0].numel()
                value = randn(p.shape, fan_in ** -0.5)
            p.copy_(value.to(p.dtype))


def generation_config_for(config):
    """The released generation settings (Qwen2.5-Instruct's) with this config's token ids."""
    from transformers import GenerationConfig

    return GenerationConfig(
        do_sample=True, temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05,
        bos_token_id=config.bos_token_id, pad_token_id=config.pad_token_id,
        eos_token_id=[config.eos_token_id, config.bos_token_id],
    )


def create_tiny(out_dir: str, preset: str = "tiny", seed: int = 0, dtype=None,
                max_shard_size: Optional[Union[int, str]] = None) -> str:
    """Write a random Long-VITA checkpoint of `preset` to `out_dir`; returns `out_dir`.

    dtype: a torch dtype (default float32). max_shard_size: bytes or "10MB"-style; None picks
    half the model size so the checkpoint always has >= 2 shards and an index, as released
    checkpoints do.
    """
    import torch

    from megatron_vita.config.model import ModelConfig
    from megatron_vita.hf.configuration import LongVITAConfig
    from megatron_vita.hf.modeling import LongVITAForCausalLM

    dtype = torch.float32 if dtype is None else dtype
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype {dtype} is not supported; use torch.float32, torch.bfloat16 or torch.float16")
    mc = ModelConfig.from_name(preset)
    config = LongVITAConfig.from_model_config(mc)
    torch.manual_seed(seed)
    model = LongVITAForCausalLM(config)
    randomize_(model, seed)
    model = model.to(dtype)
    model.generation_config = generation_config_for(config)
    if max_shard_size is None:
        total = sum(p.numel() * p.element_size() for p in model.parameters())
        max_shard_size = max(total // 2, 1)
    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(out_dir):
        # A stale single file, index or shard from an earlier save would shadow or sit beside the new ones.
        path = os.path.join(out_dir, name)
        if (name in ("model.safetensors", "model.safetensors.index.json") or _SHARD.match(name)) \
                and os.path.isfile(path):
            os.remove(path)
    model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    # The safetensors library creates its files 0600; give them the mode open() gives config.json.
    from megatron_vita.checkpoint.safetensors_io import new_file_mode

    for name in os.listdir(out_dir):
        if name == "model.safetensors" or _SHARD.match(name):
            os.chmod(os.path.join(out_dir, name), new_file_mode())
    return out_dir


# ---- command line ------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    from megatron_vita.config.model import PRESETS

    parser.add_argument("OUT", help="output directory (HF checkpoint layout)")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS),
                        help="model size preset (default: tiny); large presets need matching memory")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--dtype", choices=_DTYPE_CHOICES, default="fp32", help="weight dtype (default: fp32)")
    parser.add_argument("--force", action="store_true", help="write into a non-empty OUT, replacing "
                        + ", ".join(_OWN_FILES) + " and the shards")


def run(args: argparse.Namespace) -> int:
    out = args.OUT
    if os.path.exists(out) and not os.path.isdir(out):
        raise FileExistsError(f"{out} exists and is not a directory")
    if os.path.isdir(out) and os.listdir(out) and not args.force:
        raise FileExistsError(f"{out} is not empty; pass --force to overwrite the checkpoint files in it")
    from megatron_vita.config.dtypes import torch_dtype

    create_tiny(out, preset=args.preset, seed=args.seed, dtype=torch_dtype(args.dtype))
    shards = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    print(f"wrote {args.preset} Long-VITA checkpoint ({args.dtype}, seed {args.seed}) to {out}: "
          f"{len(shards)} shards + index, config.json, generation_config.json")
    return 0
