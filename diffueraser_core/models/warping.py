"""Backward warping with optical flow and the forward/backward flow consistency check (ProPainter conventions).

Flows are in pixels, channel 0 = horizontal (x) displacement, channel 1 = vertical (y). ``flow_warp`` samples
``x`` at ``p + flow(p)``: warping frame i+1 with the forward flow i -> i+1 brings it onto frame i.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import InputError

# ProPainter's thresholds for "the forward flow and the warped backward flow cancel out" (fbConsistencyCheck):
# |f + b(f)|^2 < CONSISTENCY_ALPHA1 * (|f|^2 + |b(f)|^2) + CONSISTENCY_ALPHA2.
CONSISTENCY_ALPHA1 = 0.01
CONSISTENCY_ALPHA2 = 0.5


#: dtypes whose sampling grids are built in float32 instead (see ``sampling_grid``)
HALF_DTYPES = (torch.float16, torch.bfloat16)


def sampling_grid(flow: torch.Tensor, height: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    """``grid_sample``'s grid ``[n,h,w,2]`` for sampling at ``p + flow(p)``, normalised with align_corners spacing.

    Built in ``dtype``, except that a half ``dtype`` gets a float32 grid: bf16 holds pixel positions 512..1024
    only 4 pixels apart (fp16: 0.5 pixels; and the normalised coordinates lose more), so nearest-mode
    propagation would take another source pixel for most pixels of a 720p frame. The reference builds it in the
    frames' dtype (fp16 on GPU); this is a deliberate divergence (docs/divergences.md).
    """
    grid_dtype = torch.float32 if dtype in HALF_DTYPES else dtype
    rows = torch.arange(height, device=flow.device)
    cols = torch.arange(width, device=flow.device)
    grid_y, grid_x = torch.meshgrid(rows, cols, indexing="ij")
    base_grid = torch.stack((grid_x, grid_y), dim=2).to(grid_dtype)  # [h, w, 2] in (x, y) order
    target = base_grid + flow.to(grid_dtype)
    # grid_sample wants coordinates in [-1, 1]; the reference normalises with align_corners=True spacing.
    norm_x = 2.0 * target[..., 0] / max(width - 1, 1) - 1.0
    norm_y = 2.0 * target[..., 1] / max(height - 1, 1) - 1.0
    return torch.stack((norm_x, norm_y), dim=3)


def flow_warp(
    x: torch.Tensor,
    flow: torch.Tensor,
    interpolation: str = "bilinear",
    padding_mode: str = "zeros",
    align_corners: bool = True,
) -> torch.Tensor:
    """Warp ``x [n,c,h,w]`` with ``flow [n,h,w,2]`` (pixels, last dim = (dx, dy)); returns ``[n,c,h,w]``.

    Samples outside the image follow ``padding_mode``; ``interpolation`` is ``"bilinear"`` or ``"nearest"``.
    Half-precision ``x`` is sampled on a float32 grid (``sampling_grid``) and the result cast back to its dtype.
    """
    if x.dim() != 4 or flow.dim() != 4 or flow.shape[-1] != 2:
        raise InputError(
            f"flow_warp: expected x [n,c,h,w] and flow [n,h,w,2], got x {tuple(x.shape)} and flow {tuple(flow.shape)}"
        )
    if x.shape[-2:] != flow.shape[1:3]:
        raise InputError(
            f"flow_warp: spatial size of x {tuple(x.shape[-2:])} differs from the flow's {tuple(flow.shape[1:3])}"
        )
    height, width = x.shape[-2:]
    grid = sampling_grid(flow, height, width, x.dtype)
    # grid_sample needs input and grid in one dtype: half inputs are sampled in float32 (nearest picks the same
    # value; bilinear weights are computed in float32) and cast back
    out = F.grid_sample(
        x.to(grid.dtype), grid, mode=interpolation, padding_mode=padding_mode, align_corners=align_corners
    )
    return out.to(x.dtype)


def _squared_norm(flow: torch.Tensor) -> torch.Tensor:
    return torch.sum(torch.square(flow), dim=1, keepdim=True)


def fb_consistency_check(
    flow_fw: torch.Tensor,
    flow_bw: torch.Tensor,
    alpha1: float = CONSISTENCY_ALPHA1,
    alpha2: float = CONSISTENCY_ALPHA2,
) -> torch.Tensor:
    """Where ``flow_fw [n,2,h,w]`` is trustworthy: 1 where following it and then ``flow_bw`` returns to the start.

    Returns ``[n,1,h,w]`` in the flows' dtype (1 = consistent, 0 = occluded/unreliable), as ProPainter's
    propagation uses it.
    """
    flow_bw_warped = flow_warp(flow_bw, flow_fw.permute(0, 2, 3, 1))
    round_trip = flow_fw + flow_bw_warped
    threshold = alpha1 * (_squared_norm(flow_fw) + _squared_norm(flow_bw_warped)) + alpha2
    return (_squared_norm(round_trip) < threshold).to(flow_fw)
