"""Masks: validation, broadcasting, binarising and morphology, all in torch.

Convention everywhere in the core: ``bool [T,H,W]`` on the CPU, **True = hole (to remove)**.

Two dilation shapes exist in the reference and both are reproduced:

* DiffuEraser (square): ``cv2.erode`` / ``cv2.dilate`` with a 3x3 rectangle and OpenCV's default border, i.e. the
  image border neither grows nor eats into the mask. ``prepare_diffueraser_masks`` = erode once, then dilate
  ``iterations`` times (reference section 7).
* ProPainter (cross): ``scipy.ndimage.binary_dilation`` with its default 4-connected cross, so the mask grows as a
  diamond (reference section 9).

The morphology runs in ``max_pool2d`` chunk by chunk (a float copy of a few frames only). Square operations use
one separable pass with a ``2n+1`` window, which equals ``n`` iterations of a 3x3 square (also at the border,
because the image rectangle is convex).

ComfyUI MASK values outside 0..1 are an error rather than a silent clamp: they usually mean a wrong socket or an
unnormalised image. An RGB(A) image given as a mask is converted to grayscale with the ITU-R 601 luma weights that
PIL's ``convert("L")`` uses (the reference reads mask videos that way), with a log line.
"""

from __future__ import annotations

import logging
from typing import Tuple

import torch
import torch.nn.functional as F

from .errors import InputError

log = logging.getLogger(__name__)

#: frames processed at once by the morphology / conversion helpers (bounded float copies)
MASK_CHUNK = 16
#: DiffuEraser's default mask dilation iterations (run_diffueraser's ``mask_dilation_iter``)
DEFAULT_MASK_DILATION = 8
#: DiffuEraser erodes once before dilating (removes isolated single pixels of mask noise)
DIFFUERASER_ERODE_ITERATIONS = 1
#: ITU-R 601 luma weights (PIL ``convert("L")``), used when an RGB image arrives where a mask is expected
LUMA_WEIGHTS = (0.299, 0.587, 0.114)


def _check_bool_masks(masks: torch.Tensor, what: str) -> None:
    if not isinstance(masks, torch.Tensor) or masks.dtype != torch.bool or masks.dim() != 3:
        shape = tuple(masks.shape) if isinstance(masks, torch.Tensor) else type(masks).__name__
        dtype = masks.dtype if isinstance(masks, torch.Tensor) else None
        raise InputError(f"{what}: expected masks as bool [T,H,W], got shape {shape} dtype {dtype}")


def mask_to_bool(mask: torch.Tensor, node: str = "DiffuEraser", threshold: float = 0.5) -> torch.Tensor:
    """ComfyUI MASK float ``[T,H,W]`` or ``[H,W]`` (1 = masked) -> bool ``[T,H,W]`` on the CPU (True = hole).

    Also accepts ``[T,H,W,1]`` and an image ``[T,H,W,3|4]`` (converted by luma, alpha ignored, logged).
    Values must be finite and inside 0..1; a pixel is a hole when its value is ``> threshold``.
    """
    if not isinstance(mask, torch.Tensor):
        raise InputError(f"{node}: mask must be a torch tensor, got {type(mask).__name__}")
    if mask.dim() == 2:
        mask = mask.unsqueeze(0)
    if mask.dim() == 4 and mask.shape[-1] == 1:
        mask = mask[..., 0]
    from_image = mask.dim() == 4 and mask.shape[-1] in (3, 4)
    if from_image:
        log.info(
            "%s: got an image of shape %s where a mask was expected; using its grayscale (luma) as the mask",
            node,
            tuple(mask.shape),
        )
    elif mask.dim() != 3:
        raise InputError(
            f"{node}: mask must be [T,H,W] or [H,W] (or an image [T,H,W,3]), got shape {tuple(mask.shape)}"
        )
    if mask.dtype == torch.bool:
        return mask.cpu().contiguous() if not from_image else mask[..., :3].any(-1).cpu()
    if not 0.0 <= threshold < 1.0:
        raise InputError(f"{node}: mask threshold must be in [0, 1), got {threshold}")
    if mask.dtype == torch.uint8:
        # 8-bit masks (e.g. straight from a file): scale to 0..1 semantics.
        threshold = threshold * 255.0
        upper = 255.0
    else:
        upper = 1.0
    out = torch.empty(mask.shape[:3], dtype=torch.bool)
    bad_nonfinite = 0
    bad_range = 0
    low, high = None, None
    for start in range(0, mask.shape[0], MASK_CHUNK):
        chunk = mask[start : start + MASK_CHUNK].cpu()
        if from_image:
            weights = torch.tensor(LUMA_WEIGHTS, dtype=torch.float32)
            chunk = (chunk[..., :3].float() * weights).sum(-1)
        elif not chunk.is_floating_point():
            chunk = chunk.float()
        finite = torch.isfinite(chunk)
        bad_nonfinite += int((~finite).sum())
        outside = finite & ((chunk < 0) | (chunk > upper))
        n_outside = int(outside.sum())
        if n_outside:
            bad_range += n_outside
            vals = chunk[outside]
            low = float(vals.min()) if low is None else min(low, float(vals.min()))
            high = float(vals.max()) if high is None else max(high, float(vals.max()))
        out[start : start + MASK_CHUNK] = chunk > threshold
    if bad_nonfinite:
        raise InputError(f"{node}: mask contains {bad_nonfinite} NaN/inf values; masks must be finite in 0..1")
    if bad_range:
        raise InputError(
            f"{node}: mask has {bad_range} values outside 0..{upper:g} (from {low:g} to {high:g}); "
            "give a mask in 0..1 (1 = remove)"
        )
    return out


def resize_masks_nearest(masks: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """bool ``[T,H,W]`` -> bool ``[T,h,w]`` by nearest neighbour on pixel centres (PIL ``NEAREST``)."""
    _check_bool_masks(masks, "resize_masks")
    h, w = int(size[0]), int(size[1])
    if tuple(masks.shape[1:]) == (h, w):
        return masks
    out = torch.empty((masks.shape[0], h, w), dtype=torch.bool, device=masks.device)
    for start in range(0, masks.shape[0], MASK_CHUNK):
        chunk = masks[start : start + MASK_CHUNK].to(torch.float32).unsqueeze(1)
        # "nearest-exact" samples at pixel centres like PIL; plain "nearest" is shifted by half a pixel.
        out[start : start + MASK_CHUNK] = F.interpolate(chunk, size=(h, w), mode="nearest-exact")[:, 0] > 0.5
    return out


def same_aspect(a_hw: Tuple[int, int], b_hw: Tuple[int, int]) -> bool:
    """Whether two sizes ``(h, w)`` have the same aspect ratio, up to a pixel (or 1 %) of rounding."""
    ah, aw = int(a_hw[0]), int(a_hw[1])
    bh, bw = int(b_hw[0]), int(b_hw[1])
    off_h = abs(aw * bh / bw - ah) > max(1.0, 0.01 * ah)
    off_w = abs(ah * bw / bh - aw) > max(1.0, 0.01 * aw)
    return not (off_h and off_w)


def broadcast_masks(
    masks: torch.Tensor, num_frames: int, size: Tuple[int, int], node: str = "DiffuEraser", resize: bool = True
) -> torch.Tensor:
    """Make bool masks match a video: one mask -> every frame; another size -> nearest resize (logged), or kept at
    its own size when ``resize`` is False (the stages then resize it once, straight to their own sizes).

    Any other frame-count mismatch is an error quoting both counts.
    """
    _check_bool_masks(masks, node)
    count = masks.shape[0]
    if count != num_frames and count != 1:
        raise InputError(
            f"{node}: mask has {count} frames but the video has {num_frames}; "
            "give one mask per frame or a single mask for all frames"
        )
    h, w = int(size[0]), int(size[1])
    if resize and tuple(masks.shape[1:]) != (h, w):
        log.info(
            "%s: resizing masks from %dx%d to the video size %dx%d (nearest)",
            node,
            masks.shape[2],
            masks.shape[1],
            w,
            h,
        )
        masks = resize_masks_nearest(masks, (h, w))
    if count == 1 and num_frames != 1:
        masks = masks.expand(num_frames, *masks.shape[1:])
    return masks.contiguous()


def _max_filter_1d(x: torch.Tensor, radius: int, dim: int) -> torch.Tensor:
    """Running max over ``2*radius+1`` pixels along H (dim=2) or W (dim=3) of ``[N,1,H,W]``; outside is ignored."""
    if radius <= 0:
        return x
    if dim == 3:
        return F.max_pool2d(x, kernel_size=(1, 2 * radius + 1), stride=1, padding=(0, radius))
    return F.max_pool2d(x, kernel_size=(2 * radius + 1, 1), stride=1, padding=(radius, 0))


def _square_max(x: torch.Tensor, radius: int) -> torch.Tensor:
    # max_pool2d pads with -inf, which is OpenCV's default morphology border: the border never counts.
    # A window wider than the image is fine but max_pool2d wants padding <= kernel/2, which holds.
    return _max_filter_1d(_max_filter_1d(x, radius, 3), radius, 2)


def _morph_chunked(masks: torch.Tensor, op) -> torch.Tensor:
    out = torch.empty_like(masks)
    for start in range(0, masks.shape[0], MASK_CHUNK):
        chunk = masks[start : start + MASK_CHUNK].to(torch.float32).unsqueeze(1)
        out[start : start + MASK_CHUNK] = op(chunk)[:, 0] > 0.5
    return out


def _check_iterations(iterations: int, what: str) -> int:
    if int(iterations) != iterations or iterations < 0:
        raise InputError(f"{what}: iterations must be a non-negative integer, got {iterations}")
    return int(iterations)


def dilate_square(masks: torch.Tensor, iterations: int) -> torch.Tensor:
    """``cv2.dilate(m, 3x3 rect, iterations=n)`` for bool ``[T,H,W]``."""
    _check_bool_masks(masks, "dilate_square")
    n = _check_iterations(iterations, "dilate_square")
    if n == 0:
        return masks.clone()
    return _morph_chunked(masks, lambda x: _square_max(x, n))


def erode_square(masks: torch.Tensor, iterations: int) -> torch.Tensor:
    """``cv2.erode(m, 3x3 rect, iterations=n)`` for bool ``[T,H,W]`` (the image border does not erode)."""
    _check_bool_masks(masks, "erode_square")
    n = _check_iterations(iterations, "erode_square")
    if n == 0:
        return masks.clone()
    # erosion = complement of the dilated complement; -inf padding of the complement = border counts as mask.
    return _morph_chunked(masks, lambda x: 1.0 - _square_max(1.0 - x, n))


def _cross_step(x: torch.Tensor) -> torch.Tensor:
    return torch.maximum(_max_filter_1d(x, 1, 2), _max_filter_1d(x, 1, 3))


def dilate_cross(masks: torch.Tensor, iterations: int) -> torch.Tensor:
    """``scipy.ndimage.binary_dilation(m, iterations=n)`` (default cross, zero border) per frame, as ProPainter."""
    _check_bool_masks(masks, "dilate_cross")
    n = _check_iterations(iterations, "dilate_cross")
    if n == 0:
        # scipy treats iterations=0 as "until nothing changes"; ProPainter skips the call instead, as here.
        return masks.clone()

    def op(x):
        for _ in range(n):
            x = _cross_step(x)
        return x

    return _morph_chunked(masks, op)


def prepare_diffueraser_masks(masks: torch.Tensor, iterations: int = DEFAULT_MASK_DILATION) -> torch.Tensor:
    """DiffuEraser's mask preparation (reference section 7): erode once (3x3), then dilate ``iterations`` (3x3).

    Expects masks already at the working size (the reference resizes with NEAREST first).
    """
    _check_bool_masks(masks, "prepare_diffueraser_masks")
    n = _check_iterations(iterations, "prepare_diffueraser_masks")

    def op(x):
        x = 1.0 - _square_max(1.0 - x, DIFFUERASER_ERODE_ITERATIONS)
        return _square_max(x, n)

    return _morph_chunked(masks, op)
