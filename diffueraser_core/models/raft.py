"""RAFT optical flow (Teed & Deng 2020), full-size variant, in the layout of ``raft-things.pth``.

ProPainter runs RAFT in fp32, 20 iterations, test mode, on frames already scaled to [-1, 1] (its wrapper feeds them
as they are; RAFT's own 0..255 normalisation is disabled there). The official file is the state dict of an
``nn.DataParallel(RAFT)``: every key starts with ``module.``.

Flow channel 0 is the horizontal (x) displacement, channel 1 the vertical (y) one, in pixels.
"""

from __future__ import annotations

import logging
from typing import Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import InputError, ModelFileError
from .checkpoints import load_state_dict_checked, read_state_dict, strip_prefix

logger = logging.getLogger(__name__)

HIDDEN_DIM = 128  # GRU hidden state channels
CONTEXT_DIM = 128  # context features fed to the GRU at every iteration
CORR_LEVELS = 4  # correlation pyramid levels
CORR_RADIUS = 4  # lookup window radius per level: (2r+1)^2 = 81 samples
FEATURE_DIM = 256  # matching feature channels (fnet output)
DOWNSAMPLE = 8  # flow is estimated at 1/8 resolution and convexly upsampled
DEFAULT_ITERS = 20  # ProPainter's raft_iter default
# The update block scales its upsampling-mask logits by this factor (a training-time gradient balance kept in the
# weights' meaning).
UPSAMPLE_MASK_SCALE = 0.25
DATAPARALLEL_PREFIX = "module."


# ----------------------------------------------------------------------------------------------------------------
# Encoders


def _norm_layer(norm_fn: str, channels: int) -> nn.Module:
    if norm_fn == "batch":
        return nn.BatchNorm2d(channels)
    if norm_fn == "instance":
        return nn.InstanceNorm2d(channels)  # no affine parameters, no running statistics
    if norm_fn == "none":
        return nn.Sequential()
    raise ValueError(f"RAFT: unknown norm_fn {norm_fn!r}")


class ResidualBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, norm_fn: str, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, padding=1, stride=stride)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.norm1 = _norm_layer(norm_fn, planes)
        self.norm2 = _norm_layer(norm_fn, planes)
        if stride == 1:
            self.downsample = None
        else:
            # The checkpoint holds this norm twice (as norm3 and downsample.1): one module under two names.
            self.norm3 = _norm_layer(norm_fn, planes)
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride), self.norm3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.norm1(self.conv1(x)))
        y = self.relu(self.norm2(self.conv2(y)))
        if self.downsample is not None:
            x = self.downsample(x)
        return self.relu(x + y)


class BasicEncoder(nn.Module):
    """7x7/2 stem, three stages of two residual blocks (64, 96/2, 128/2), 1x1 projection: 1/8 resolution."""

    def __init__(self, output_dim: int, norm_fn: str):
        super().__init__()
        self.norm1 = _norm_layer(norm_fn, 64)
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3)
        self.relu1 = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(ResidualBlock(64, 64, norm_fn, 1), ResidualBlock(64, 64, norm_fn, 1))
        self.layer2 = nn.Sequential(ResidualBlock(64, 96, norm_fn, 2), ResidualBlock(96, 96, norm_fn, 1))
        self.layer3 = nn.Sequential(ResidualBlock(96, 128, norm_fn, 2), ResidualBlock(128, 128, norm_fn, 1))
        self.conv2 = nn.Conv2d(128, output_dim, kernel_size=1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.norm1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.conv2(x)


# ----------------------------------------------------------------------------------------------------------------
# Correlation


def _sample_pixels(image: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
    """Bilinear sample ``image [N,C,H,W]`` at pixel coordinates ``xy [N,h,w,2]`` (x, y); zeros outside.

    Same values as the reference's align_corners=True sampler, written so a 1-pixel-wide level stays finite.
    """
    height, width = image.shape[-2:]
    grid = torch.stack(((2 * xy[..., 0] + 1) / width - 1, (2 * xy[..., 1] + 1) / height - 1), dim=-1)
    return F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class CorrBlock:
    """All-pairs correlation pyramid (fp32) and its local lookup around the current correspondences."""

    def __init__(self, fmap1: torch.Tensor, fmap2: torch.Tensor, num_levels: int = CORR_LEVELS,
                 radius: int = CORR_RADIUS):
        self.num_levels = num_levels
        self.radius = radius
        batch, dim, height, width = fmap1.shape
        # The volume is (H*W/64)^2 per pair: compute and keep it in fp32 even under autocast or a half model.
        # (autocast knows no "meta" device: the device simulation runs there, and autocast is off there anyway)
        autocast_device = "cpu" if fmap1.device.type == "meta" else fmap1.device.type
        with torch.autocast(device_type=autocast_device, enabled=False):
            f1 = fmap1.float().reshape(batch, dim, height * width)
            f2 = fmap2.float().reshape(batch, dim, height * width)
            corr = torch.matmul(f1.transpose(1, 2), f2) / (float(dim) ** 0.5)
        corr = corr.reshape(batch * height * width, 1, height, width)
        self.pyramid: List[torch.Tensor] = [corr]
        for _ in range(num_levels - 1):
            corr = F.avg_pool2d(corr, 2, stride=2)
            self.pyramid.append(corr)
        span = torch.linspace(-radius, radius, 2 * radius + 1, device=fmap1.device)
        # Window sample [a, b] sits at (x + span[a], y + span[b]): the x offset is the slower-varying axis of the
        # 81 channels, as in the reference (its meshgrid pairs are added to (x, y) coordinates).
        offset_x, offset_y = torch.meshgrid(span, span, indexing="ij")
        self.window = torch.stack((offset_x, offset_y), dim=-1).view(1, 2 * radius + 1, 2 * radius + 1, 2)

    def __call__(self, coords: torch.Tensor) -> torch.Tensor:
        """coords [B,2,h,w] (x, y) at 1/8 resolution -> features [B, levels*(2r+1)^2, h, w] fp32."""
        batch, _, height, width = coords.shape
        centres = coords.permute(0, 2, 3, 1).reshape(batch * height * width, 1, 1, 2).float()
        levels = []
        for level, corr in enumerate(self.pyramid):
            sampled = _sample_pixels(corr, centres / 2 ** level + self.window)
            levels.append(sampled.view(batch, height, width, -1))
        return torch.cat(levels, dim=-1).permute(0, 3, 1, 2).contiguous()


# ----------------------------------------------------------------------------------------------------------------
# Update block


class FlowHead(nn.Module):
    def __init__(self, input_dim: int = 128, hidden_dim: int = 256):
        super().__init__()
        self.conv1 = nn.Conv2d(input_dim, hidden_dim, 3, padding=1)
        self.conv2 = nn.Conv2d(hidden_dim, 2, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.relu(self.conv1(x)))


class SepConvGRU(nn.Module):
    """Convolutional GRU applied twice: a 1x5 (horizontal) then a 5x1 (vertical) pass."""

    def __init__(self, hidden_dim: int = 128, input_dim: int = 192 + 128):
        super().__init__()
        channels = hidden_dim + input_dim
        self.convz1 = nn.Conv2d(channels, hidden_dim, (1, 5), padding=(0, 2))
        self.convr1 = nn.Conv2d(channels, hidden_dim, (1, 5), padding=(0, 2))
        self.convq1 = nn.Conv2d(channels, hidden_dim, (1, 5), padding=(0, 2))
        self.convz2 = nn.Conv2d(channels, hidden_dim, (5, 1), padding=(2, 0))
        self.convr2 = nn.Conv2d(channels, hidden_dim, (5, 1), padding=(2, 0))
        self.convq2 = nn.Conv2d(channels, hidden_dim, (5, 1), padding=(2, 0))

    @staticmethod
    def _step(h, x, convz, convr, convq):
        hx = torch.cat([h, x], dim=1)
        z = torch.sigmoid(convz(hx))
        r = torch.sigmoid(convr(hx))
        q = torch.tanh(convq(torch.cat([r * h, x], dim=1)))
        return (1 - z) * h + z * q

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        h = self._step(h, x, self.convz1, self.convr1, self.convq1)
        return self._step(h, x, self.convz2, self.convr2, self.convq2)


class BasicMotionEncoder(nn.Module):
    def __init__(self, corr_levels: int = CORR_LEVELS, corr_radius: int = CORR_RADIUS):
        super().__init__()
        corr_planes = corr_levels * (2 * corr_radius + 1) ** 2
        self.convc1 = nn.Conv2d(corr_planes, 256, 1, padding=0)
        self.convc2 = nn.Conv2d(256, 192, 3, padding=1)
        self.convf1 = nn.Conv2d(2, 128, 7, padding=3)
        self.convf2 = nn.Conv2d(128, 64, 3, padding=1)
        self.conv = nn.Conv2d(64 + 192, 128 - 2, 3, padding=1)

    def forward(self, flow: torch.Tensor, corr: torch.Tensor) -> torch.Tensor:
        cor = F.relu(self.convc2(F.relu(self.convc1(corr))))
        flo = F.relu(self.convf2(F.relu(self.convf1(flow))))
        out = F.relu(self.conv(torch.cat([cor, flo], dim=1)))
        return torch.cat([out, flow], dim=1)


class BasicUpdateBlock(nn.Module):
    def __init__(self, hidden_dim: int = HIDDEN_DIM, corr_levels: int = CORR_LEVELS,
                 corr_radius: int = CORR_RADIUS):
        super().__init__()
        self.encoder = BasicMotionEncoder(corr_levels, corr_radius)
        self.gru = SepConvGRU(hidden_dim=hidden_dim, input_dim=128 + hidden_dim)
        self.flow_head = FlowHead(hidden_dim, hidden_dim=256)
        self.mask = nn.Sequential(
            nn.Conv2d(128, 256, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, DOWNSAMPLE * DOWNSAMPLE * 9, 1, padding=0),
        )

    def forward(self, net, inp, corr, flow):
        motion = self.encoder(flow, corr)
        net = self.gru(net, torch.cat([inp, motion], dim=1))
        delta_flow = self.flow_head(net)
        up_mask = UPSAMPLE_MASK_SCALE * self.mask(net)
        return net, up_mask, delta_flow


# ----------------------------------------------------------------------------------------------------------------
# RAFT


def _coords_grid(batch: int, height: int, width: int, device) -> torch.Tensor:
    ys, xs = torch.meshgrid(
        torch.arange(height, device=device, dtype=torch.float32),
        torch.arange(width, device=device, dtype=torch.float32),
        indexing="ij",
    )
    return torch.stack((xs, ys), dim=0)[None].expand(batch, 2, height, width).contiguous()


class RAFT(nn.Module):
    """RAFT (small=False). Images [N,3,H,W] in [-1,1] with H, W multiples of 8."""

    # The reference runs RAFT in fp32 even in its fp16 mode; runtimes honour this (runtime.dtype_for), so every
    # loading path (CLI, nodes, tests) gets it.
    preferred_dtype = torch.float32

    def __init__(self, hidden_dim: int = HIDDEN_DIM, context_dim: int = CONTEXT_DIM,
                 corr_levels: int = CORR_LEVELS, corr_radius: int = CORR_RADIUS):
        super().__init__()
        self.hidden_dim = hidden_dim
        self.context_dim = context_dim
        self.corr_levels = corr_levels
        self.corr_radius = corr_radius
        self.fnet = BasicEncoder(output_dim=FEATURE_DIM, norm_fn="instance")
        self.cnet = BasicEncoder(output_dim=hidden_dim + context_dim, norm_fn="batch")
        self.update_block = BasicUpdateBlock(hidden_dim, corr_levels, corr_radius)

    @staticmethod
    def upsample_flow(flow: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[N,2,h,w] -> [N,2,8h,8w]: each fine pixel is a softmax-weighted mix of the 3x3 coarse neighbourhood."""
        batch, _, height, width = flow.shape
        weights = torch.softmax(mask.view(batch, 1, 9, DOWNSAMPLE, DOWNSAMPLE, height, width), dim=2)
        neighbours = F.unfold(DOWNSAMPLE * flow, [3, 3], padding=1).view(batch, 2, 9, 1, 1, height, width)
        up = torch.sum(weights * neighbours, dim=2)  # [N,2,8,8,h,w]
        return up.permute(0, 1, 4, 2, 5, 3).reshape(batch, 2, DOWNSAMPLE * height, DOWNSAMPLE * width)

    def forward(
        self,
        image1: torch.Tensor,
        image2: torch.Tensor,
        iters: int = DEFAULT_ITERS,
        flow_init: Optional[torch.Tensor] = None,
        test_mode: bool = True,
    ) -> Union[Tuple[torch.Tensor, torch.Tensor], List[torch.Tensor]]:
        """Flow from image1 to image2. test_mode: (flow at 1/8 [N,2,H/8,W/8], upsampled flow [N,2,H,W]) in fp32;
        otherwise the list of upsampled flows after every iteration."""
        if image1.shape != image2.shape or image1.dim() != 4 or image1.shape[1] != 3:
            raise InputError(
                f"RAFT: expected two images [N,3,H,W] of the same shape, got {tuple(image1.shape)} and "
                f"{tuple(image2.shape)}"
            )
        height, width = image1.shape[-2:]
        if height % DOWNSAMPLE or width % DOWNSAMPLE:
            raise InputError(f"RAFT: image size {height}x{width} must be a multiple of {DOWNSAMPLE} on both sides")
        min_side = DOWNSAMPLE * 2 ** (self.corr_levels - 1)
        if min(height, width) < min_side:
            raise InputError(
                f"RAFT: image size {height}x{width} is too small; the correlation pyramid needs at least {min_side} "
                "pixels on each side"
            )
        dtype = self.cnet.conv1.weight.dtype
        image1 = image1.to(dtype).contiguous()
        image2 = image2.to(dtype).contiguous()
        batch = image1.shape[0]

        fmaps = self.fnet(torch.cat([image1, image2], dim=0))
        corr_fn = CorrBlock(fmaps[:batch], fmaps[batch:], self.corr_levels, self.corr_radius)
        del fmaps

        net, inp = torch.split(self.cnet(image1), [self.hidden_dim, self.context_dim], dim=1)
        net = torch.tanh(net)
        inp = torch.relu(inp)

        coords0 = _coords_grid(batch, height // DOWNSAMPLE, width // DOWNSAMPLE, image1.device)
        coords1 = coords0.clone()
        if flow_init is not None:
            coords1 = coords1 + flow_init.float()

        predictions = []
        flow_up = None
        for _ in range(iters):
            coords1 = coords1.detach()
            corr = corr_fn(coords1)
            flow = coords1 - coords0
            net, up_mask, delta_flow = self.update_block(net, inp, corr.to(dtype), flow.to(dtype))
            coords1 = coords1 + delta_flow.float()
            flow_up = self.upsample_flow(coords1 - coords0, up_mask.float())
            if not test_mode:
                predictions.append(flow_up)
        if test_mode:
            if flow_up is None:
                raise InputError(f"RAFT: iters must be at least 1, got {iters}")
            return coords1 - coords0, flow_up
        return predictions


def compute_bidirectional_flow(
    raft: RAFT, frames: torch.Tensor, iters: int = DEFAULT_ITERS
) -> Tuple[torch.Tensor, torch.Tensor]:
    """frames [B,T,3,H,W] in [-1,1] -> (forward flows t->t+1, backward flows t+1->t), each [B,T-1,2,H,W] fp32.

    Same as ProPainter's RAFT_bi: all consecutive pairs of the clip in one batch, no gradients.
    """
    if frames.dim() != 5 or frames.shape[2] != 3 or frames.shape[1] < 2:
        raise InputError(f"RAFT flow: expected frames [B,T>=2,3,H,W], got {tuple(frames.shape)}")
    batch, length, channels, height, width = frames.shape
    with torch.no_grad():
        first = frames[:, :-1].reshape(-1, channels, height, width)
        second = frames[:, 1:].reshape(-1, channels, height, width)
        _, flows_forward = raft(first, second, iters=iters, test_mode=True)
        _, flows_backward = raft(second, first, iters=iters, test_mode=True)
    return (
        flows_forward.view(batch, length - 1, 2, height, width),
        flows_backward.view(batch, length - 1, 2, height, width),
    )


# ----------------------------------------------------------------------------------------------------------------
# Loading


def load_raft(path: str) -> RAFT:
    """Load ``raft-things.pth`` (official DataParallel file unchanged, or without the ``module.`` prefix).

    Returns the model in eval mode (BatchNorm uses the stored running statistics) on the CPU, fp32.
    """
    what = "ProPainter RAFT (raft-things)"
    state_dict = strip_prefix(read_state_dict(path, what=what), DATAPARALLEL_PREFIX)
    model = RAFT()
    load_state_dict_checked(model, state_dict, path, what)
    logger.debug("loaded %s from %s", what, path)
    return model.eval().requires_grad_(False)
