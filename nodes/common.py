"""Helpers shared by the node declarations: socket types, IMAGE/MASK conversions at the node boundary."""

from __future__ import annotations

from typing import Tuple

import torch

from diffueraser_core.errors import InputError

CATEGORY_ROOT = "DiffuEraser"
# Custom socket types (never renamed: saved workflows refer to them).
DIFFUERASER_MODEL = "DIFFUERASER_MODEL"
PROPAINTER_MODEL = "PROPAINTER_MODEL"
# ComfyUI's own largest seed (0xffffffffffffffff), so seeds from other nodes validate.
MAX_SEED = 0xFFFFFFFFFFFFFFFF


def frames_from_image(images: torch.Tensor, node: str) -> torch.Tensor:
    """ComfyUI IMAGE -> uint8 [T,H,W,3] on the CPU."""
    from diffueraser_core import video

    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise InputError(f"{node}: images must be an IMAGE [frames, height, width, channels], got {shape}")
    return video.image_to_uint8(images, node=node)


def masks_for_video(mask: torch.Tensor, num_frames: int, size: Tuple[int, int], node: str) -> torch.Tensor:
    """ComfyUI MASK (one per frame, or one for all) -> bool [T,H,W] matching the video."""
    from diffueraser_core import masks as mask_ops

    return mask_ops.broadcast_masks(mask_ops.mask_to_bool(mask, node=node), num_frames, size, node=node)


def image_from_frames(frames: torch.Tensor) -> torch.Tensor:
    from diffueraser_core import video

    return video.uint8_to_image(frames)
