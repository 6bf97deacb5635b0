"""Random DiffuEraser networks (unet_main, brushnet) and their official diffusers folders.

Every parameter is re-drawn from N(0, std), zero-initialised taps and output projections included, so that each
part of the network measurably affects the output (a freshly initialised BrushNet would contribute nothing).
``config=None`` means the tiny test config; pass ``configs.UNET_MAIN_CONFIG`` / ``configs.BRUSHNET_CONFIG`` for
full size (1.3 B / 0.9 B parameters: the model is built once and filled in place, no second copy).
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import pathlib
from typing import Mapping, Optional, Union

import diffusers
import torch
from diffusers import UNetMotionModel
from safetensors.torch import save_file

from ..models import configs
from ..models.brushnet import BrushNetModel
from ..models.unet_motion import DiffuEraserUNet

logger = logging.getLogger(__name__)

# Spread of the random weights: small enough that 20+ stacked blocks stay finite, large enough to be non-trivial.
DEFAULT_STD = 0.05
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
UNET_MAIN_CLASS_NAME = "UNetMotionModel"
BRUSHNET_CLASS_NAME = "BrushNetModel"

PathLike = Union[str, os.PathLike]


def _init_kwargs(model_class, config: Mapping) -> dict:
    """The config entries the class's __init__ takes (official files carry extra, ignored keys)."""
    accepted = set(inspect.signature(model_class.__init__).parameters) - {"self"}
    return {k: v for k, v in config.items() if k in accepted}


@torch.no_grad()
def _randomise_(model: torch.nn.Module, seed: int, std: float, dtype: torch.dtype) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    for parameter in model.parameters():
        parameter.normal_(0.0, std, generator=generator)
    # Parameter by parameter, so the peak is one model plus one tensor; buffers (sinusoidal tables) follow.
    # nn.Module.to: ModelMixin.to would warn about from_pretrained's torch_dtype, irrelevant for random weights.
    torch.nn.Module.to(model, dtype)
    return model.eval().requires_grad_(False)


def build_unet_main(
    config: Optional[Mapping] = None, seed: int = 0, std: float = DEFAULT_STD, dtype: torch.dtype = torch.float32
) -> DiffuEraserUNet:
    """Random ``DiffuEraserUNet`` on the CPU (tiny config by default), in eval mode without gradients."""
    config = configs.TINY_UNET_MAIN_CONFIG if config is None else config
    model = DiffuEraserUNet(**_init_kwargs(UNetMotionModel, config))
    return _randomise_(model, seed, std, dtype)


def build_brushnet(
    config: Optional[Mapping] = None, seed: int = 0, std: float = DEFAULT_STD, dtype: torch.dtype = torch.float32
) -> BrushNetModel:
    """Random ``BrushNetModel`` on the CPU (tiny config by default), in eval mode without gradients."""
    config = configs.TINY_BRUSHNET_CONFIG if config is None else config
    model = BrushNetModel(**_init_kwargs(BrushNetModel, config))
    return _randomise_(model, seed, std, dtype)


def _write_folder(path: PathLike, model: torch.nn.Module, config: Mapping, class_name: str) -> pathlib.Path:
    folder = pathlib.Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    file_config = dict(config)
    file_config["_class_name"] = class_name
    file_config.setdefault("_diffusers_version", diffusers.__version__)
    (folder / CONFIG_FILE).write_text(json.dumps(file_config, indent=2, sort_keys=True) + "\n")
    tensors = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    logger.info("wrote random %s weights (%d tensors) to %s", class_name, len(tensors), folder)
    return folder


def save_unet_main_folder(
    path: PathLike, config: Optional[Mapping] = None, seed: int = 0, dtype: torch.dtype = torch.float32
) -> pathlib.Path:
    """Write a random unet_main as the official folder (config.json + diffusion_pytorch_model.safetensors)."""
    config = configs.TINY_UNET_MAIN_CONFIG if config is None else config
    model = build_unet_main(config, seed=seed, dtype=dtype)
    # The official config.json carries every UNetMotionModel key; the official pipeline reads some the class
    # ignores (``time_cond_proj_dim``), so the file gets the official values for whatever the tiny config leaves out.
    file_config = {**{k: v for k, v in configs.UNET_MAIN_CONFIG.items() if not k.startswith("_")}, **dict(config)}
    return _write_folder(path, model, file_config, UNET_MAIN_CLASS_NAME)


def save_brushnet_folder(
    path: PathLike, config: Optional[Mapping] = None, seed: int = 0, dtype: torch.dtype = torch.float32
) -> pathlib.Path:
    """Write a random brushnet as the official folder (config.json + diffusion_pytorch_model.safetensors)."""
    config = configs.TINY_BRUSHNET_CONFIG if config is None else config
    model = build_brushnet(config, seed=seed, dtype=dtype)
    return _write_folder(path, model, config, BRUSHNET_CLASS_NAME)
