"""DiffuEraser Prepare Mask: the mask is binarised once, with one mask_dilation, and handed to the Prior, the
Sampler and the Blend, so their dilations cannot disagree.

A mask video drawn in any colour works: a pixel is part of the hole when any of its colour channels is above the
threshold. (The reference reads masks as grayscale and keeps any non-zero pixel; ComfyUI's ImageToMask reads one
channel, so a green or blue mask through ImageToMask("red") is an empty hole.)
"""

from __future__ import annotations

import torch

from diffueraser_core.errors import InputError
from diffueraser_core.masks import DEFAULT_MASK_DILATION, MASK_CHUNK, mask_to_bool

from .comfy_io import io
from .common import CATEGORY_ROOT, PreparedMask, PreparedMaskType

#: a channel above this (0..1) marks a hole pixel: robust to the few levels of noise a lossy mask video carries
DEFAULT_MASK_THRESHOLD = 0.5
MAX_MASK_DILATION = 64


def holes_from_mask_image(images: torch.Tensor, threshold: float, node: str) -> torch.Tensor:
    """IMAGE ``[T,H,W,C]`` 0..1 -> bool ``[T,H,W]``: True where any of R, G, B exceeds ``threshold``."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[-1] not in (1, 3, 4):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise InputError(f"{node}: mask_video must be an IMAGE [frames, height, width, 3], got {shape}")
    if not 0.0 <= threshold < 1.0:
        raise InputError(f"{node}: threshold must be in [0, 1), got {threshold}")
    color = images[..., :3]
    out = torch.empty(images.shape[:3], dtype=torch.bool)
    for start in range(0, images.shape[0], MASK_CHUNK):
        chunk = color[start:start + MASK_CHUNK].cpu().float()
        if not bool(torch.isfinite(chunk).all()):
            raise InputError(f"{node}: mask_video contains NaN/inf values")
        out[start:start + MASK_CHUNK] = chunk.amax(dim=-1) > threshold
    return out


class DiffuEraserPrepareMask(io.ComfyNode):
    NODE = "DiffuEraser Prepare Mask"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiffuEraserPrepareMask",
            display_name=cls.NODE,
            category=f"{CATEGORY_ROOT}/mask",
            description=("Turns a mask video (any colour on black) or a MASK into the hole to remove, with the one "
                         "mask_dilation that the ProPainter Prior, the Sampler and the Blend all apply."),
            inputs=[
                io.Image.Input("mask_video", optional=True, tooltip=(
                    "Mask frames as an IMAGE (e.g. GetVideoComponents of the mask video): white, red, green or "
                    "blue on black all work. Connect this or mask.")),
                io.Mask.Input("mask", optional=True, tooltip=(
                    "A MASK (1 = remove): one per frame or a single one, e.g. from LoadImage or a segmentation "
                    "node. Connect this or mask_video.")),
                io.Int.Input("mask_dilation", default=DEFAULT_MASK_DILATION, min=0, max=MAX_MASK_DILATION, step=1,
                             tooltip=("Dilation iterations applied by every node that reads this mask (reference "
                                      "8): ProPainter grows it as a cross, DiffuEraser erodes once then grows it "
                                      "as a square.")),
                io.Float.Input("threshold", default=DEFAULT_MASK_THRESHOLD, min=0.0, max=0.99, step=0.01,
                               tooltip="A pixel is part of the hole when a colour channel (or the MASK value) "
                                       "is above this."),
            ],
            outputs=[
                PreparedMaskType.Output(display_name="prepared_mask", tooltip=(
                    "For the mask input of the ProPainter Prior, the Sampler and the Blend.")),
                io.Mask.Output(display_name="mask", tooltip="The binarised hole (before dilation), to preview."),
            ],
        )

    @classmethod
    def execute(cls, mask_dilation, threshold, mask_video=None, mask=None):
        if (mask_video is None) == (mask is None):
            raise InputError(
                f"{cls.NODE}: connect exactly one of mask_video and mask (got "
                f"mask_video={'set' if mask_video is not None else 'None'}, "
                f"mask={'set' if mask is not None else 'None'})"
            )
        if not 0 <= int(mask_dilation) <= MAX_MASK_DILATION:
            raise InputError(f"{cls.NODE}: mask_dilation must be in 0..{MAX_MASK_DILATION}, got {mask_dilation}")
        if mask_video is not None:
            holes = holes_from_mask_image(mask_video, float(threshold), cls.NODE)
        else:
            holes = mask_to_bool(mask, node=cls.NODE, threshold=float(threshold))
        if not bool(holes.any()):
            raise InputError(f"{cls.NODE}: the mask is empty (no pixel above threshold {threshold}); nothing to "
                             "remove")
        return io.NodeOutput(PreparedMask(holes=holes, dilation=int(mask_dilation)), holes.float())
