"""The SD1.5 VAE and text encoder, read from the files ComfyUI users keep, for the CLI (ComfyUI brings its own).

Accepted without network access:
* VAE: a diffusers folder (config.json + weights), a single file in diffusers keys, a single file in the original
  LDM keys (``vae-ft-mse-840000-ema-pruned.safetensors`` as kept in ``models/vae``), or an SD1.5 checkpoint
  (``first_stage_model.`` prefix).
* Text encoder: a transformers folder (config.json + model.safetensors), a single CLIP-L text file
  (``clip_l.safetensors`` as kept in ``models/text_encoders`` / ``models/clip``), or an SD1.5 checkpoint
  (``cond_stage_model.transformer.`` prefix). The SD1.5 text encoder is exactly the CLIP ViT-L/14 text model.
The hyper-parameters of single files are read from tensor shapes, so tiny test files load the same way.

``shapes_only=True`` runs the very same key mapping and strict checks on the file's tensor headers (meta tensors,
nothing read but the header) and returns the model on the meta device: ``doctor`` checks the files this way, so
what it accepts is exactly what loads.
"""

from __future__ import annotations

import json
import os
import re
from typing import Dict, Optional

import torch

from ..errors import InputError, ModelFileError
from .checkpoints import load_state_dict_checked, read_state_dict, read_tensor_shapes

VAE_SCALING_FACTOR = 0.18215
CLIP_MAX_TOKENS = 77
# CLIP BPE ids of the SD1.5 tokenizer: start/end of text; SD1.5 pads with the end token.
CLIP_BOS_TOKEN = 49406
CLIP_EOS_TOKEN = 49407
CLIP_HEAD_DIM = 64  # CLIP-L: 768 hidden / 12 heads
TEXT_MODEL_PREFIX = "text_model."  # how the official files name the CLIP text tensors

_LDM_VAE_PREFIX = "first_stage_model."
_LDM_TEXT_PREFIXES = ("cond_stage_model.transformer.", "cond_stage_model.", "transformer.", "text_encoder.")


# --------------------------------------------------------------------------------------------- VAE key mapping
def _vae_key_map(num_blocks: int, layers_per_block: int) -> Dict[str, str]:
    """diffusers AutoencoderKL key stem -> original LDM key stem (tensor suffix .weight/.bias appended later)."""
    pairs = {}
    resnet_parts = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
    attn_parts = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    for side in ("encoder", "decoder"):
        for name in ("conv_in", "conv_out"):
            pairs[f"{side}.{name}"] = f"{side}.{name}"
        pairs[f"{side}.conv_norm_out"] = f"{side}.norm_out"
        for j in range(2):
            for a, b in resnet_parts.items():
                pairs[f"{side}.mid_block.resnets.{j}.{a}"] = f"{side}.mid.block_{j + 1}.{b}"
        for a, b in attn_parts.items():
            pairs[f"{side}.mid_block.attentions.0.{a}"] = f"{side}.mid.attn_1.{b}"
    for i in range(num_blocks):
        for j in range(layers_per_block):
            for a, b in resnet_parts.items():
                pairs[f"encoder.down_blocks.{i}.resnets.{j}.{a}"] = f"encoder.down.{i}.block.{j}.{b}"
        pairs[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = f"encoder.down.{i}.downsample.conv"
        # The LDM decoder numbers its levels from the lowest resolution up; diffusers from the top down.
        level = num_blocks - 1 - i
        for j in range(layers_per_block + 1):
            for a, b in resnet_parts.items():
                pairs[f"decoder.up_blocks.{i}.resnets.{j}.{a}"] = f"decoder.up.{level}.block.{j}.{b}"
        pairs[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = f"decoder.up.{level}.upsample.conv"
    for name in ("quant_conv", "post_quant_conv"):
        pairs[name] = name
    return pairs


def _is_attention_projection(diffusers_stem: str) -> bool:
    return ".attentions.0." in diffusers_stem and not diffusers_stem.endswith("group_norm")


def vae_diffusers_to_ldm(state_dict: Dict[str, torch.Tensor], num_blocks: int, layers_per_block: int):
    mapping = _vae_key_map(num_blocks, layers_per_block)
    out = {}
    for key, tensor in state_dict.items():
        stem, _, suffix = key.rpartition(".")
        if stem not in mapping:
            raise ModelFileError(f"VAE conversion: unexpected diffusers key {key!r}")
        if _is_attention_projection(stem) and suffix == "weight" and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]  # LDM stores the attention projections as 1x1 convs
        out[f"{mapping[stem]}.{suffix}"] = tensor
    return out


def vae_ldm_to_diffusers(state_dict: Dict[str, torch.Tensor], num_blocks: int, layers_per_block: int):
    inverse = {v: k for k, v in _vae_key_map(num_blocks, layers_per_block).items()}
    out, unknown = {}, []
    for key, tensor in state_dict.items():
        stem, _, suffix = key.rpartition(".")
        if stem not in inverse:
            unknown.append(key)
            continue
        target = inverse[stem]
        if _is_attention_projection(target) and suffix == "weight" and tensor.ndim == 4:
            tensor = tensor[:, :, 0, 0]
        out[f"{target}.{suffix}"] = tensor
    return out, unknown


def _vae_config_from_ldm(state_dict: Dict[str, torch.Tensor]) -> dict:
    levels = sorted({int(m.group(1)) for k in state_dict if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    if not levels:
        raise ModelFileError("VAE: no encoder.down.* keys")
    channels = [int(state_dict[f"encoder.down.{i}.block.0.conv1.weight"].shape[0]) for i in levels]
    layers = len({int(m.group(1)) for k in state_dict if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))})
    return _vae_config(channels, layers, state_dict["encoder.norm_out.weight"].shape[0], state_dict)


def _vae_config(channels, layers, last_channels, state_dict) -> dict:
    groups = 32
    while groups > 1 and (min(channels) % groups or last_channels % groups):
        groups //= 2
    latent_key = "quant_conv.weight"
    latent = int(state_dict[latent_key].shape[0]) // 2 if latent_key in state_dict else 4
    return {
        "act_fn": "silu",
        "block_out_channels": list(channels),
        "down_block_types": ["DownEncoderBlock2D"] * len(channels),
        "up_block_types": ["UpDecoderBlock2D"] * len(channels),
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": latent,
        "layers_per_block": layers,
        "norm_num_groups": groups,
        "sample_size": 256,
        "scaling_factor": VAE_SCALING_FACTOR,
    }


def _vae_config_from_diffusers(state_dict) -> dict:
    levels = sorted({int(m.group(1)) for k in state_dict if (m := re.match(r"encoder\.down_blocks\.(\d+)\.", k))})
    channels = [int(state_dict[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0]) for i in levels]
    layers = len({int(m.group(1)) for k in state_dict if (m := re.match(r"encoder\.down_blocks\.0\.resnets\.(\d+)\.", k))})
    return _vae_config(channels, layers, state_dict["encoder.conv_norm_out.weight"].shape[0], state_dict)


def _read_weights(path: str, what: str, shapes_only: bool) -> Dict[str, torch.Tensor]:
    """The file's tensors, or with ``shapes_only`` meta tensors of the same names, shapes and dtypes."""
    if not shapes_only:
        return read_state_dict(path, what)
    return {
        name: torch.empty(shape, dtype=dtype, device="meta")
        for name, (shape, dtype) in read_tensor_shapes(path, what).items()
    }


def _folder_weights(folder: str, names) -> Optional[str]:
    for name in names:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    return None


def load_vae(path: str, dtype: Optional[torch.dtype] = None, shapes_only: bool = False):
    """Load the SD1.5 VAE (sd-vae-ft-mse) as a diffusers AutoencoderKL on the CPU, eval mode.

    ``shapes_only``: check the file without reading its data; the model comes back on the meta device.
    """
    from diffusers import AutoencoderKL

    what = "VAE"
    config = None
    if os.path.isdir(path):
        weights = _folder_weights(path, ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                                         "diffusion_pytorch_model.bin", "model.safetensors"))
        if weights is None:
            raise ModelFileError(f"{what}: folder {path!r} has no diffusion_pytorch_model.safetensors/.bin")
        config_path = os.path.join(path, "config.json")
        if os.path.isfile(config_path):
            with open(config_path, encoding="utf-8") as f:
                config = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
        path = weights
    state_dict = _read_weights(path, what, shapes_only)
    if any(k.startswith(_LDM_VAE_PREFIX) for k in state_dict):
        state_dict = {k[len(_LDM_VAE_PREFIX):]: v for k, v in state_dict.items() if k.startswith(_LDM_VAE_PREFIX)}
    if "encoder.down.0.block.0.conv1.weight" in state_dict:
        config = _vae_config_from_ldm(state_dict)
        state_dict, unknown = vae_ldm_to_diffusers(state_dict, len(config["block_out_channels"]), config["layers_per_block"])
        # Original checkpoints may carry training-only tensors (e.g. the discriminator/loss); they are not the VAE.
        unknown = [k for k in unknown if not k.startswith(("loss.", "model_ema."))]
        if unknown:
            raise ModelFileError(f"{what}: {path!r} has {len(unknown)} unexpected keys, first: {unknown[:5]}")
    elif "encoder.down_blocks.0.resnets.0.conv1.weight" in state_dict:
        if config is None:
            config = _vae_config_from_diffusers(state_dict)
    else:
        raise ModelFileError(
            f"{what}: {path!r} is not an SD1.5 VAE (no encoder.down / encoder.down_blocks keys; "
            f"first keys: {list(state_dict)[:3]}). Use sd-vae-ft-mse (vae-ft-mse-840000-ema-pruned.safetensors)."
        )
    with torch.device("meta"):
        vae = AutoencoderKL(**config)
    _load_strict(vae, state_dict, what, path)
    if dtype is not None:
        vae.to(dtype)
    return vae.eval().requires_grad_(False)


def _load_strict(module, state_dict, what, path):
    # One dtype for the whole model (a file may mix fp16 weights with fp32 extras).
    dtype = next(iter(state_dict.values())).dtype
    load_state_dict_checked(module, {k: v.to(dtype) for k, v in state_dict.items()}, path, what, assign=True)


# ------------------------------------------------------------------------------------------------ text encoder
def _text_config_from_shapes(state_dict) -> dict:
    token = state_dict["text_model.embeddings.token_embedding.weight"]
    position = state_dict["text_model.embeddings.position_embedding.weight"]
    hidden = int(token.shape[1])
    layers = len({int(m.group(1)) for k in state_dict if (m := re.match(r"text_model\.encoder\.layers\.(\d+)\.", k))})
    return {
        "vocab_size": int(token.shape[0]),
        "hidden_size": hidden,
        "intermediate_size": int(state_dict["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]),
        "num_hidden_layers": layers,
        "num_attention_heads": max(1, hidden // CLIP_HEAD_DIM),
        "max_position_embeddings": int(position.shape[0]),
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": hidden,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
    }


def load_text_encoder(path: str, dtype: Optional[torch.dtype] = None, shapes_only: bool = False):
    """Load the SD1.5 text encoder (CLIP-L text model) as a transformers CLIPTextModel on the CPU, eval mode.

    ``shapes_only``: check the file without reading its data; the model comes back on the meta device.
    """
    from transformers import CLIPTextConfig, CLIPTextModel

    what = "Text encoder"
    config = None
    if os.path.isdir(path):
        weights = _folder_weights(path, ("model.safetensors", "model.fp16.safetensors", "pytorch_model.bin"))
        if weights is None:
            raise ModelFileError(f"{what}: folder {path!r} has no model.safetensors / pytorch_model.bin")
        config_path = os.path.join(path, "config.json")
        if os.path.isfile(config_path):
            with open(config_path, encoding="utf-8") as f:
                config = {k: v for k, v in json.load(f).items() if k not in ("architectures", "transformers_version", "torch_dtype")}
        path = weights
    state_dict = _read_weights(path, what, shapes_only)
    if "text_model.embeddings.token_embedding.weight" not in state_dict:
        for prefix in _LDM_TEXT_PREFIXES:
            if f"{prefix}text_model.embeddings.token_embedding.weight" in state_dict:
                state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
                break
        else:
            raise ModelFileError(
                f"{what}: {path!r} holds no CLIP text model (no text_model.embeddings.token_embedding.weight; "
                f"first keys: {list(state_dict)[:3]}). Use the SD1.5 text encoder or clip_l.safetensors."
            )
    # Some exports carry the projection head or the position ids buffer; neither is part of the text model output.
    state_dict = {k: v for k, v in state_dict.items() if k.startswith("text_model.") and not k.endswith("position_ids")}
    clip_config = CLIPTextConfig(**(config or _text_config_from_shapes(state_dict)))
    with torch.device("meta"):
        model = CLIPTextModel(clip_config)
    if not any(k.startswith(TEXT_MODEL_PREFIX) for k in model.state_dict()):
        # transformers >= 5 flattened CLIPTextModel (no text_model submodule); the files keep the prefix.
        state_dict = {k[len(TEXT_MODEL_PREFIX):]: v for k, v in state_dict.items()}
    expected = {k for k in model.state_dict() if not k.endswith("position_ids")}
    _load_strict_subset(model, state_dict, expected, what, path)
    if dtype is not None:
        model.to(dtype)
    return model.eval().requires_grad_(False)


def _load_strict_subset(model, state_dict, expected, what, path):
    missing = sorted(expected - set(state_dict))
    unexpected = sorted(set(state_dict) - expected)
    if missing or unexpected:
        raise ModelFileError(
            f"{what}: {path!r} does not match: {len(missing)} missing keys (first: {missing[:3]}), "
            f"{len(unexpected)} unexpected keys (first: {unexpected[:3]})"
        )
    reference = model.state_dict()
    for k in expected:
        if tuple(reference[k].shape) != tuple(state_dict[k].shape):
            raise ModelFileError(
                f"{what}: {path!r} tensor {k} has shape {tuple(state_dict[k].shape)}, expected {tuple(reference[k].shape)}"
            )
    dtype = next(iter(state_dict.values())).dtype
    model.load_state_dict({k: v.to(dtype) for k, v in state_dict.items()}, strict=False, assign=True)
    # Non-persistent buffers (position ids) stay on meta after assign; rebuild them on the CPU.
    for module in model.modules():
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf.is_meta:
                if name == "position_ids":
                    module.register_buffer(name, torch.arange(buf.shape[-1]).expand(buf.shape), persistent=False)
                else:
                    raise ModelFileError(f"{what}: buffer {name} could not be initialised")


def empty_prompt_token_ids(max_tokens: int = CLIP_MAX_TOKENS) -> torch.Tensor:
    """Token ids of "" as the SD1.5 tokenizer gives them (start, end, then end-token padding): no vocab needed."""
    ids = torch.full((1, max_tokens), CLIP_EOS_TOKEN, dtype=torch.long)
    ids[0, 0] = CLIP_BOS_TOKEN
    return ids


@torch.no_grad()
def encode_prompt(
    text_encoder,
    prompt: str = "",
    device: Optional[torch.device] = None,
    tokenizer_dir: Optional[str] = None,
) -> torch.Tensor:
    """Text embeddings [1, 77, D] (last hidden state, no clip skip) as the reference conditions the UNet.

    The empty prompt (the reference's and the default use) needs no tokenizer files; any other prompt needs a
    CLIP tokenizer folder (vocab.json + merges.txt), read offline.
    """
    max_tokens = int(text_encoder.config.max_position_embeddings)
    if prompt == "":
        ids = empty_prompt_token_ids(max_tokens)
    else:
        if tokenizer_dir is None or not os.path.isdir(tokenizer_dir):
            raise InputError(
                f"Text encoder: prompt {prompt!r} needs a CLIP tokenizer folder (vocab.json, merges.txt); "
                f"got {tokenizer_dir!r}. The empty prompt needs none."
            )
        from transformers import CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        ids = tokenizer(prompt, padding="max_length", max_length=max_tokens, truncation=True, return_tensors="pt").input_ids
    device = device or next(text_encoder.parameters()).device
    out = text_encoder(ids.to(device))[0]
    return out.float().cpu()
