"""Helpers shared by the node declarations: socket types, IMAGE/MASK conversions at the node boundary, and the
prepared mask that carries one mask_dilation to every node that reads the mask."""

from __future__ import annotations

import dataclasses
import logging
from typing import Tuple

import torch

from diffueraser_core.errors import InputError

from .comfy_io import io

log = logging.getLogger(__name__)

CATEGORY_ROOT = "DiffuEraser"
# Custom socket types (never renamed: saved workflows refer to them).
DIFFUERASER_MODEL = "DIFFUERASER_MODEL"
PROPAINTER_MODEL = "PROPAINTER_MODEL"
DIFFUERASER_MASK = "DIFFUERASER_MASK"
DiffuEraserModelType = io.Custom(DIFFUERASER_MODEL)
ProPainterModelType = io.Custom(PROPAINTER_MODEL)
PreparedMaskType = io.Custom(DIFFUERASER_MASK)
# ComfyUI's own largest seed (0xffffffffffffffff), so seeds from other nodes validate.
MAX_SEED = 0xFFFFFFFFFFFFFFFF


@dataclasses.dataclass(frozen=True)
class PreparedMask:
    """What DiffuEraser Prepare Mask hands on: the binarised hole (bool ``[T|1,H,W]``, True = remove, at the size it
    was drawn) and the one mask_dilation every consumer applies (each at its own working size and with its
    reference's shape: ProPainter cross, DiffuEraser square)."""

    holes: torch.Tensor
    dilation: int


def mask_input(tooltip: str):
    """The ``mask`` socket of the Prior, Sampler and Blend: a prepared mask, or (old workflows) a plain MASK."""
    return io.MultiType.Input("mask", types=[io.Mask, PreparedMaskType], tooltip=tooltip)


def frames_from_image(images: torch.Tensor, node: str) -> torch.Tensor:
    """ComfyUI IMAGE -> uint8 [T,H,W,3] on the CPU."""
    from diffueraser_core import video

    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise InputError(f"{node}: images must be an IMAGE [frames, height, width, channels], got {shape}")
    return video.image_to_uint8(images, node=node)


def masks_and_dilation(mask, widget_dilation: int, num_frames: int, size: Tuple[int, int],
                       node: str) -> Tuple[torch.Tensor, int]:
    """The mask input (prepared or plain MASK) -> bool [T,H,W] matching the video's frame count (at the mask's own
    size), and the dilation to apply.

    A prepared mask brings its own dilation and the node's ``mask_dilation`` widget is ignored (kept only so that
    workflows saved before the Prepare Mask node load unchanged); a plain MASK uses the widget, as before.
    """
    from diffueraser_core import masks as mask_ops

    if isinstance(mask, PreparedMask):
        holes, dilation = mask.holes, int(mask.dilation)
        if int(widget_dilation) != dilation:
            log.debug("%s: mask_dilation %s ignored; the prepared mask's %d applies", node, widget_dilation,
                      dilation)
    else:
        holes, dilation = mask_ops.mask_to_bool(mask, node=node), int(widget_dilation)
    # kept at the size it was drawn (same aspect ratio, else an error): each stage resizes it once, straight to the
    # size it works at, as the reference does (no second nearest resize through the video size)
    return mask_ops.broadcast_masks(holes, num_frames, size, node=node, resize=False), dilation


def masks_for_video(mask, num_frames: int, size: Tuple[int, int], node: str) -> torch.Tensor:
    """ComfyUI MASK (one per frame, or one for all) or a prepared mask -> bool [T,H,W] matching the video."""
    holes, _ = masks_and_dilation(mask, 0, num_frames, size, node)
    return holes


def image_from_frames(frames: torch.Tensor) -> torch.Tensor:
    from diffueraser_core import video

    return video.uint8_to_image(frames)
