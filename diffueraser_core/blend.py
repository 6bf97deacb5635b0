"""Feathered composite of the generated frames over the original frames, at the original size (reference section 8).

Per frame: ``m`` = the prepared hole mask (as the sampler used it), ``b`` = Gaussian blur of ``m`` with a
``feather x feather`` kernel, ``alpha = 1 - (1 - m)(1 - b)`` (1 inside the hole, fading out around it), and
``out = generated * alpha + original * (1 - alpha)``.

Differences from the reference, all deliberate:

* The reference composites at the working size (e.g. 960 px) and writes that size. Here the generated frames are
  resized (bicubic) to the original size and the composite is made there, so pixels outside the feathered hole are
  the user's original pixels, bit for bit (``alpha == 0`` copies the original).
* The mask is prepared like the sampler's (nearest to the working size = generated size, erode 1 + dilate
  ``mask_dilation`` there, nearest back to the original size); the feather kernel is applied at the original size,
  so ``feather`` is in output pixels.
* ``alpha`` stays in float32 and the result is rounded; the reference stores the blurred mask and alpha as uint8
  and truncates the result (differences of at most a couple of levels in the feathered band).

The Gaussian kernel is OpenCV's for ``sigma = 0`` (``getGaussianKernel``: its fixed tables for sizes 1 to 9 and
``sigma = 0.3*((k-1)*0.5 - 1) + 0.8`` otherwise, 3.5 for the default 21) with OpenCV's default border
(reflect-101).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .errors import InputError
from .masks import DEFAULT_MASK_DILATION, prepare_diffueraser_masks, resize_masks_nearest, same_aspect
from .video import FRAME_CHUNK, resize_frames

#: sample types the composite writes into (8-bit, 16-bit high-depth originals, ComfyUI float IMAGEs)
BLEND_DTYPES = (torch.uint8, torch.uint16, torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: reference feather kernel size (``cv2.GaussianBlur(mask, (21, 21), 0)``)
DEFAULT_FEATHER = 21

# OpenCV's fixed Gaussian kernels used when sigma <= 0 and the size is at most 7 (getGaussianKernel).
_OPENCV_SMALL_GAUSSIAN_KERNELS = {
    1: (1.0,),
    3: (0.25, 0.5, 0.25),
    5: (0.0625, 0.25, 0.375, 0.25, 0.0625),
    7: (0.03125, 0.109375, 0.21875, 0.28125, 0.21875, 0.109375, 0.03125),
    # recent OpenCV (checked on 5.0) also has a fixed 9-tap table
    9: tuple(v / 256 for v in (4, 13, 30, 51, 60, 51, 30, 13, 4)),
}


def check_feather(feather: int, node: str = "DiffuEraser Blend") -> int:
    if int(feather) != feather or feather < 1 or int(feather) % 2 == 0:
        raise InputError(f"{node}: feather must be an odd integer >= 1 (1 = hard edge), got {feather}")
    return int(feather)


def gaussian_kernel_1d(size: int) -> torch.Tensor:
    """OpenCV's ``getGaussianKernel(size, 0)`` as float64 ``[size]`` (sums to 1)."""
    size = check_feather(size, "gaussian_kernel_1d")
    if size in _OPENCV_SMALL_GAUSSIAN_KERNELS:
        return torch.tensor(_OPENCV_SMALL_GAUSSIAN_KERNELS[size], dtype=torch.float64)
    sigma = 0.3 * ((size - 1) * 0.5 - 1) + 0.8
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    kernel = torch.exp(-(x * x) / (2 * sigma * sigma))
    return kernel / kernel.sum()


def _reflect101_index(n: int, radius: int) -> torch.Tensor:
    """Indices of a length-``n`` axis padded by ``radius`` on both sides with OpenCV's BORDER_REFLECT_101."""
    idx = torch.arange(-radius, n + radius)
    if n == 1:
        return torch.zeros_like(idx)
    period = 2 * (n - 1)
    idx = idx.remainder(period)
    return torch.where(idx > n - 1, period - idx, idx)


def gaussian_blur(x: torch.Tensor, size: int) -> torch.Tensor:
    """Separable Gaussian blur of float ``[N,H,W]`` (OpenCV kernel and border); exact zeros stay zero far away."""
    size = check_feather(size, "gaussian_blur")
    if size == 1:
        return x.clone()
    radius = size // 2
    kernel = gaussian_kernel_1d(size).to(x.device, x.dtype)
    n, h, w = x.shape
    y = x.unsqueeze(1)
    y = y.index_select(3, _reflect101_index(w, radius).to(x.device))
    y = F.conv2d(y, kernel.view(1, 1, 1, size))
    y = y.index_select(2, _reflect101_index(h, radius).to(x.device))
    y = F.conv2d(y, kernel.view(1, 1, size, 1))
    return y[:, 0]


def blend_weights(masks: torch.Tensor, feather: int = DEFAULT_FEATHER) -> torch.Tensor:
    """Composite weight of the generated frame, float32 ``[N,H,W]`` in 0..1, from prepared bool masks ``[N,H,W]``.

    ``alpha = 1 - (1 - m)(1 - blur(m))``: 1 on the hole, a Gaussian fade outside it, exactly 0 farther than
    ``feather // 2`` pixels (per axis) from the hole. Call it on a chunk of frames.
    """
    feather = check_feather(feather)
    if masks.dtype != torch.bool or masks.dim() != 3:
        raise InputError(f"DiffuEraser Blend: masks must be bool [N,H,W], got {tuple(masks.shape)} {masks.dtype}")
    m = masks.to(torch.float32)
    blurred = gaussian_blur(m, feather).clamp_(0.0, 1.0)
    return 1.0 - (1.0 - m) * (1.0 - blurred)


def _composite(original: torch.Tensor, generated: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """``generated`` (uint8 RGB) over ``original`` of any depth: uint8, uint16 (0..65535) or float (0..1, values
    outside kept). Extra channels of ``original`` (alpha) are copied; weight 0 copies the original pixel bit for bit
    (not through float arithmetic)."""
    a = alpha.unsqueeze(-1)
    base = original[..., :3]
    if original.is_floating_point():
        scale, top = 1.0 / 255.0, None
    else:
        top = float(torch.iinfo(original.dtype).max)
        scale = top / 255.0
    mixed = generated.to(torch.float32) * scale * a + base.to(torch.float32) * (1.0 - a)
    if top is not None:
        mixed = mixed.round_().clamp_(0, top)
    rgb = torch.where(a > 0, mixed.to(original.dtype), base)
    if original.shape[-1] == 3:
        return rgb
    return torch.cat([rgb, original[..., 3:]], dim=-1)


def _check_inputs(original: torch.Tensor, generated: torch.Tensor, masks: torch.Tensor, node: str,
                  mask_size_free: bool = False) -> None:
    if original.dtype not in BLEND_DTYPES or original.dim() != 4 or original.shape[-1] not in (3, 4):
        raise InputError(
            f"{node}: original frames must be uint8/uint16/float [T,H,W,3|4], got {tuple(original.shape)} "
            f"{original.dtype}"
        )
    if generated.dtype != torch.uint8 or generated.dim() != 4 or generated.shape[-1] != 3:
        raise InputError(
            f"{node}: generated frames must be uint8 [T,h,w,3], got {tuple(generated.shape)} {generated.dtype}"
        )
    if masks.dtype != torch.bool or masks.dim() != 3:
        raise InputError(f"{node}: masks must be bool [T,H,W], got {tuple(masks.shape)} {masks.dtype}")
    t = original.shape[0]
    if generated.shape[0] != t or masks.shape[0] != t:
        raise InputError(
            f"{node}: frame counts differ: original {t}, generated {generated.shape[0]}, masks {masks.shape[0]}"
        )
    same = tuple(masks.shape[1:]) == tuple(original.shape[1:3])
    if not same and not (mask_size_free and same_aspect(tuple(masks.shape[1:]), tuple(original.shape[1:3]))):
        raise InputError(
            f"{node}: masks are {tuple(masks.shape[1:])} but the original frames are {tuple(original.shape[1:3])}"
            + (" (another aspect ratio)" if mask_size_free else "")
        )


def blend_frames(
    original: torch.Tensor,
    generated: torch.Tensor,
    masks: torch.Tensor,
    feather: int = DEFAULT_FEATHER,
    chunk: int = FRAME_CHUNK,
) -> torch.Tensor:
    """Composite with already prepared masks ``bool [T,H,W]`` at the original size; see the module docstring."""
    node = "DiffuEraser Blend"
    _check_inputs(original, generated, masks, node)
    feather = check_feather(feather, node)
    size = tuple(original.shape[1:3])
    out = torch.empty_like(original)
    for s in range(0, original.shape[0], chunk):
        alpha = blend_weights(masks[s : s + chunk], feather)
        gen = resize_frames(generated[s : s + chunk], size)
        out[s : s + chunk] = _composite(original[s : s + chunk], gen, alpha)
    return out


def prepare_blend_masks(
    masks: torch.Tensor, working_size: Tuple[int, int], mask_dilation: int = DEFAULT_MASK_DILATION,
    size: Optional[Tuple[int, int]] = None,
) -> torch.Tensor:
    """Raw bool masks ``[N,h,w]`` -> the sampler's prepared masks brought to ``size`` (default: the masks' own size;
    nearest both ways)."""
    size = tuple(size) if size is not None else tuple(masks.shape[1:])
    small = resize_masks_nearest(masks, working_size)
    prepared = prepare_diffueraser_masks(small, mask_dilation)
    return resize_masks_nearest(prepared, size)


def blend_video(
    original: torch.Tensor,
    generated: torch.Tensor,
    masks: torch.Tensor,
    mask_dilation: int = DEFAULT_MASK_DILATION,
    feather: int = DEFAULT_FEATHER,
    chunk: int = FRAME_CHUNK,
    out: Optional[torch.Tensor] = None,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """Composite ``generated`` (uint8 ``[T,h,w,3]``, working size) over ``original`` (uint8 ``[T,H,W,3]``).

    ``masks`` are the raw (undilated) bool masks, at the original size or at the mask file's own size (same aspect
    ratio: resized once, nearest, straight to the generated size); they are prepared like the sampler prepares them
    at the generated size. ``original`` may be uint8, uint16 (a high-depth source) or float, with an alpha channel
    (copied); ``out`` has its dtype and shape. Returns uint8 ``[T,H,W,3]``, written into ``out`` when given;
    ``out`` may be ``original`` itself (each chunk is read before it is overwritten), which saves a full copy
    of the video.

    ``device``: where the work runs, a chunk at a time (mask resizes and morphology, feather, bicubic resize,
    composite); the inputs and ``out`` stay where they are and only uint8/bool chunks travel. At 720p this is
    about 0.3 CPU-seconds a frame on the host otherwise (bench/host_work.py). The same ops run either way, so
    pixels with weight 0 are the original's bit for bit on every device.
    """
    node = "DiffuEraser Blend"
    _check_inputs(original, generated, masks, node, mask_size_free=True)
    feather = check_feather(feather, node)
    if int(mask_dilation) != mask_dilation or mask_dilation < 0:
        raise InputError(f"{node}: mask dilation must be a non-negative integer, got {mask_dilation}")
    if chunk < 1:
        raise InputError(f"{node}: chunk must be >= 1, got {chunk}")
    work = tuple(generated.shape[1:3])
    size = tuple(original.shape[1:3])
    if out is None:
        out = torch.empty_like(original)
    elif out.shape != original.shape or out.dtype != original.dtype:
        raise InputError(
            f"{node}: out must be {str(original.dtype).replace('torch.', '')} {tuple(original.shape)}, got "
            f"{out.dtype} {tuple(out.shape)}"
        )
    for s in range(0, original.shape[0], chunk):
        part_masks, part_generated = masks[s : s + chunk], generated[s : s + chunk]
        part_original = original[s : s + chunk]
        if device is not None:
            part_masks, part_generated = part_masks.to(device), part_generated.to(device)
            part_original = part_original.to(device)
        prepared = prepare_blend_masks(part_masks, work, int(mask_dilation), size)
        alpha = blend_weights(prepared, feather)
        gen = resize_frames(part_generated, size)
        out[s : s + chunk] = _composite(part_original, gen, alpha).to(out.device)
    return out


def blend_images(
    images: torch.Tensor,
    generated: torch.Tensor,
    mask: torch.Tensor,
    mask_dilation: int = DEFAULT_MASK_DILATION,
    feather: int = DEFAULT_FEATHER,
    node: str = "DiffuEraser Blend",
    chunk: int = FRAME_CHUNK,
) -> torch.Tensor:
    """The Blend node: ComfyUI IMAGE ``images`` (float ``[T,H,W,C]``, C = 3 or 4) + ``generated`` IMAGE + MASK ->
    IMAGE of ``images``' dtype and shape.

    Pixels outside the feathered hole are ``images``' own values, bit for bit (no 8-bit rounding, values above 1 or
    below 0 kept, alpha kept); inside, the generated frames (8-bit, resized to the original size) are mixed in float.
    """
    from .masks import broadcast_masks, mask_to_bool
    from .video import image_to_uint8

    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[-1] not in (1, 3, 4):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise InputError(f"{node}: images must be an IMAGE [frames, height, width, 3|4], got {shape}")
    if images.shape[-1] == 1:
        images = images.expand(*images.shape[:3], 3)
    if not images.is_floating_point():
        raise InputError(f"{node}: images must be a float IMAGE, got {images.dtype}")
    bad = sum(int((~torch.isfinite(images[s : s + chunk])).sum()) for s in range(0, images.shape[0], chunk))
    if bad:
        raise InputError(f"{node}: image contains {bad} NaN/inf values")
    gen = image_to_uint8(generated, node=node)
    num = int(images.shape[0])
    if gen.shape[0] != num:
        raise InputError(f"{node}: generated has {gen.shape[0]} frames but images has {num}")
    # kept at its own size (same aspect ratio): resized once, straight to the working size, in blend_video
    holes = broadcast_masks(mask_to_bool(mask, node=node), num, tuple(images.shape[1:3]), node=node, resize=False)
    out = torch.empty(images.shape, dtype=images.dtype)
    for s in range(0, num, chunk):
        out[s : s + chunk] = blend_video(
            images[s : s + chunk].cpu(), gen[s : s + chunk], holes[s : s + chunk], mask_dilation=mask_dilation,
            feather=feather, chunk=chunk,
        )
    return out
