"""Random SD1.5 VAE and text encoder, written the way ComfyUI users keep them (single files) or as folders."""

from __future__ import annotations

import json
import os
from typing import Optional

import torch
from safetensors.torch import save_file

from ..models.sd15_components import TEXT_MODEL_PREFIX, VAE_SCALING_FACTOR, vae_diffusers_to_ldm

#: the tag official safetensors files carry (transformers 4.x refuses a model.safetensors without it)
SAFETENSORS_METADATA = {"format": "pt"}

# sd-vae-ft-mse (reference: shared sd15_components.json)
FULL_VAE_CONFIG = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "sample_size": 256,
    "scaling_factor": VAE_SCALING_FACTOR,
}
# Four levels keep the 8x downscale of the real VAE; narrow and one resnet per level to run in milliseconds.
# Group count 16 = what the loader infers for 16 channels (single files do not store it; SD1.5 uses 32).
TINY_VAE_CONFIG = dict(FULL_VAE_CONFIG, block_out_channels=[16, 16, 16, 16], layers_per_block=1, norm_num_groups=16)

# CLIP ViT-L/14 text model = the SD1.5 text encoder
FULL_TEXT_CONFIG = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 768,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}
# Hidden size 32 = the tiny UNet's cross_attention_dim; the vocabulary stays full so real token ids are valid.
TINY_TEXT_CONFIG = dict(FULL_TEXT_CONFIG, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=1, projection_dim=32)


def _randomise(module: torch.nn.Module, seed: int, std: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            # Norm scales near 1 keep activations in range through many layers.
            if "norm" in name.rsplit(".", 2)[-2] and name.endswith("weight"):
                p.copy_(1.0 + std * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(std * torch.randn(p.shape, generator=gen))


def build_vae(config: Optional[dict] = None, seed: int = 0, std: float = 0.05):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**(config or TINY_VAE_CONFIG))
    _randomise(vae, seed, std)
    return vae.eval()


def save_vae(path: str, config: Optional[dict] = None, seed: int = 0, layout: str = "ldm",
             dtype: torch.dtype = torch.float32) -> str:
    """layout "ldm": one .safetensors in the original keys (vae-ft-mse-840000-ema-pruned); "diffusers": a folder."""
    config = config or TINY_VAE_CONFIG
    vae = build_vae(config, seed)
    sd = {k: v.to(dtype).contiguous() for k, v in vae.state_dict().items()}
    if layout == "ldm":
        sd = vae_diffusers_to_ldm(sd, len(config["block_out_channels"]), config["layers_per_block"])
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        save_file({k: v.contiguous() for k, v in sd.items()}, path, metadata=SAFETENSORS_METADATA)
    elif layout == "diffusers":
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
            json.dump(dict(config, _class_name="AutoencoderKL"), f, indent=1)
        save_file(sd, os.path.join(path, "diffusion_pytorch_model.safetensors"), metadata=SAFETENSORS_METADATA)
    else:
        raise ValueError(f"save_vae: layout must be 'ldm' or 'diffusers', got {layout!r}")
    return path


def build_text_encoder(config: Optional[dict] = None, seed: int = 0, std: float = 0.05):
    from transformers import CLIPTextConfig, CLIPTextModel

    model = CLIPTextModel(CLIPTextConfig(**(config or TINY_TEXT_CONFIG)))
    _randomise(model, seed, std)
    return model.eval()


def save_text_encoder(path: str, config: Optional[dict] = None, seed: int = 0, layout: str = "single",
                      dtype: torch.dtype = torch.float32) -> str:
    """layout "single": clip_l.safetensors-style file (HF keys); "folder": transformers folder with config.json."""
    config = config or TINY_TEXT_CONFIG
    model = build_text_encoder(config, seed)
    sd = {k: v.to(dtype).contiguous() for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    # Official files name the tensors text_model.*, whatever the installed transformers calls them.
    sd = {(k if k.startswith(TEXT_MODEL_PREFIX) else TEXT_MODEL_PREFIX + k): v for k, v in sd.items()}
    if layout == "single":
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        save_file(sd, path, metadata=SAFETENSORS_METADATA)
    elif layout == "folder":
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
            json.dump(dict(config, architectures=["CLIPTextModel"], model_type="clip_text_model"), f, indent=1)
        save_file(sd, os.path.join(path, "model.safetensors"), metadata=SAFETENSORS_METADATA)
    else:
        raise ValueError(f"save_text_encoder: layout must be 'single' or 'folder', got {layout!r}")
    return path
