"""Modulated deformable conv v2: pure torch path against a slow per-pixel loop, and against torchvision on CUDA."""

import math
import sys
import types

import pytest
import torch

from diffueraser_core.errors import InputError
from diffueraser_core.models import deform_conv
from diffueraser_core.models.deform_conv import ModulatedDeformConv2d, deform_conv2d, deform_conv2d_torch


def _bilinear_zero_outside(image, y, x):
    """image [C,H,W]; value at real (y, x); corners outside the image count as 0 (torchvision's rule)."""
    channels, height, width = image.shape
    if y <= -1 or y >= height or x <= -1 or x >= width:
        return torch.zeros(channels, dtype=image.dtype)
    y0, x0 = math.floor(y), math.floor(x)
    total = torch.zeros(channels, dtype=image.dtype)
    for cy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
        for cx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
            if 0 <= cy < height and 0 <= cx < width:
                total += wy * wx * image[:, cy, cx]
    return total


def _loop_deform_conv(input, offset, weight, bias, stride, padding, dilation, mask):
    batch, in_channels, _, _ = input.shape
    out_channels, per_weight_group, kernel_h, kernel_w = weight.shape
    weight_groups = in_channels // per_weight_group
    out_per_group = out_channels // weight_groups
    taps = kernel_h * kernel_w
    offset_groups = offset.shape[1] // (2 * taps)
    per_offset_group = in_channels // offset_groups
    out_h, out_w = offset.shape[2:]
    out = torch.zeros(batch, out_channels, out_h, out_w, dtype=torch.float64)
    for b in range(batch):
        for i in range(out_h):
            for j in range(out_w):
                for ki in range(kernel_h):
                    for kj in range(kernel_w):
                        k = ki * kernel_w + kj
                        for g in range(offset_groups):
                            dy = offset[b, g * 2 * taps + 2 * k, i, j].item()
                            dx = offset[b, g * 2 * taps + 2 * k + 1, i, j].item()
                            y = i * stride[0] - padding[0] + ki * dilation[0] + dy
                            x = j * stride[1] - padding[1] + kj * dilation[1] + dx
                            channels = slice(g * per_offset_group, (g + 1) * per_offset_group)
                            value = _bilinear_zero_outside(input[b, channels].double(), y, x)
                            if mask is not None:
                                value = value * mask[b, g * taps + k, i, j].item()
                            for c_local in range(per_offset_group):
                                c = g * per_offset_group + c_local
                                wg = c // per_weight_group
                                outs = slice(wg * out_per_group, (wg + 1) * out_per_group)
                                out[b, outs, i, j] += weight[outs, c - wg * per_weight_group, ki, kj].double() * value[
                                    c_local
                                ]
    if bias is not None:
        out += bias.double().view(1, -1, 1, 1)
    return out


def _case(seed, batch, in_channels, out_channels, size, kernel, stride, padding, dilation, offset_groups,
          weight_groups=1, offset_scale=3.0, with_mask=True):
    gen = torch.Generator().manual_seed(seed)
    height, width = size
    out_h = (height + 2 * padding[0] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    out_w = (width + 2 * padding[1] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    taps = kernel[0] * kernel[1]
    x = torch.randn(batch, in_channels, height, width, generator=gen)
    weight = torch.randn(out_channels, in_channels // weight_groups, *kernel, generator=gen)
    bias = torch.randn(out_channels, generator=gen)
    # Large offsets send many taps fully outside the image and onto its border.
    offset = torch.randn(batch, 2 * offset_groups * taps, out_h, out_w, generator=gen) * offset_scale
    mask = torch.rand(batch, offset_groups * taps, out_h, out_w, generator=gen) if with_mask else None
    return x, offset, weight, bias, mask


CASES = [
    # seed, batch, in, out, (h, w), kernel, stride, padding, dilation, offset groups, weight groups
    (0, 1, 4, 3, (5, 6), (3, 3), (1, 1), (1, 1), (1, 1), 1, 1),
    (1, 2, 8, 4, (6, 5), (3, 3), (1, 1), (1, 1), (1, 1), 4, 1),
    (2, 1, 6, 4, (7, 7), (3, 2), (2, 1), (0, 2), (1, 2), 3, 2),
    (3, 1, 4, 2, (6, 8), (3, 3), (2, 2), (2, 1), (2, 1), 2, 1),
    (4, 1, 2, 2, (1, 4), (1, 3), (1, 1), (0, 1), (1, 1), 2, 1),
]


@pytest.mark.parametrize("case", CASES)
def test_pure_path_matches_loop(case):
    seed, batch, cin, cout, size, kernel, stride, padding, dilation, groups, wgroups = case
    x, offset, weight, bias, mask = _case(seed, batch, cin, cout, size, kernel, stride, padding, dilation, groups,
                                          wgroups)
    got = deform_conv2d_torch(x, offset, weight, bias, stride, padding, dilation, mask)
    expected = _loop_deform_conv(x, offset, weight, bias, stride, padding, dilation, mask)
    assert got.shape == expected.shape
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_integer_offsets_without_mask_shift_the_input():
    # An offset of exactly (+1, -2) with a 1x1 kernel reads the pixel one row down, two columns left.
    x = torch.arange(2 * 5 * 6, dtype=torch.float32).view(1, 2, 5, 6)
    weight = torch.eye(2).view(2, 2, 1, 1)
    offset = torch.zeros(1, 2, 5, 6)
    offset[:, 0] = 1.0
    offset[:, 1] = -2.0
    got = deform_conv2d_torch(x, offset, weight)
    expected = torch.zeros_like(x)
    expected[:, :, :4, 2:] = x[:, :, 1:, :4]
    torch.testing.assert_close(got, expected)


def test_zero_offset_unit_mask_equals_conv2d():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 6, 9, 7, generator=gen)
    weight = torch.randn(4, 3, 3, 3, generator=gen)
    bias = torch.randn(4, generator=gen)
    expected = torch.nn.functional.conv2d(x, weight, bias, stride=2, padding=1, dilation=1, groups=2)
    offset = torch.zeros(2, 2 * 3 * 9, *expected.shape[2:])
    got = deform_conv2d_torch(x, offset, weight, bias, stride=2, padding=1, mask=None)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_row_chunking_gives_same_result(monkeypatch):
    x, offset, weight, bias, mask = _case(7, 2, 8, 5, (9, 7), (3, 3), (1, 1), (1, 1), (1, 1), 2)
    whole = deform_conv2d_torch(x, offset, weight, bias, 1, 1, 1, mask)
    monkeypatch.setattr(deform_conv, "MAX_COLUMN_ELEMENTS", 1)  # one output row per chunk
    chunked = deform_conv2d_torch(x, offset, weight, bias, 1, 1, 1, mask)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-6)


def test_half_input_keeps_dtype_and_is_close():
    x, offset, weight, bias, mask = _case(8, 1, 4, 4, (6, 6), (3, 3), (1, 1), (1, 1), (1, 1), 2)
    full = deform_conv2d_torch(x, offset, weight, bias, 1, 1, 1, mask)
    half = deform_conv2d_torch(x.bfloat16(), offset.bfloat16(), weight.bfloat16(), bias.bfloat16(), 1, 1, 1,
                               mask.bfloat16())
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), full, rtol=0.05, atol=0.3)


def test_dispatch_without_torchvision_uses_pure_path(monkeypatch):
    monkeypatch.setenv(deform_conv.NO_TORCHVISION_ENV, "1")
    x, offset, weight, bias, mask = _case(9, 1, 4, 2, (5, 5), (3, 3), (1, 1), (1, 1), (1, 1), 2)
    torch.testing.assert_close(
        deform_conv2d(x, offset, weight, bias, 1, 1, 1, mask),
        deform_conv2d_torch(x, offset, weight, bias, 1, 1, 1, mask),
        rtol=0, atol=0,
    )


def _fake_torchvision(monkeypatch, op):
    package = types.ModuleType("torchvision")
    ops = types.ModuleType("torchvision.ops")
    ops.deform_conv2d = op
    package.ops = ops
    monkeypatch.setitem(sys.modules, "torchvision", package)
    monkeypatch.setitem(sys.modules, "torchvision.ops", ops)
    monkeypatch.setattr(deform_conv, "_torchvision_ok", {})
    monkeypatch.delenv(deform_conv.NO_TORCHVISION_ENV, raising=False)


def test_dispatch_uses_a_working_torchvision_and_skips_a_broken_one(monkeypatch):
    x, offset, weight, bias, mask = _case(11, 1, 4, 2, (5, 5), (3, 3), (1, 1), (1, 1), (1, 1), 2)
    expected = deform_conv2d_torch(x, offset, weight, bias, 1, 1, 1, mask)
    calls = []

    def working(*args, **kwargs):
        calls.append(kwargs)
        return deform_conv2d_torch(*args, **kwargs)

    _fake_torchvision(monkeypatch, working)
    torch.testing.assert_close(deform_conv2d(x, offset, weight, bias, 1, 1, 1, mask), expected)
    assert len(calls) == 2 and calls[-1]["padding"] == (1, 1)  # the probe, then the real call
    monkeypatch.setenv(deform_conv.NO_TORCHVISION_ENV, "1")
    deform_conv2d(x, offset, weight, bias, 1, 1, 1, mask)
    assert len(calls) == 2

    def broken(*args, **kwargs):
        raise RuntimeError("Could not run 'torchvision::deform_conv2d' with arguments from the 'CPU' backend")

    _fake_torchvision(monkeypatch, broken)
    torch.testing.assert_close(deform_conv2d(x, offset, weight, bias, 1, 1, 1, mask), expected)
    assert deform_conv._torchvision_ok == {"cpu": False}


def test_module_parameters_and_forward(monkeypatch):
    monkeypatch.setenv(deform_conv.NO_TORCHVISION_ENV, "1")
    torch.manual_seed(0)
    layer = ModulatedDeformConv2d(8, 4, 3, padding=1, deform_groups=2)
    assert {k: tuple(v.shape) for k, v in layer.state_dict().items()} == {"weight": (4, 8, 3, 3), "bias": (4,)}
    assert torch.all(layer.bias == 0) and layer.weight.abs().max() <= 1 / math.sqrt(8 * 9)
    no_bias = ModulatedDeformConv2d(8, 4, 3, groups=2, bias=False)
    assert list(no_bias.state_dict()) == ["weight"] and no_bias.weight.shape == (4, 4, 3, 3)
    x = torch.randn(1, 8, 6, 6)
    offset = torch.randn(1, 36, 6, 6)
    mask = torch.rand(1, 18, 6, 6)
    out = layer(x, offset, mask)
    torch.testing.assert_close(out, deform_conv2d_torch(x, offset, layer.weight, layer.bias, 1, 1, 1, mask))


@pytest.mark.parametrize(
    "offset_shape, mask_shape, match",
    [
        ((1, 17, 4, 4), None, "offset"),
        ((1, 18, 3, 4), None, "offset shape"),
        ((1, 18, 4, 4), (1, 8, 4, 4), "mask shape"),
        ((1, 54, 4, 4), None, "offset groups"),
    ],
)
def test_bad_shapes_raise_clear_errors(offset_shape, mask_shape, match):
    x = torch.randn(1, 4, 4, 4)
    weight = torch.randn(2, 4, 3, 3)
    mask = torch.rand(mask_shape) if mask_shape else None
    with pytest.raises(InputError, match=match):
        deform_conv2d_torch(x, torch.zeros(offset_shape), weight, padding=1, mask=mask)


def _torchvision_cuda_available():
    if not torch.cuda.is_available():
        return False
    try:
        import torchvision.ops  # noqa: F401
    except (ImportError, RuntimeError, OSError, AttributeError):
        return False
    return True


@pytest.mark.gpu
@pytest.mark.skipif(not _torchvision_cuda_available(), reason="needs CUDA and a working torchvision")
@pytest.mark.parametrize("case", CASES + [(10, 2, 256, 128, (24, 40), (3, 3), (1, 1), (1, 1), (1, 1), 16, 1)])
def test_pure_path_matches_torchvision_on_cuda(case):
    from torchvision.ops import deform_conv2d as tv_deform_conv2d

    seed, batch, cin, cout, size, kernel, stride, padding, dilation, groups, wgroups = case
    tensors = _case(seed, batch, cin, cout, size, kernel, stride, padding, dilation, groups, wgroups)
    x, offset, weight, bias, mask = (t.cuda() for t in tensors)
    expected = tv_deform_conv2d(x, offset, weight, bias, stride, padding, dilation, mask)
    got = deform_conv2d_torch(x, offset, weight, bias, stride, padding, dilation, mask)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(deform_conv2d(x, offset, weight, bias, stride, padding, dilation, mask), expected,
                               rtol=1e-4, atol=1e-3)
