"""ProPainter's InpaintGenerator (ProPainter.pth) in pure torch.

Same state-dict layout and math as the reference ``InpaintGenerator``: a strided conv encoder (1/4 resolution),
flow-guided feature propagation with second-order deformable alignment over the local frames, soft split into
overlapping 7x7 tokens, 8 temporal sparse transformer blocks (window attention; windows touching the hole also
attend to rolled neighbour windows and pooled global tokens), soft composition and an upsampling decoder. The
non-learned image propagation (``img_propagation``) that ProPainter runs before the network lives here as well.

Layouts: frames ``[b,t,3,H,W]`` in [-1,1], masks ``[b,t,1,H,W]`` with 1 = hole, flows ``[b,t-1,2,H,W]`` in pixels
(forward i -> i+1, backward i+1 -> i). H and W must be multiples of 4.
"""

from __future__ import annotations

import logging
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import InputError
from .checkpoints import load_state_dict_checked, read_state_dict, strip_prefix
from .deform_conv import ModulatedDeformConv2d
from .warping import fb_consistency_check, flow_warp

logger = logging.getLogger(__name__)

# Reference hyper-parameters (model/propainter.py, InpaintGenerator.__init__).
FEATURE_CHANNELS = 128
HIDDEN_DIM = 512
NUM_HEADS = 4
TRANSFORMER_DEPTH = 8
WINDOW_SIZE = (5, 9)
POOL_SIZE = (4, 4)
TOKEN_KERNEL = (7, 7)
TOKEN_STRIDE = (3, 3)
TOKEN_PADDING = (3, 3)
FFN_HIDDEN_DIM = 1960  # = 40 * 7 * 7, so the fused feed-forward can fold its hidden features back onto the grid
ENCODER_DOWNSCALE = 4
DEFORM_GROUPS = 16
# Bound on the learned offset residual added to the optical flow in the feature propagation's deformable alignment.
MAX_RESIDUE_MAGNITUDE = 3.0
# Image propagation re-binarises warped masks at this level (BidirectionalPropagation.binary_mask).
MASK_BINARIZE_THRESHOLD = 0.1
LEAKY_SLOPE_ENCODER = 0.2
LEAKY_SLOPE_OFFSET = 0.1
INIT_STD = 0.02  # BaseNetwork.init_weights('normal', gain=0.02)

_PROPAGATION_DIRECTIONS = ("backward_1", "forward_1")


def _propagation_order(direction: str, num_frames: int):
    """Yield ``(frame index, flow index or None)`` in the order the reference visits frames.

    Backward propagation walks from the last frame to the first and warps with the forward flow ``idx -> idx+1``;
    forward propagation walks first to last and warps with the backward flow ``idx -> idx-1`` (stored at idx-1).
    The first visited frame has nothing to propagate from (flow index None).
    """
    if direction.startswith("backward"):
        for step, idx in enumerate(reversed(range(num_frames))):
            yield idx, (None if step == 0 else idx)
    else:
        for idx in range(num_frames):
            yield idx, (None if idx == 0 else idx - 1)


def _binarize(mask: torch.Tensor) -> torch.Tensor:
    return (mask > MASK_BINARIZE_THRESHOLD).to(mask.dtype)


def _leaky(slope: float) -> nn.LeakyReLU:
    return nn.LeakyReLU(negative_slope=slope, inplace=True)


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, groups=groups)


# ---------------------------------------------------------------------------------------------------------------
# Image propagation (no weights)
# ---------------------------------------------------------------------------------------------------------------
def propagate_image(
    frames: torch.Tensor,
    flows_forward: torch.Tensor,
    flows_backward: torch.Tensor,
    masks: torch.Tensor,
    interpolation: str = "nearest",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fill hole pixels by warping known pixels along the flows, backward pass then forward pass.

    ``frames [b,t,c,H,W]``, flows ``[b,t-1,2,H,W]``, ``masks [b,t,1,H,W]`` (1 = hole). A hole pixel takes the
    warped value where the flow is forward/backward consistent and the warped source is itself known; the mask is
    cleared there. Returns ``(frames, masks)`` after the forward pass, same shapes; pixels with mask 0 are kept.
    """
    num_frames = frames.shape[1]
    source_frames = [frames[:, i] for i in range(num_frames)]
    source_masks = [masks[:, i] for i in range(num_frames)]
    for direction in _PROPAGATION_DIRECTIONS:
        if direction.startswith("backward"):
            prop_flows, check_flows = flows_forward, flows_backward
        else:
            prop_flows, check_flows = flows_backward, flows_forward
        out_frames: List[Optional[torch.Tensor]] = [None] * num_frames
        out_masks: List[Optional[torch.Tensor]] = [None] * num_frames
        frame_prop = mask_prop = None
        for idx, flow_idx in _propagation_order(direction, num_frames):
            frame_current, mask_current = source_frames[idx], source_masks[idx]
            if flow_idx is None:
                frame_prop, mask_prop = frame_current, mask_current
            else:
                flow = prop_flows[:, flow_idx]
                flow_valid = fb_consistency_check(flow, check_flows[:, flow_idx])
                grid_flow = flow.permute(0, 2, 3, 1)
                frame_warped = flow_warp(frame_prop, grid_flow, interpolation)
                warped_source_known = 1 - _binarize(flow_warp(mask_prop, grid_flow))
                fill = _binarize(mask_current * flow_valid * warped_source_known)
                # fill is exactly 0/1: the reference's fill*warped + (1-fill)*current, without touching known pixels
                frame_prop = torch.where(fill > 0, frame_warped, frame_current)
                mask_prop = _binarize(mask_current * (1 - flow_valid * warped_source_known))
            out_frames[idx] = frame_prop
            out_masks[idx] = mask_prop
        source_frames, source_masks = out_frames, out_masks
    return torch.stack(source_frames, dim=1), torch.stack(source_masks, dim=1)


# ---------------------------------------------------------------------------------------------------------------
# Feature propagation (learned)
# ---------------------------------------------------------------------------------------------------------------
class DeformableAlignment(ModulatedDeformConv2d):
    """Modulated deformable conv whose offsets are the optical flow plus a bounded learned residual."""

    def __init__(self, channels: int, max_residue_magnitude: float = MAX_RESIDUE_MAGNITUDE,
                 deform_groups: int = DEFORM_GROUPS):
        super().__init__(channels, channels, 3, padding=1, deform_groups=deform_groups)
        self.max_residue_magnitude = max_residue_magnitude
        kernel_taps = 9
        # condition = current feature, warped propagated feature, flow (2), flow validity (1), masks (2)
        self.conv_offset = nn.Sequential(
            nn.Conv2d(2 * channels + 2 + 1 + 2, channels, 3, 1, 1),
            _leaky(LEAKY_SLOPE_OFFSET),
            nn.Conv2d(channels, channels, 3, 1, 1),
            _leaky(LEAKY_SLOPE_OFFSET),
            nn.Conv2d(channels, channels, 3, 1, 1),
            _leaky(LEAKY_SLOPE_OFFSET),
            # per group and tap: (dy, dx) offset and a modulation logit
            nn.Conv2d(channels, 3 * kernel_taps * deform_groups, 3, 1, 1),
        )
        nn.init.zeros_(self.conv_offset[-1].weight)
        nn.init.zeros_(self.conv_offset[-1].bias)

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, condition: torch.Tensor, flow: torch.Tensor
    ) -> torch.Tensor:
        offset_a, offset_b, modulation = torch.chunk(self.conv_offset(condition), 3, dim=1)
        offset = self.max_residue_magnitude * torch.tanh(torch.cat((offset_a, offset_b), dim=1))
        # deform-conv offsets are (dy, dx) per tap; the flow is (dx, dy)
        offset = offset + flow.flip(1).repeat(1, offset.shape[1] // 2, 1, 1)
        return super().forward(x, offset, torch.sigmoid(modulation))


class FeaturePropagation(nn.Module):
    """Bidirectional recurrent feature propagation (reference BidirectionalPropagation, learnable=True)."""

    def __init__(self, channels: int = FEATURE_CHANNELS):
        super().__init__()
        self.channels = channels
        self.deform_align = nn.ModuleDict()
        self.backbone = nn.ModuleDict()
        for direction in _PROPAGATION_DIRECTIONS:
            self.deform_align[direction] = DeformableAlignment(channels)
            self.backbone[direction] = nn.Sequential(
                nn.Conv2d(2 * channels + 2, channels, 3, 1, 1),
                _leaky(LEAKY_SLOPE_ENCODER),
                nn.Conv2d(channels, channels, 3, 1, 1),
            )
        self.fuse = nn.Sequential(
            nn.Conv2d(2 * channels + 2, channels, 3, 1, 1),
            _leaky(LEAKY_SLOPE_ENCODER),
            nn.Conv2d(channels, channels, 3, 1, 1),
        )

    def forward(self, feats: torch.Tensor, flows_forward: torch.Tensor, flows_backward: torch.Tensor,
                masks: torch.Tensor, interpolation: str = "bilinear") -> torch.Tensor:
        """``feats [b,t,c,h,w]``, flows ``[b,t-1,2,h,w]``, ``masks [b,t,2,h,w]`` (hole, updated hole) -> fused
        ``[b,t,c,h,w]``."""
        b, t, c, h, w = feats.shape
        source = [feats[:, i] for i in range(t)]
        per_direction: Dict[str, List[torch.Tensor]] = {}
        for direction in _PROPAGATION_DIRECTIONS:
            if direction.startswith("backward"):
                prop_flows, check_flows = flows_forward, flows_backward
            else:
                prop_flows, check_flows = flows_backward, flows_forward
            outputs: List[Optional[torch.Tensor]] = [None] * t
            feat_prop = None
            for idx, flow_idx in _propagation_order(direction, t):
                feat_current, mask_current = source[idx], masks[:, idx]
                if flow_idx is None:
                    feat_prop = feat_current
                else:
                    flow = prop_flows[:, flow_idx]
                    flow_valid = fb_consistency_check(flow, check_flows[:, flow_idx])
                    feat_warped = flow_warp(feat_prop, flow.permute(0, 2, 3, 1), interpolation)
                    condition = torch.cat([feat_current, feat_warped, flow, flow_valid, mask_current], dim=1)
                    feat_prop = self.deform_align[direction](feat_prop, condition, flow)
                refine_input = torch.cat([feat_current, feat_prop, mask_current], dim=1)
                feat_prop = feat_prop + self.backbone[direction](refine_input)
                outputs[idx] = feat_prop
            per_direction[direction] = outputs
            source = outputs
        backward_feats = torch.stack(per_direction["backward_1"], dim=1).view(-1, c, h, w)
        forward_feats = torch.stack(per_direction["forward_1"], dim=1).view(-1, c, h, w)
        fused = self.fuse(torch.cat([backward_feats, forward_feats, masks.reshape(-1, 2, h, w)], dim=1))
        return (fused + feats.reshape(-1, c, h, w)).view(b, t, c, h, w)


# ---------------------------------------------------------------------------------------------------------------
# Encoder / decoder
# ---------------------------------------------------------------------------------------------------------------
class Encoder(nn.Module):
    """Conv encoder to 1/4 resolution; the last four convs see the stem features again, interleaved by group."""

    # groups of layers 10, 12, 14, 16 (the layers that take [stem features, previous output] group-interleaved)
    FUSION_GROUPS = (2, 4, 8, 1)
    STEM_END = 8  # index in ``layers`` whose input is the stem feature re-used by the fusion convs

    def __init__(self):
        super().__init__()
        slope = LEAKY_SLOPE_ENCODER
        self.layers = nn.ModuleList([
            _conv3x3(5, 64, stride=2), _leaky(slope),
            _conv3x3(64, 64), _leaky(slope),
            _conv3x3(64, 128, stride=2), _leaky(slope),
            _conv3x3(128, 256), _leaky(slope),
            _conv3x3(256, 384), _leaky(slope),
            _conv3x3(640, 512, groups=2), _leaky(slope),
            _conv3x3(768, 384, groups=4), _leaky(slope),
            _conv3x3(640, 256, groups=8), _leaky(slope),
            _conv3x3(512, 128), _leaky(slope),
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        out = x
        stem = None
        for i, layer in enumerate(self.layers):
            if i == self.STEM_END:
                stem = out
            elif i > self.STEM_END and i % 2 == 0:
                groups = self.FUSION_GROUPS[(i - self.STEM_END) // 2 - 1]
                h, w = out.shape[-2:]
                out = torch.cat([stem.view(n, groups, -1, h, w), out.view(n, groups, -1, h, w)], dim=2)
                out = out.view(n, -1, h, w)
            out = layer(out)
        return out


class UpConv(nn.Module):
    """x2 bilinear upsampling (align_corners=True) then a conv (the reference ``deconv``)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True))


# ---------------------------------------------------------------------------------------------------------------
# Tokens: soft split / soft composition
# ---------------------------------------------------------------------------------------------------------------
def _token_grid(size: Tuple[int, int]) -> Tuple[int, int]:
    return tuple(
        (size[i] + 2 * TOKEN_PADDING[i] - (TOKEN_KERNEL[i] - 1) - 1) // TOKEN_STRIDE[i] + 1 for i in range(2)
    )


def _fold(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    return F.fold(x, output_size=size, kernel_size=TOKEN_KERNEL, stride=TOKEN_STRIDE, padding=TOKEN_PADDING)


def _unfold(x: torch.Tensor) -> torch.Tensor:
    return F.unfold(x, kernel_size=TOKEN_KERNEL, stride=TOKEN_STRIDE, padding=TOKEN_PADDING)


class SoftSplit(nn.Module):
    """Overlapping 7x7 patches (stride 3) of the feature map -> linear embedding; ``[b,t,th,tw,hidden]``."""

    def __init__(self, channels: int = FEATURE_CHANNELS, hidden: int = HIDDEN_DIM):
        super().__init__()
        self.embedding = nn.Linear(TOKEN_KERNEL[0] * TOKEN_KERNEL[1] * channels, hidden)

    def forward(self, x: torch.Tensor, batch: int, size: Tuple[int, int]) -> torch.Tensor:
        grid_h, grid_w = _token_grid(size)
        tokens = self.embedding(_unfold(x).permute(0, 2, 1))
        return tokens.view(batch, -1, grid_h, grid_w, tokens.shape[-1])


class SoftComp(nn.Module):
    """Tokens -> overlapping patches summed back onto the grid (no overlap normalisation) -> 3x3 conv."""

    def __init__(self, channels: int = FEATURE_CHANNELS, hidden: int = HIDDEN_DIM):
        super().__init__()
        self.embedding = nn.Linear(hidden, TOKEN_KERNEL[0] * TOKEN_KERNEL[1] * channels)
        self.bias_conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, tokens: torch.Tensor, num_frames: int, size: Tuple[int, int]) -> torch.Tensor:
        batch = tokens.shape[0]
        patches = self.embedding(tokens.reshape(batch, -1, tokens.shape[-1]))
        patches = patches.view(batch * num_frames, -1, patches.shape[-1]).permute(0, 2, 1)
        return self.bias_conv(_fold(patches, size))


# ---------------------------------------------------------------------------------------------------------------
# Temporal sparse transformer
# ---------------------------------------------------------------------------------------------------------------
def rolled_key_indices(window_size: Sequence[int], expand_size: Sequence[int]) -> torch.Tensor:
    """Indices of the rolled-window key tokens that are kept (the ``valid_ind_rolled`` buffer).

    The four rolled copies of a window (shifted towards the top-left, top-right, bottom-left, bottom-right
    neighbours) are concatenated; from each, the block that overlaps the window itself is dropped.
    """
    wh, ww = window_size
    eh, ew = expand_size
    keep = torch.ones(4, wh, ww)
    keep[0, :-eh, :-ew] = 0
    keep[1, :-eh, ew:] = 0
    keep[2, eh:, :-ew] = 0
    keep[3, eh:, ew:] = 0
    return keep.flatten().nonzero(as_tuple=False).view(-1)


def _partition_windows(x: torch.Tensor, window_size: Sequence[int], num_heads: int) -> torch.Tensor:
    """``[b,t,H,W,c]`` (H, W multiples of the window) -> ``[b, windows, heads, t, window tokens, c/heads]``."""
    b, t, h, w, c = x.shape
    wh, ww = window_size
    x = x.view(b, t, h // wh, wh, w // ww, ww, num_heads, c // num_heads)
    x = x.permute(0, 2, 4, 6, 1, 3, 5, 7)
    return x.reshape(b, (h // wh) * (w // ww), num_heads, t, wh * ww, c // num_heads)


class SparseWindowAttention(nn.Module):
    """Window self-attention over all frames. Windows that contain hole tokens in any local frame attend, across
    the frames picked by ``frame_index``, to their own tokens, tokens of the neighbouring windows (the reference's
    rolled windows) and pooled global tokens; other windows attend only to their own tokens within the same frame.

    The reference builds the neighbour tokens by rolling the whole key map four times and partitioning each copy;
    here the same tokens are gathered directly, for the hole windows only (same set of keys, far less memory).
    """

    def __init__(self, dim: int = HIDDEN_DIM, num_heads: int = NUM_HEADS, window_size=WINDOW_SIZE,
                 pool_size=POOL_SIZE):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"SparseWindowAttention: dim {dim} is not divisible by num_heads {num_heads}")
        self.key = nn.Linear(dim, dim)
        self.query = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.num_heads = num_heads
        self.window_size = tuple(window_size)
        self.pool_layer = nn.Conv2d(dim, dim, kernel_size=pool_size, stride=pool_size, padding=0, groups=dim)
        nn.init.constant_(self.pool_layer.weight, 1.0 / (pool_size[0] * pool_size[1]))
        nn.init.zeros_(self.pool_layer.bias)
        self.expand_size = tuple((s + 1) // 2 for s in self.window_size)
        self.register_buffer("valid_ind_rolled", rolled_key_indices(self.window_size, self.expand_size))

    def _window_key_positions(self, win_rows: int, win_cols: int, device) -> torch.Tensor:
        """Flat token positions ``[windows, own + neighbour tokens]`` in the padded ``[H, W]`` map.

        Neighbour copy s of window w holds, at window position p, the token at ``(w's origin + p - shift_s) mod map
        size`` (``torch.roll`` semantics); ``valid_ind_rolled`` picks which of the four copies' tokens are kept.
        """
        wh, ww = self.window_size
        eh, ew = self.expand_size
        padded_h, padded_w = win_rows * wh, win_cols * ww
        # rows [R,1,wh,1], cols [1,C,1,ww]: absolute coordinates of every window's tokens
        rows = (torch.arange(win_rows, device=device) * wh).view(-1, 1, 1, 1)
        rows = rows + torch.arange(wh, device=device).view(1, 1, -1, 1)
        cols = (torch.arange(win_cols, device=device) * ww).view(1, -1, 1, 1)
        cols = cols + torch.arange(ww, device=device).view(1, 1, 1, -1)

        def positions(row_shift: int, col_shift: int) -> torch.Tensor:
            flat = ((rows - row_shift) % padded_h) * padded_w + (cols - col_shift) % padded_w  # [R, C, wh, ww]
            return flat.reshape(win_rows * win_cols, wh * ww)

        own = positions(0, 0)
        shifted = torch.cat(
            [positions(*shift) for shift in ((-eh, -ew), (-eh, ew), (eh, -ew), (eh, ew))], dim=1
        )[:, self.valid_ind_rolled.to(device)]
        return torch.cat([own, shifted], dim=1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, frame_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x [b,t,h,w,c]`` tokens, ``mask [b,l,h,w,1]`` hole tokens of the local frames, ``frame_index`` the
        frames whose keys hole windows attend to (all when None). Returns ``[b,t,h,w,c]``."""
        b, t, h, w, c = x.shape
        wh, ww = self.window_size
        heads = self.num_heads
        head_dim = c // heads
        win_rows, win_cols = math.ceil(h / wh), math.ceil(w / ww)
        num_windows = win_rows * win_cols
        window_tokens = wh * ww
        padded_h, padded_w = win_rows * wh, win_cols * ww
        pad_b, pad_r = padded_h - h, padded_w - w
        if pad_b or pad_r:
            # padded tokens are zeros before the projections (they become bias-valued keys), as in the reference
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
            mask = F.pad(mask, (0, 0, 0, pad_r, 0, pad_b))

        query = _partition_windows(self.query(x), self.window_size, heads)
        key_full = self.key(x)
        value_full = self.value(x)

        local_frames = mask.shape[1]
        window_has_hole = F.max_pool2d(
            mask.reshape(b * local_frames, 1, padded_h, padded_w).to(x.dtype), self.window_size, self.window_size
        ).view(b, local_frames, num_windows).sum(dim=1)

        out = torch.zeros_like(query)
        hole_inputs = None
        for i in range(b):
            hole_windows = window_has_hole[i].nonzero(as_tuple=False).view(-1)
            plain_windows = (window_has_hole[i] == 0).nonzero(as_tuple=False).view(-1)
            if hole_windows.numel() > 0:
                if hole_inputs is None:
                    hole_inputs = self._hole_key_inputs(x, key_full, value_full, frame_index, win_rows, win_cols)
                n = hole_windows.numel()
                q = query[i, hole_windows].reshape(n, heads, t * window_tokens, head_dim)
                k, v = self._hole_keys(hole_inputs, i, hole_windows)
                out[i, hole_windows] = F.scaled_dot_product_attention(q, k, v).view(
                    n, heads, t, window_tokens, head_dim)
            if plain_windows.numel() > 0:
                n = plain_windows.numel()
                q = query[i, plain_windows].reshape(n, heads * t, window_tokens, head_dim)
                k = _partition_windows(key_full[i:i + 1], self.window_size, heads)[0, plain_windows]
                v = _partition_windows(value_full[i:i + 1], self.window_size, heads)[0, plain_windows]
                out[i, plain_windows] = F.scaled_dot_product_attention(
                    q,
                    k.reshape(n, heads * t, window_tokens, head_dim),
                    v.reshape(n, heads * t, window_tokens, head_dim),
                ).view(n, heads, t, window_tokens, head_dim)

        out = out.view(b, win_rows, win_cols, heads, t, wh, ww, head_dim)
        out = out.permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(b, t, padded_h, padded_w, c)
        if pad_b or pad_r:
            out = out[:, :, :h, :w, :]
        return self.proj(out)

    def _hole_key_inputs(self, x, key_full, value_full, frame_index, win_rows, win_cols):
        """Per-frame key/value maps and pooled tokens for the frames hole windows attend to (selecting frames
        before gathering equals the reference's selection afterwards: rolling and pooling act within a frame)."""
        if frame_index is not None:
            frame_index = frame_index.to(x.device)
            x = x[:, frame_index]
            key_full = key_full[:, frame_index]
            value_full = value_full[:, frame_index]
        b, t, padded_h, padded_w, c = x.shape
        pooled = self.pool_layer(x.reshape(b * t, padded_h, padded_w, c).permute(0, 3, 1, 2))
        pooled = pooled.permute(0, 2, 3, 1).reshape(b, t, -1, c)
        positions = self._window_key_positions(win_rows, win_cols, x.device)
        return (key_full.reshape(b, t, padded_h * padded_w, c), value_full.reshape(b, t, padded_h * padded_w, c),
                self.key(pooled), self.value(pooled), positions)

    def _hole_keys(self, hole_inputs, i: int, windows: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[windows, heads, frames * tokens, head_dim]`` of batch item ``i``'s hole windows."""
        key_map, value_map, pooled_keys, pooled_values, positions = hole_inputs
        t, num_pooled, c = pooled_keys.shape[1:]
        n = windows.numel()
        index = positions[windows]  # [n, own + neighbour tokens]
        result = []
        for token_map, pooled in ((key_map, pooled_keys), (value_map, pooled_values)):
            tokens = torch.cat(
                [token_map[i][:, index], pooled[i].unsqueeze(1).expand(t, n, num_pooled, c)], dim=2
            )  # [t, n, tokens, c]
            tokens = tokens.view(t, n, -1, self.num_heads, c // self.num_heads).permute(1, 3, 0, 2, 4)
            result.append(tokens.reshape(n, self.num_heads, -1, c // self.num_heads))
        return result[0], result[1]


class FusionFeedForward(nn.Module):
    """MLP whose hidden features are folded onto the feature grid and unfolded again (averaging overlaps)."""

    def __init__(self, dim: int = HIDDEN_DIM, hidden_dim: int = FFN_HIDDEN_DIM):
        super().__init__()
        self.fc1 = nn.Sequential(nn.Linear(dim, hidden_dim))
        self.fc2 = nn.Sequential(nn.GELU(), nn.Linear(hidden_dim, dim))

    def forward(self, x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
        grid_h, grid_w = _token_grid(size)
        tokens_per_frame = grid_h * grid_w
        hidden = self.fc1(x)
        b, n, c = hidden.shape
        taps = TOKEN_KERNEL[0] * TOKEN_KERNEL[1]
        overlap = _fold(hidden.new_ones(1, taps, tokens_per_frame), size)
        folded = _fold(hidden.view(-1, tokens_per_frame, c).permute(0, 2, 1), size)
        hidden = _unfold(folded / overlap).permute(0, 2, 1).reshape(b, n, c)
        return self.fc2(hidden)


class TemporalSparseTransformer(nn.Module):
    def __init__(self, dim: int = HIDDEN_DIM, num_heads: int = NUM_HEADS, window_size=WINDOW_SIZE,
                 pool_size=POOL_SIZE):
        super().__init__()
        self.attention = SparseWindowAttention(dim, num_heads, window_size, pool_size)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = FusionFeedForward(dim)

    def forward(self, x: torch.Tensor, size: Tuple[int, int], mask: torch.Tensor,
                frame_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, t, h, w, c = x.shape
        x = x + self.attention(self.norm1(x), mask, frame_index)
        return x + self.mlp(self.norm2(x).view(b, t * h * w, c), size).view(b, t, h, w, c)


class TemporalSparseTransformerBlock(nn.Module):
    def __init__(self, depth: int = TRANSFORMER_DEPTH, **kwargs):
        super().__init__()
        self.depth = depth
        self.transformer = nn.ModuleList([TemporalSparseTransformer(**kwargs) for _ in range(depth)])

    def forward(self, x: torch.Tensor, size: Tuple[int, int], mask: torch.Tensor, t_dilation: int = 2) -> torch.Tensor:
        if t_dilation < 1 or self.depth % t_dilation:
            raise InputError(
                f"ProPainter transformer: t_dilation {t_dilation} must be a positive divisor of the depth {self.depth}"
            )
        num_frames = x.shape[1]
        for i, block in enumerate(self.transformer):
            # block i attends (in hole windows) to every t_dilation-th frame, starting at offset i % t_dilation
            frame_index = torch.arange(i % t_dilation, num_frames, t_dilation, device=x.device)
            x = block(x, size, mask, frame_index)
        return x


# ---------------------------------------------------------------------------------------------------------------
# Generator
# ---------------------------------------------------------------------------------------------------------------
class InpaintGenerator(nn.Module):
    """ProPainter's video inpainting generator; ``ProPainter.pth`` loads with strict keys."""

    def __init__(self, init_weights: bool = True):
        super().__init__()
        channels = FEATURE_CHANNELS
        self.encoder = Encoder()
        self.decoder = nn.Sequential(
            UpConv(channels, 128), _leaky(LEAKY_SLOPE_ENCODER),
            nn.Conv2d(128, 64, kernel_size=3, stride=1, padding=1), _leaky(LEAKY_SLOPE_ENCODER),
            UpConv(64, 64), _leaky(LEAKY_SLOPE_ENCODER),
            nn.Conv2d(64, 3, kernel_size=3, stride=1, padding=1),
        )
        self.ss = SoftSplit(channels, HIDDEN_DIM)
        self.sc = SoftComp(channels, HIDDEN_DIM)
        self.feat_prop_module = FeaturePropagation(channels)
        self.transformers = TemporalSparseTransformerBlock(
            TRANSFORMER_DEPTH, dim=HIDDEN_DIM, num_heads=NUM_HEADS, window_size=WINDOW_SIZE, pool_size=POOL_SIZE
        )
        if init_weights:
            self.init_weights()

    def init_weights(self, std: float = INIT_STD) -> None:
        """The reference's training init: N(0, std) for every Conv2d/Linear weight, zero biases."""
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.normal_(module.weight, 0.0, std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def img_propagation(self, masked_frames: torch.Tensor, completed_flows: Sequence[torch.Tensor],
                        masks: torch.Tensor, interpolation: str = "nearest") -> Tuple[torch.Tensor, torch.Tensor]:
        """Flow-guided pixel propagation: ``masked_frames [b,t,3,H,W]``, ``completed_flows = (forward, backward)``
        each ``[b,t-1,2,H,W]``, ``masks [b,t,1,H,W]`` -> (propagated frames, updated masks), same shapes."""
        _check_flows("ProPainter image propagation", masked_frames, completed_flows, masked_frames.shape[1])
        masks = masks.to(masked_frames.dtype)
        return propagate_image(masked_frames, completed_flows[0], completed_flows[1], masks, interpolation)

    def forward(self, masked_frames: torch.Tensor, completed_flows: Sequence[torch.Tensor], masks_in: torch.Tensor,
                masks_updated: torch.Tensor, num_local_frames: int, interpolation: str = "bilinear",
                t_dilation: int = 2) -> torch.Tensor:
        """Inpaint: ``masked_frames [b,t,3,H,W]`` (local frames first, then reference frames), flows of the
        ``num_local_frames`` local frames ``(forward, backward)`` each ``[b,l-1,2,H,W]``, ``masks_in`` (original
        holes) and ``masks_updated`` (holes left after image propagation) ``[b,t,1,H,W]``.

        Returns ``[b,l,3,H,W]`` in [-1,1] for the local frames (all ``t`` frames in training mode).
        """
        local = int(num_local_frames)
        b, t, _, ori_h, ori_w = masked_frames.shape
        if ori_h % ENCODER_DOWNSCALE or ori_w % ENCODER_DOWNSCALE:
            raise InputError(
                f"ProPainter generator: frame size {ori_h}x{ori_w} must be a multiple of {ENCODER_DOWNSCALE} "
                "in both dimensions"
            )
        if not 1 <= local <= t:
            raise InputError(f"ProPainter generator: num_local_frames {local} must be within 1..{t} (clip length)")
        _check_flows("ProPainter generator", masked_frames, completed_flows, local)
        if t_dilation < 1 or TRANSFORMER_DEPTH % t_dilation:
            raise InputError(
                f"ProPainter generator: t_dilation {t_dilation} must be a positive divisor of the transformer depth "
                f"{TRANSFORMER_DEPTH}"
            )

        masks_in = masks_in.to(masked_frames.dtype)
        masks_updated = masks_updated.to(masked_frames.dtype)
        enc_feat = self.encoder(torch.cat([
            masked_frames.reshape(b * t, 3, ori_h, ori_w),
            masks_in.reshape(b * t, 1, ori_h, ori_w),
            masks_updated.reshape(b * t, 1, ori_h, ori_w),
        ], dim=1))
        _, c, h, w = enc_feat.shape
        enc_feat = enc_feat.view(b, t, c, h, w)
        local_feat, ref_feat = enc_feat[:, :local], enc_feat[:, local:]
        size = (h, w)

        scale = 1.0 / ENCODER_DOWNSCALE
        ds_flows = [
            F.interpolate(flows.reshape(-1, 2, ori_h, ori_w), scale_factor=scale, mode="bilinear",
                          align_corners=False).view(b, local - 1, 2, h, w) / ENCODER_DOWNSCALE
            for flows in completed_flows[:2]
        ]
        ds_mask_in = F.interpolate(masks_in.reshape(-1, 1, ori_h, ori_w), scale_factor=scale,
                                   mode="nearest").view(b, t, 1, h, w)
        ds_mask_updated_local = F.interpolate(masks_updated[:, :local].reshape(-1, 1, ori_h, ori_w),
                                              scale_factor=scale, mode="nearest").view(b, local, 1, h, w)
        # hole map on the token grid (a token is a hole if any pixel under its 7x7 patch is)
        pool_frames = ds_mask_in if self.training else ds_mask_in[:, :local]
        token_mask = F.max_pool2d(pool_frames.reshape(-1, 1, h, w), TOKEN_KERNEL, TOKEN_STRIDE, TOKEN_PADDING)
        token_mask = token_mask.view(b, pool_frames.shape[1], 1, *token_mask.shape[-2:]).permute(0, 1, 3, 4, 2)

        prop_masks = torch.cat([ds_mask_in[:, :local], ds_mask_updated_local], dim=2)
        local_feat = self.feat_prop_module(local_feat, ds_flows[0], ds_flows[1], prop_masks, interpolation)
        enc_feat = torch.cat((local_feat, ref_feat), dim=1)

        tokens = self.ss(enc_feat.reshape(-1, c, h, w), b, size)
        tokens = self.transformers(tokens, size, token_mask.contiguous(), t_dilation=t_dilation)
        enc_feat = enc_feat + self.sc(tokens, t, size).view(b, t, c, h, w)

        decoded = enc_feat if self.training else enc_feat[:, :local]
        n = decoded.shape[1]
        output = self.decoder(decoded.reshape(-1, c, h, w))
        return torch.tanh(output).view(b, n, 3, ori_h, ori_w)


def _check_flows(stage: str, frames: torch.Tensor, flows: Sequence[torch.Tensor], num_frames: int) -> None:
    if len(flows) < 2:
        raise InputError(f"{stage}: completed_flows must be (forward, backward), got {len(flows)} tensor(s)")
    b, _, _, h, w = frames.shape
    expected = (b, num_frames - 1, 2, h, w)
    for name, flow in zip(("forward", "backward"), flows[:2]):
        if tuple(flow.shape) != expected:
            raise InputError(f"{stage}: {name} flows have shape {tuple(flow.shape)}, expected {expected}")


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------
def load_propainter(path) -> InpaintGenerator:
    """Build an InpaintGenerator from ``ProPainter.pth`` (plain state dict, strict keys incl. the int64
    ``valid_ind_rolled`` buffers); returns it in eval mode on the CPU."""
    what = "ProPainter generator"
    state = strip_prefix(read_state_dict(path, what=what))
    model = InpaintGenerator(init_weights=False)
    load_state_dict_checked(model, state, str(path), what)
    logger.debug("loaded ProPainter generator from %s", path)
    return model.eval()
