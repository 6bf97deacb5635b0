"""Random weights in the official file layouts, for tests, benchmarks and the demo (no download possible here).

Modules: diffusion.py (unet_main, brushnet folders), lora.py (PCM LoRA files), propainter.py (the three .pth
files), sd15.py (VAE and text encoder as ComfyUI users keep them). ``make_models_folder`` builds a whole
ComfyUI-style models folder.
"""

from __future__ import annotations



import inspect
import os
from typing import Dict

import torch

# File names exactly as the official releases (and ComfyUI users) name them.
UNET_MAIN_DIR = os.path.join("diffueraser", "diffuEraser", "unet_main")
BRUSHNET_DIR = os.path.join("diffueraser", "diffuEraser", "brushnet")
PCM_LORA_FILE = os.path.join("diffueraser", "pcm_sd15_smallcfg_2step_converted.safetensors")
PROPAINTER_DIR = "propainter"
VAE_FILE = os.path.join("vae", "vae-ft-mse-840000-ema-pruned.safetensors")
TEXT_ENCODER_FILE = os.path.join("text_encoders", "clip_l.safetensors")


def make_models_folder(root: str, size: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32,
                       propainter: bool = True, lora: bool = True) -> Dict[str, str]:
    """Write a ComfyUI-style models folder with random weights in the official layouts; returns the paths.

    size "tiny": the tiny configs (tests, demo; seconds on a CPU). size "full": the official sizes (benchmarks).
    The ProPainter networks have a single official size and are always written full size.
    """
    from ..models import configs
    from ..models.unet_motion import DiffuEraserUNet
    from . import diffusion, sd15

    if size not in ("tiny", "full"):
        raise ValueError(f"make_models_folder: size must be 'tiny' or 'full', got {size!r}")
    tiny = size == "tiny"
    unet_config = configs.TINY_UNET_MAIN_CONFIG if tiny else configs.UNET_MAIN_CONFIG
    brushnet_config = configs.TINY_BRUSHNET_CONFIG if tiny else configs.BRUSHNET_CONFIG
    paths = {
        "unet_main": os.path.join(root, UNET_MAIN_DIR),
        "brushnet": os.path.join(root, BRUSHNET_DIR),
        "vae": os.path.join(root, VAE_FILE),
        "text_encoder": os.path.join(root, TEXT_ENCODER_FILE),
    }
    diffusion.save_unet_main_folder(paths["unet_main"], config=unet_config, seed=seed, dtype=dtype)
    diffusion.save_brushnet_folder(paths["brushnet"], config=brushnet_config, seed=seed + 1, dtype=dtype)
    sd15.save_vae(paths["vae"], config=sd15.TINY_VAE_CONFIG if tiny else sd15.FULL_VAE_CONFIG, seed=seed + 2,
                  dtype=dtype)
    sd15.save_text_encoder(paths["text_encoder"], config=sd15.TINY_TEXT_CONFIG if tiny else sd15.FULL_TEXT_CONFIG,
                           seed=seed + 3, dtype=dtype)
    if lora:
        from .lora import save_pcm_lora

        # Only the shapes of the target modules matter: build the UNet without allocating its weights.
        init_keys = set(inspect.signature(DiffuEraserUNet.__init__).parameters)
        with torch.device("meta"):
            unet = DiffuEraserUNet.from_config({k: v for k, v in unet_config.items() if k in init_keys})
        paths["pcm_lora"] = os.path.join(root, PCM_LORA_FILE)
        save_pcm_lora(paths["pcm_lora"], unet, seed=seed + 4)
    if propainter:
        from .propainter import save_propainter_weights

        paths["propainter_dir"] = os.path.join(root, PROPAINTER_DIR)
        save_propainter_weights(paths["propainter_dir"], seed=seed + 5)
    return paths
