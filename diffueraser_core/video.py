"""Frames in memory: ComfyUI IMAGE <-> uint8, the working size and resizing. Files: ``media_in`` / ``media_out``.

Whole videos stay on the CPU as ``uint8 [T,H,W,3]``; every float conversion runs ``chunk`` frames at a time.

Decisions where the reference is silent or unsuitable:

* IMAGE -> uint8 rounds to nearest (``uint8 -> float -> uint8`` is then lossless) and clamps values slightly
  outside 0..1 (common after other nodes' arithmetic); NaN/inf is an error. 1 channel is repeated to RGB, 4
  channels (RGBA) drop the alpha channel for processing (the hole is given by the mask, not by transparency;
  ``blend.blend_images`` keeps the IMAGE's own values, alpha included, outside the hole).
* ``working_size`` follows the reference (section 7) but accepts small videos: frames need at least
  ``MIN_FRAME_SIDE`` (64) pixels a side and at most ``MAX_FRAME_SIDE`` (4096); the reference's 256 lower bound on the
  longer side is not enforced because smaller clips work fine at their own size.
* Resizing follows PIL's default ``resize`` (what the reference uses): antialiased bicubic (Keys a = -0.5), width
  then height with 8-bit rounding in between (on random noise at most 2 levels from PIL, almost all pixels equal).
  Masks use nearest on pixel centres (PIL ``NEAREST``).
"""

from __future__ import annotations

import logging
from typing import Tuple

import torch
import torch.nn.functional as F

from .clip import DEFAULT_IMAGE_FPS, as_fps_fraction  # noqa: F401  (re-exported)
from .errors import InputError
from .masks import resize_masks_nearest

log = logging.getLogger(__name__)

#: frames converted / resized at once (bounds float32 copies to a few frames)
FRAME_CHUNK = 16
#: reference default ``max_img_size`` for run_diffueraser; allowed range checked as in the reference
DEFAULT_MAX_SIDE = 960
MAX_SIDE_RANGE = (256, 1920)
#: latent factor of the SD VAE: the working size is a multiple of this
SIZE_MULTIPLE = 8
#: smallest / largest frame side accepted (the reference caps the longer side at 4096)
MIN_FRAME_SIDE = 64
MAX_FRAME_SIDE = 4096

# --------------------------------------------------------------------------------------------------------------
# ComfyUI IMAGE <-> uint8


def image_to_uint8(image: torch.Tensor, node: str = "DiffuEraser", chunk: int = FRAME_CHUNK) -> torch.Tensor:
    """ComfyUI IMAGE float ``[T,H,W,C]`` 0..1 -> uint8 ``[T,H,W,3]`` on the CPU (rounded, clamped).

    C = 1 is repeated to RGB, C = 4 drops alpha. NaN/inf raise InputError naming the node and the count.
    """
    if not isinstance(image, torch.Tensor) or image.dim() != 4:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise InputError(f"{node}: image must be a [T,H,W,C] tensor, got {shape}")
    t, h, w, c = image.shape
    if c not in (1, 3, 4):
        raise InputError(f"{node}: image must have 1, 3 or 4 channels (last dim), got shape {tuple(image.shape)}")
    if t == 0:
        raise InputError(f"{node}: image batch is empty (0 frames)")
    if c == 4:
        log.debug("%s: dropping the alpha channel of an RGBA image", node)
    out = torch.empty((t, h, w, 3), dtype=torch.uint8)
    if image.dtype == torch.uint8:
        for s in range(0, t, chunk):
            part = image[s : s + chunk].cpu()
            out[s : s + chunk] = part[..., :3] if c != 1 else part.expand(-1, -1, -1, 3)
        return out
    nonfinite = 0
    for s in range(0, t, chunk):
        part = image[s : s + chunk].cpu()
        part = part[..., :3] if c != 1 else part.expand(-1, -1, -1, 3)
        part = part.float()
        bad = int((~torch.isfinite(part)).sum())
        if bad:
            nonfinite += bad
            continue
        out[s : s + chunk] = (part * 255.0).round_().clamp_(0, 255).to(torch.uint8)
    if nonfinite:
        raise InputError(f"{node}: image contains {nonfinite} NaN/inf values (counted over RGB channels)")
    return out


def uint8_to_image(frames: torch.Tensor, chunk: int = FRAME_CHUNK) -> torch.Tensor:
    """uint8 ``[T,H,W,C]`` -> ComfyUI IMAGE float32 ``[T,H,W,C]`` in 0..1 (the node's output, so a full copy)."""
    if frames.dtype != torch.uint8:
        raise InputError(f"uint8_to_image: expected uint8 frames, got {frames.dtype}")
    out = torch.empty(frames.shape, dtype=torch.float32)
    for s in range(0, frames.shape[0], chunk):
        out[s : s + chunk] = frames[s : s + chunk].cpu().to(torch.float32) / 255.0
    return out


# --------------------------------------------------------------------------------------------------------------
# sizes and resizing


def check_frame_size(height: int, width: int, node: str = "DiffuEraser") -> None:
    if min(height, width) < MIN_FRAME_SIDE:
        raise InputError(
            f"{node}: frames of {width}x{height} are too small; each side needs at least {MIN_FRAME_SIDE} pixels"
        )
    if max(height, width) > MAX_FRAME_SIDE:
        raise InputError(
            f"{node}: frames of {width}x{height} are too large; sides must be at most {MAX_FRAME_SIDE} pixels "
            "(downscale the video first)"
        )


def working_size(
    height: int, width: int, max_side: int = DEFAULT_MAX_SIDE, node: str = "DiffuEraser"
) -> Tuple[int, int]:
    """The size DiffuEraser works at, as ``(h, w)`` (reference section 7).

    If the longer side exceeds ``max_side``: ``ratio = longer / max_side`` and each side becomes ``int(side /
    ratio)``; then (in every case) each side is rounded down to a multiple of 8.
    """
    lo, hi = MAX_SIDE_RANGE
    if int(max_side) != max_side or not lo <= max_side <= hi:
        raise InputError(f"{node}: max side must be an integer in {lo}..{hi}, got {max_side}")
    height, width = int(height), int(width)
    check_frame_size(height, width, node)
    longer = max(height, width)
    if longer > max_side:
        ratio = longer / max_side
        height, width = int(height / ratio), int(width / ratio)
    return height - height % SIZE_MULTIPLE, width - width % SIZE_MULTIPLE


def resize_frames(
    frames: torch.Tensor, size: Tuple[int, int], mode: str = "bicubic", chunk: int = FRAME_CHUNK
) -> torch.Tensor:
    """uint8 ``[T,H,W,3]`` -> uint8 ``[T,h,w,3]`` (antialiased, rounded, clamped); returns ``frames`` if same size."""
    if frames.dtype != torch.uint8 or frames.dim() != 4:
        raise InputError(f"resize_frames: expected uint8 [T,H,W,C], got {tuple(frames.shape)} {frames.dtype}")
    h, w = int(size[0]), int(size[1])
    if tuple(frames.shape[1:3]) == (h, w):
        return frames
    if mode not in ("bicubic", "bilinear", "nearest"):
        raise InputError(f"resize_frames: mode must be bicubic, bilinear or nearest, got {mode!r}")
    out = torch.empty((frames.shape[0], h, w, frames.shape[3]), dtype=torch.uint8, device=frames.device)
    for s in range(0, frames.shape[0], chunk):
        part = frames[s : s + chunk].to(torch.float32).permute(0, 3, 1, 2)
        if mode == "nearest":
            part = F.interpolate(part, size=(h, w), mode="nearest-exact")
        else:
            # Like PIL: width pass, rounded to 8 bits, then height pass (matches PIL to +-1 level, also on
            # high-frequency content where a single 2-D pass differs because PIL clips the intermediate).
            if part.shape[3] != w:
                part = F.interpolate(part, size=(part.shape[2], w), mode=mode, align_corners=False, antialias=True)
                part = part.round_().clamp_(0, 255)
            if part.shape[2] != h:
                part = F.interpolate(part, size=(h, w), mode=mode, align_corners=False, antialias=True)
        out[s : s + chunk] = part.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    return out


def resize_masks(masks: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """bool ``[T,H,W]`` -> bool ``[T,h,w]``, nearest on pixel centres (PIL ``NEAREST``)."""
    return resize_masks_nearest(masks, size)
