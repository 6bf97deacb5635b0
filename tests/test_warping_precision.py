"""Flow warping in half precision: the sampling grid is built in float32, so fp16/bf16 runs pick the same source
pixels as fp32 (issue 15, item 3).

CPU ``grid_sample`` in half precision is broken upstream (pytorch#127224). The production code never calls it in
half (it samples half inputs on a float32 grid); where a test restates the reference's half-precision grid it goes
through the ``upcast_cpu_half_grid_sample`` fixture, which computes grid_sample in float32 and casts back, so the
grid's own rounding, the thing under test, is kept.
"""

import pytest
import torch
import torch.nn.functional as F

from diffueraser_core.models.propainter import propagate_image
from diffueraser_core.models.warping import flow_warp, sampling_grid

HALF = [torch.float16, torch.bfloat16]
WIDTHS_720P = [1280, 960, 720]  # 720p and the working widths a 720p clip gets at other ratios / max sides


@pytest.fixture
def upcast_cpu_half_grid_sample(monkeypatch):
    """Test harness only: CPU grid_sample in fp16/bf16 computed in float32 and cast back (pytorch#127224)."""
    original = F.grid_sample

    def grid_sample(input, grid, *args, **kwargs):
        if input.device.type == "cpu" and input.dtype in (torch.float16, torch.bfloat16):
            return original(input.float(), grid.float(), *args, **kwargs).to(input.dtype)
        return original(input, grid, *args, **kwargs)

    monkeypatch.setattr(F, "grid_sample", grid_sample)
    return grid_sample


def reference_grid(flow, height, width, dtype):
    """The reference's grid (ProPainter flow_warp): meshgrid cast to the frames' dtype (``type_as(x)``)."""
    grid_y, grid_x = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    grid = torch.stack((grid_x, grid_y), 2).to(dtype) + flow.to(dtype)
    gx = 2.0 * grid[..., 0] / max(width - 1, 1) - 1.0
    gy = 2.0 * grid[..., 1] / max(height - 1, 1) - 1.0
    return torch.stack((gx, gy), dim=3)


def pixel_positions(grid, height, width):
    """Back from grid_sample's [-1, 1] to pixel positions (float64)."""
    g = grid.double()
    return (g[..., 0] + 1) / 2 * (width - 1), (g[..., 1] + 1) / 2 * (height - 1)


def shifted_flow(height, width, dx, dy, dtype):
    flow = torch.empty((1, height, width, 2), dtype=torch.float32)
    flow[..., 0], flow[..., 1] = dx, dy
    return flow.to(dtype)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("width", WIDTHS_720P)
def test_grid_positions_are_exact_at_720p_widths(dtype, width):
    height, dx, dy = 4, 3, 1
    flow = shifted_flow(height, width, dx, dy, dtype)
    grid = sampling_grid(flow, height, width, dtype)
    assert grid.dtype == torch.float32
    px, py = pixel_positions(grid, height, width)
    cols = torch.arange(width, dtype=torch.float64).expand(1, height, width)
    rows = torch.arange(height, dtype=torch.float64).view(1, height, 1).expand(1, height, width)
    assert (px - (cols + dx)).abs().max() < 1e-3
    assert (py - (rows + dy)).abs().max() < 1e-3
    # the reference's grid in bf16 misplaces most positions at these widths (spacing 4 px from 512 on)
    ref_px, _ = pixel_positions(reference_grid(flow, height, width, torch.bfloat16), height, width)
    wrong = ((ref_px - (cols + dx)).abs() >= 0.5).double().mean()
    assert wrong > 0.5
    assert (ref_px - (cols + dx)).abs().max() >= 2


@pytest.mark.parametrize("dtype", HALF)
def test_nearest_warp_in_half_takes_the_fp32_source_pixels(dtype, upcast_cpu_half_grid_sample):
    height, width, dx = 4, 1280, 3
    gen = torch.Generator().manual_seed(0)
    # integer values 0..255 are exact in fp16 and bf16, so any difference is a different source pixel
    x32 = torch.randint(0, 256, (1, 3, height, width), generator=gen).float()
    flow = shifted_flow(height, width, dx, 0, dtype)
    expected = flow_warp(x32, flow.float(), interpolation="nearest")
    assert torch.equal(expected[..., : width - dx], x32[..., dx:])
    got = flow_warp(x32.to(dtype), flow, interpolation="nearest")
    assert got.dtype == dtype
    assert torch.equal(got.float(), expected)
    # the same warp on the reference's half grid: a different source pixel for most pixels in bf16
    ref = F.grid_sample(x32.to(dtype), reference_grid(flow, height, width, dtype), mode="nearest",
                        padding_mode="zeros", align_corners=True)
    differs = (ref.float() != expected).any(dim=1).double().mean()
    if dtype == torch.bfloat16:
        assert differs > 0.5
    else:
        assert differs < 0.5  # fp16 holds these positions to 0.5 px; its misses are a smaller share


@pytest.mark.parametrize("dtype", HALF)
def test_bilinear_warp_in_half_matches_fp32(dtype, upcast_cpu_half_grid_sample):
    height, width = 6, 720
    gen = torch.Generator().manual_seed(1)
    x32 = torch.randint(0, 256, (1, 2, height, width), generator=gen).float()
    flow32 = torch.rand((1, height, width, 2), generator=gen) * 4 - 2
    flow = flow32.to(dtype)
    expected = flow_warp(x32, flow.float())
    got = flow_warp(x32.to(dtype), flow)
    tolerance = 2.0 if dtype == torch.bfloat16 else 0.25  # the output's own rounding at values up to 255
    assert (got.float() - expected).abs().max() <= tolerance


@pytest.mark.parametrize("dtype", HALF)
def test_image_propagation_in_half_fills_as_fp32(dtype, upcast_cpu_half_grid_sample):
    # 3 frames 8x640 moving 2 px right per frame; a hole in the middle frame is filled from its neighbours
    frames_n, height, width, shift = 3, 8, 640, 2
    gen = torch.Generator().manual_seed(2)
    scene = torch.randint(0, 256, (3, height, width + shift * frames_n), generator=gen).float()
    frames = torch.stack([scene[..., shift * (frames_n - i): shift * (frames_n - i) + width] for i in range(frames_n)])
    frames = frames.unsqueeze(0)  # [1,t,3,h,w]
    masks = torch.zeros((1, frames_n, 1, height, width))
    masks[0, 1, :, 2:6, 520:600] = 1  # inside the 512..640 band bf16 cannot place
    forward = torch.zeros((1, frames_n - 1, 2, height, width))
    forward[:, :, 0] = -shift  # frame i -> i+1: content moves right, so sample i+1 at x - shift
    backward = -forward
    expected_frames, expected_masks = propagate_image(frames, forward, backward, masks)
    assert float(expected_masks.sum()) == 0  # everything filled
    got_frames, got_masks = propagate_image(frames.to(dtype), forward.to(dtype), backward.to(dtype), masks.to(dtype))
    assert torch.equal(got_masks.float(), expected_masks)
    assert torch.equal(got_frames.float(), expected_frames)
