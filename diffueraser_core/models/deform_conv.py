"""Modulated deformable convolution (DCNv2), as ``torchvision.ops.deform_conv2d`` computes it.

ProPainter's flow completion and transformer networks call torchvision's op. torchvision is optional here: when it
imports and its op runs, it is used (fast CUDA kernel); otherwise a pure-torch implementation gives the same result
from one ``grid_sample`` over all offset groups and kernel taps followed by a matmul with the weight.

Semantics (identical to torchvision):
* ``offset`` has ``2 * offset_groups * kh * kw`` channels; for group ``g`` and tap ``k = ki * kw + kj`` the
  channels ``g*2*kh*kw + 2*k`` and ``+1`` hold ``(dy, dx)``.
* ``mask`` has ``offset_groups * kh * kw`` channels (channel ``g*kh*kw + k``); ``None`` means all ones.
* Tap ``(ki, kj)`` of output pixel ``(i, j)`` samples the input at
  ``(i*stride - pad + ki*dil + dy, j*stride - pad + kj*dil + dx)`` by bilinear interpolation, zeros outside.
* Input channels are split evenly over offset groups; the weight may itself be grouped
  (``weight.shape[1] = in_channels / groups``).
"""

from __future__ import annotations

import logging
import math
import os
from typing import Dict, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import InputError

logger = logging.getLogger(__name__)

NO_TORCHVISION_ENV = "DIFFUERASER_NO_TORCHVISION"
# Largest column buffer (sampled input, elements) built at once by the pure path; bigger outputs go row chunk by
# row chunk. 2**27 float32 elements = 512 MiB.
MAX_COLUMN_ELEMENTS = 2 ** 27

IntPair = Union[int, Tuple[int, int]]

_torchvision_ok: Dict[str, bool] = {}


def _pair(value: IntPair, name: str) -> Tuple[int, int]:
    if isinstance(value, int):
        return value, value
    pair = tuple(int(v) for v in value)
    if len(pair) != 2:
        raise InputError(f"deform_conv2d: {name} must be an int or a pair, got {value!r}")
    return pair  # type: ignore[return-value]


def _torchvision_usable(device: torch.device) -> bool:
    """Probe torchvision's op once per device type (import or kernel may be missing/broken)."""
    if os.environ.get(NO_TORCHVISION_ENV, "") not in ("", "0"):
        return False
    key = device.type
    if key not in _torchvision_ok:
        _torchvision_ok[key] = _probe_torchvision(device)
    return _torchvision_ok[key]


def _probe_torchvision(device: torch.device) -> bool:
    try:
        from torchvision.ops import deform_conv2d as tv_deform_conv2d
    except (ImportError, RuntimeError, AttributeError, OSError) as exc:
        logger.debug("torchvision deform_conv2d unavailable (%s); using the pure torch implementation", exc)
        return False
    try:
        x = torch.ones(1, 1, 3, 3, device=device)
        weight = torch.ones(1, 1, 1, 1, device=device)
        offset = torch.zeros(1, 2, 3, 3, device=device)
        out = tv_deform_conv2d(x, offset, weight, mask=torch.ones(1, 1, 3, 3, device=device))
        ok = bool(torch.allclose(out, x))
    except (RuntimeError, NotImplementedError, TypeError) as exc:
        logger.debug("torchvision deform_conv2d does not run on %s (%s); using pure torch", device, exc)
        return False
    if not ok:
        logger.warning("torchvision deform_conv2d gave a wrong probe result on %s; using pure torch", device)
    return ok


def deform_conv2d(
    input: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Modulated deformable conv v2 with torchvision's signature; torchvision when usable, else pure torch."""
    if _torchvision_usable(input.device):
        from torchvision.ops import deform_conv2d as tv_deform_conv2d

        return tv_deform_conv2d(
            input, offset, weight, bias, stride=_pair(stride, "stride"), padding=_pair(padding, "padding"),
            dilation=_pair(dilation, "dilation"), mask=mask,
        )
    return deform_conv2d_torch(input, offset, weight, bias, stride, padding, dilation, mask)


def deform_conv2d_torch(
    input: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Pure torch modulated deformable conv v2 (see the module docstring for the layout).

    Sampling is done in float32 whatever the input dtype (pixel coordinates lose sub-pixel precision in fp16); the
    result has the input's dtype.
    """
    stride_h, stride_w = _pair(stride, "stride")
    pad_h, pad_w = _pair(padding, "padding")
    dil_h, dil_w = _pair(dilation, "dilation")
    if input.dim() != 4 or weight.dim() != 4:
        raise InputError(
            f"deform_conv2d: input and weight must be 4-D, got {tuple(input.shape)} and {tuple(weight.shape)}"
        )
    batch, in_channels, height, width = input.shape
    out_channels, channels_per_weight_group, kernel_h, kernel_w = weight.shape
    taps = kernel_h * kernel_w
    out_h = (height + 2 * pad_h - dil_h * (kernel_h - 1) - 1) // stride_h + 1
    out_w = (width + 2 * pad_w - dil_w * (kernel_w - 1) - 1) // stride_w + 1
    if out_h <= 0 or out_w <= 0:
        raise InputError(f"deform_conv2d: input {height}x{width} is too small for the kernel {kernel_h}x{kernel_w}")

    if channels_per_weight_group <= 0 or in_channels % channels_per_weight_group:
        raise InputError(
            f"deform_conv2d: input has {in_channels} channels, not a multiple of weight.shape[1]="
            f"{channels_per_weight_group}"
        )
    weight_groups = in_channels // channels_per_weight_group
    if out_channels % weight_groups:
        raise InputError(f"deform_conv2d: {out_channels} output channels not divisible by {weight_groups} groups")
    if offset.dim() != 4 or offset.shape[1] % (2 * taps) or offset.shape[1] == 0:
        raise InputError(
            f"deform_conv2d: offset {tuple(offset.shape)} must have 2*offset_groups*{taps} channels"
        )
    offset_groups = offset.shape[1] // (2 * taps)
    if in_channels % offset_groups:
        raise InputError(
            f"deform_conv2d: {in_channels} input channels not divisible by {offset_groups} offset groups"
        )
    if tuple(offset.shape) != (batch, 2 * offset_groups * taps, out_h, out_w):
        raise InputError(
            f"deform_conv2d: offset shape {tuple(offset.shape)} does not match the output "
            f"{(batch, 2 * offset_groups * taps, out_h, out_w)}"
        )
    if mask is not None and tuple(mask.shape) != (batch, offset_groups * taps, out_h, out_w):
        raise InputError(
            f"deform_conv2d: mask shape {tuple(mask.shape)} must be {(batch, offset_groups * taps, out_h, out_w)}"
        )

    out_dtype = input.dtype
    compute_dtype = torch.float32 if input.dtype in (torch.float16, torch.bfloat16) else input.dtype
    # [B*G, C/G, H, W]: every offset group samples its own channel slice in one grid_sample call.
    grouped_input = input.to(compute_dtype).reshape(batch * offset_groups, in_channels // offset_groups, height, width)
    weight_matrix = weight.to(compute_dtype).reshape(
        weight_groups, out_channels // weight_groups, channels_per_weight_group * taps
    )

    columns_per_row = batch * in_channels * taps * out_w
    rows_per_chunk = max(1, min(out_h, MAX_COLUMN_ELEMENTS // max(1, columns_per_row)))
    tap_y = (torch.arange(kernel_h, device=input.device, dtype=compute_dtype) * dil_h).repeat_interleave(kernel_w)
    tap_x = (torch.arange(kernel_w, device=input.device, dtype=compute_dtype) * dil_w).repeat(kernel_h)

    outputs = []
    for row_start in range(0, out_h, rows_per_chunk):
        row_end = min(out_h, row_start + rows_per_chunk)
        rows = row_end - row_start
        off = offset[:, :, row_start:row_end].to(compute_dtype).reshape(batch * offset_groups, taps, 2, rows, out_w)
        base_y = torch.arange(row_start, row_end, device=input.device, dtype=compute_dtype) * stride_h - pad_h
        base_x = torch.arange(out_w, device=input.device, dtype=compute_dtype) * stride_w - pad_w
        sample_y = base_y.view(1, 1, rows, 1) + tap_y.view(1, taps, 1, 1) + off[:, :, 0]
        sample_x = base_x.view(1, 1, 1, out_w) + tap_x.view(1, taps, 1, 1) + off[:, :, 1]
        # align_corners=False maps pixel coordinate p to (2p+1)/size-1; with zeros padding a corner outside the
        # image contributes 0, exactly torchvision's bilinear rule (also for size 1).
        grid = torch.stack(((2 * sample_x + 1) / width - 1, (2 * sample_y + 1) / height - 1), dim=-1)
        sampled = F.grid_sample(
            grouped_input, grid.reshape(batch * offset_groups, taps * rows, out_w, 2),
            mode="bilinear", padding_mode="zeros", align_corners=False,
        )  # [B*G, C/G, taps*rows, out_w]
        sampled = sampled.view(batch * offset_groups, in_channels // offset_groups, taps, rows * out_w)
        if mask is not None:
            modulation = mask[:, :, row_start:row_end].to(compute_dtype)
            sampled.mul_(modulation.reshape(batch * offset_groups, 1, taps, rows * out_w))
        columns = sampled.reshape(batch, weight_groups, channels_per_weight_group * taps, rows * out_w)
        out = torch.matmul(weight_matrix.unsqueeze(0), columns)  # [B, wg, O/wg, rows*out_w]
        outputs.append(out.reshape(batch, out_channels, rows, out_w))
    result = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)
    if bias is not None:
        result = result + bias.to(compute_dtype).view(1, -1, 1, 1)
    return result.to(out_dtype)


class ModulatedDeformConv2d(nn.Module):
    """DCNv2 layer holding ``weight [out, in/groups, kh, kw]`` and ``bias [out]`` under the reference names.

    Subclasses (ProPainter's deformable alignment modules) compute offsets and masks and call ``forward``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair,
        stride: IntPair = 1,
        padding: IntPair = 0,
        dilation: IntPair = 1,
        groups: int = 1,
        deform_groups: int = 1,
        bias: bool = True,
    ):
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise InputError(
                f"ModulatedDeformConv2d: channels {in_channels}->{out_channels} not divisible by groups={groups}"
            )
        if in_channels % deform_groups:
            raise InputError(
                f"ModulatedDeformConv2d: {in_channels} input channels not divisible by deform_groups={deform_groups}"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = stride
        self.padding = padding
        self.dilation = dilation
        self.groups = groups
        self.deform_groups = deform_groups
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Same initialisation as the reference: uniform(+-1/sqrt(fan_in over all input channels)), zero bias.
        fan_in = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        bound = 1.0 / math.sqrt(fan_in)
        with torch.no_grad():
            self.weight.uniform_(-bound, bound)
            if self.bias is not None:
                self.bias.zero_()

    def forward(self, x: torch.Tensor, offset: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        return deform_conv2d(x, offset, self.weight, self.bias, self.stride, self.padding, self.dilation, mask)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
            f"deform_groups={self.deform_groups}, bias={self.bias is not None}"
        )
