"""Random PCM-style LoRA files for a given UNet, in the kohya (released ``*_converted``) or diffusers/peft layout."""

from __future__ import annotations

import os
from typing import Dict, List, Optional

import torch
from torch import nn

from ..models.lora import EXCLUDED_MODULE_PART

# LoraConfig target_modules of PCM's SD1.5 training script (tests/reference/pcm_sd15_lora.json).
PCM_TARGET_MODULES = (
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
    "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj",
)


def pcm_target_module_names(unet: nn.Module) -> List[str]:
    """Paths of the 2D Linear/Conv2d layers PCM trains (peft matching: the path ends with a target name)."""
    names = []
    for name, module in unet.named_modules():
        if EXCLUDED_MODULE_PART in name.split(".") or not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        if any(name == t or name.endswith("." + t) for t in PCM_TARGET_MODULES):
            names.append(name)
    return names


def build_pcm_lora(unet: nn.Module, rank: int = 4, style: str = "kohya", seed: int = 0,
                   alpha: Optional[float] = None, dtype: torch.dtype = torch.float16,
                   std: float = 0.05) -> Dict[str, torch.Tensor]:
    """State dict of a random LoRA for ``unet``'s PCM target modules (up non-zero so every delta is live).

    ``alpha`` None: kohya stores alpha = rank, peft stores no alpha; either way the scale alpha/rank is 1.
    """
    if style not in ("kohya", "peft"):
        raise ValueError(f"build_pcm_lora: style must be 'kohya' or 'peft', got {style!r}")
    generator = torch.Generator().manual_seed(seed)
    state_dict = {}
    for name in pcm_target_module_names(unet):
        module = unet.get_submodule(name)
        if isinstance(module, nn.Conv2d):
            down_shape = (rank, module.in_channels, *module.kernel_size)
            up_shape = (module.out_channels, rank, 1, 1)
        else:
            down_shape = (rank, module.in_features)
            up_shape = (module.out_features, rank)
        down = (torch.randn(down_shape, generator=generator) * std).to(dtype)
        up = (torch.randn(up_shape, generator=generator) * std).to(dtype)
        if style == "kohya":
            stem = "lora_unet_" + name.replace(".", "_")
            state_dict[f"{stem}.lora_down.weight"] = down
            state_dict[f"{stem}.lora_up.weight"] = up
            state_dict[f"{stem}.alpha"] = torch.tensor(float(rank if alpha is None else alpha), dtype=dtype)
        else:
            state_dict[f"unet.{name}.lora_A.weight"] = down
            state_dict[f"unet.{name}.lora_B.weight"] = up
            if alpha is not None:
                state_dict[f"unet.{name}.alpha"] = torch.tensor(float(alpha), dtype=dtype)
    return state_dict


def save_pcm_lora(path: str, unet: nn.Module, rank: int = 4, style: str = "kohya", seed: int = 0,
                  alpha: Optional[float] = None, dtype: torch.dtype = torch.float16) -> str:
    """Write ``build_pcm_lora(...)`` to ``path`` as safetensors; returns the path."""
    from safetensors.torch import save_file

    state_dict = build_pcm_lora(unet, rank=rank, style=style, seed=seed, alpha=alpha, dtype=dtype)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(state_dict, os.fspath(path))
    return os.fspath(path)
