"""ProPainter's recurrent flow completion network, in the layout of ``recurrent_flow_completion.pth``.

Completes optical flow inside the holes: pseudo-3D conv encoder at 1/8 resolution, bidirectional recurrent
propagation with second-order deformable alignment, 2D decoder, and an edge branch (used in training only).
Flows are [B,T,2,H,W] (x, y) in pixels; masks [B,T,1,H,W] with 1 = hole. H and W must be multiples of 8.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import InputError
from .checkpoints import load_state_dict_checked, read_state_dict, strip_prefix
from .deform_conv import ModulatedDeformConv2d

logger = logging.getLogger(__name__)

FEATURE_CHANNELS = 128  # channels of the propagated 1/8-resolution features
DEFORM_GROUPS = 16
# Offsets are max_residue_magnitude * tanh(raw): the flow-completion network bounds them to +-5 pixels (ProPainter's
# image propagation uses 3).
MAX_RESIDUE_MAGNITUDE = 5.0
SPATIAL_STRIDE = 8
ENCODER_SLOPE = 0.2  # LeakyReLU slope of the encoder/decoder
PROPAGATION_SLOPE = 0.1  # LeakyReLU slope inside the propagation module
EDGE_OUT_SLOPE = 0.01  # LeakyReLU slope before the edge output layer


class SecondOrderDeformableAlignment(ModulatedDeformConv2d):
    """Aligns the previous two propagated features (concatenated) with offsets/masks predicted from a condition."""

    def __init__(self, *args, max_residue_magnitude: float = MAX_RESIDUE_MAGNITUDE, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_residue_magnitude = max_residue_magnitude
        kernel_taps = self.kernel_size[0] * self.kernel_size[1]
        self.conv_offset = nn.Sequential(
            nn.Conv2d(3 * self.out_channels, self.out_channels, 3, 1, 1),
            nn.LeakyReLU(negative_slope=PROPAGATION_SLOPE, inplace=True),
            nn.Conv2d(self.out_channels, self.out_channels, 3, 1, 1),
            nn.LeakyReLU(negative_slope=PROPAGATION_SLOPE, inplace=True),
            nn.Conv2d(self.out_channels, self.out_channels, 3, 1, 1),
            nn.LeakyReLU(negative_slope=PROPAGATION_SLOPE, inplace=True),
            # (dy, dx) offsets for two frames and one modulation mask per group and tap
            nn.Conv2d(self.out_channels, 3 * kernel_taps * self.deform_groups, 3, 1, 1),
        )
        self.init_offset()

    def init_offset(self) -> None:
        # Training starts from zero offsets and 0.5 masks.
        nn.init.zeros_(self.conv_offset[-1].weight)
        nn.init.zeros_(self.conv_offset[-1].bias)

    def forward(self, x: torch.Tensor, extra_feat: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = self.conv_offset(extra_feat)
        offset_1, offset_2, mask = torch.chunk(out, 3, dim=1)
        offset = self.max_residue_magnitude * torch.tanh(torch.cat((offset_1, offset_2), dim=1))
        return super().forward(x, offset, torch.sigmoid(mask))


class BidirectionalPropagation(nn.Module):
    """Backward then forward recurrent pass over time; each step aligns the last two states and refines."""

    BRANCHES = ("backward_", "forward_")

    def __init__(self, channel: int = FEATURE_CHANNELS):
        super().__init__()
        self.channel = channel
        self.deform_align = nn.ModuleDict()
        self.backbone = nn.ModuleDict()
        for index, name in enumerate(self.BRANCHES):
            self.deform_align[name] = SecondOrderDeformableAlignment(
                2 * channel, channel, 3, padding=1, deform_groups=DEFORM_GROUPS
            )
            # The forward branch also sees the backward branch's output: (2 + index) inputs.
            self.backbone[name] = nn.Sequential(
                nn.Conv2d((2 + index) * channel, channel, 3, 1, 1),
                nn.LeakyReLU(negative_slope=PROPAGATION_SLOPE, inplace=True),
                nn.Conv2d(channel, channel, 3, 1, 1),
            )
        self.fusion = nn.Conv2d(2 * channel, channel, 1, 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B,T,C,H,W] -> [B,T,C,H,W]."""
        batch, length, _, height, width = x.shape
        spatial = [x[:, i] for i in range(length)]
        propagated = {}
        for name in self.BRANCHES:
            order = range(length - 1, -1, -1) if name == "backward_" else range(length)
            states = []
            feat_prop = x.new_zeros(batch, self.channel, height, width)
            for step, idx in enumerate(order):
                current = spatial[idx]
                if step > 0:
                    second = states[-2] if step > 1 else torch.zeros_like(feat_prop)
                    cond = torch.cat([feat_prop, current, second], dim=1)
                    feat_prop = self.deform_align[name](torch.cat([feat_prop, second], dim=1), cond)
                others = [propagated[other][idx] for other in propagated]
                feat = torch.cat([current] + others + [feat_prop], dim=1)
                feat_prop = feat_prop + self.backbone[name](feat)
                states.append(feat_prop)
            propagated[name] = states[::-1] if name == "backward_" else states
        outputs = [
            self.fusion(torch.cat([propagated[name][i] for name in self.BRANCHES], dim=1)) for i in range(length)
        ]
        return torch.stack(outputs, dim=1) + x


class UpConv(nn.Module):
    """x2 bilinear upsampling (align_corners=True) then a conv; the conv is stored as ``.conv``."""

    def __init__(self, input_channel: int, output_channel: int, kernel_size: int = 3, padding: int = 0):
        super().__init__()
        self.conv = nn.Conv2d(input_channel, output_channel, kernel_size=kernel_size, stride=1, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True))


class P3DBlock(nn.Module):
    """Pseudo-3D conv: spatial (1,k,k) conv + LeakyReLU, then a temporal (3,1,1) conv with dilation 2."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, padding: int,
                 use_residual: bool = False, bias: bool = True):
        super().__init__()
        self.conv1 = nn.Sequential(
            nn.Conv3d(in_channels, out_channels, kernel_size=(1, kernel_size, kernel_size),
                      stride=(1, stride, stride), padding=(0, padding, padding), bias=bias),
            nn.LeakyReLU(ENCODER_SLOPE, inplace=True),
        )
        self.conv2 = nn.Sequential(
            nn.Conv3d(out_channels, out_channels, kernel_size=(3, 1, 1), stride=(1, 1, 1), padding=(2, 0, 0),
                      dilation=(2, 1, 1), bias=bias),
        )
        self.use_residual = use_residual

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.conv1(feats))
        return feats + out if self.use_residual else out


class EdgeDetection(nn.Module):
    def __init__(self, in_ch: int = 2, out_ch: int = 1, mid_ch: int = 16):
        super().__init__()
        self.projection = nn.Sequential(nn.Conv2d(in_ch, mid_ch, 3, 1, 1), nn.LeakyReLU(ENCODER_SLOPE, inplace=True))
        self.mid_layer_1 = nn.Sequential(nn.Conv2d(mid_ch, mid_ch, 3, 1, 1),
                                         nn.LeakyReLU(ENCODER_SLOPE, inplace=True))
        self.mid_layer_2 = nn.Sequential(nn.Conv2d(mid_ch, mid_ch, 3, 1, 1))
        self.l_relu = nn.LeakyReLU(EDGE_OUT_SLOPE, inplace=True)
        self.out_layer = nn.Conv2d(mid_ch, out_ch, 1, 1, 0)

    def forward(self, flow: torch.Tensor) -> torch.Tensor:
        flow = self.projection(flow)
        edge = self.mid_layer_2(self.mid_layer_1(flow))
        edge = self.l_relu(flow + edge)
        return torch.sigmoid(self.out_layer(edge))


def _leaky() -> nn.LeakyReLU:
    return nn.LeakyReLU(ENCODER_SLOPE, inplace=True)


class RecurrentFlowCompleteNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.downsample = nn.Sequential(
            nn.Conv3d(3, 32, kernel_size=(1, 5, 5), stride=(1, 2, 2), padding=(0, 2, 2), padding_mode="replicate"),
            _leaky(),
        )
        self.encoder1 = nn.Sequential(P3DBlock(32, 32, 3, 1, 1), _leaky(), P3DBlock(32, 64, 3, 2, 1), _leaky())  # 1/4
        self.encoder2 = nn.Sequential(P3DBlock(64, 64, 3, 1, 1), _leaky(), P3DBlock(64, 128, 3, 2, 1), _leaky())  # 1/8
        self.mid_dilation = nn.Sequential(
            nn.Conv3d(128, 128, (1, 3, 3), (1, 1, 1), padding=(0, 3, 3), dilation=(1, 3, 3)),
            _leaky(),
            nn.Conv3d(128, 128, (1, 3, 3), (1, 1, 1), padding=(0, 2, 2), dilation=(1, 2, 2)),
            _leaky(),
            nn.Conv3d(128, 128, (1, 3, 3), (1, 1, 1), padding=(0, 1, 1), dilation=(1, 1, 1)),
            _leaky(),
        )
        self.feat_prop_module = BidirectionalPropagation(FEATURE_CHANNELS)
        self.decoder2 = nn.Sequential(nn.Conv2d(128, 128, 3, 1, 1), _leaky(), UpConv(128, 64, 3, 1), _leaky())  # 1/4
        self.decoder1 = nn.Sequential(nn.Conv2d(64, 64, 3, 1, 1), _leaky(), UpConv(64, 32, 3, 1), _leaky())  # 1/2
        self.upsample = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), _leaky(), UpConv(32, 2, 3, 1))
        self.edgeDetector = EdgeDetection(in_ch=2, out_ch=1, mid_ch=16)

    def forward(
        self, masked_flows: torch.Tensor, masks: torch.Tensor, return_edge: Optional[bool] = None
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """masked_flows [B,T,2,H,W], masks [B,T,1,H,W] -> (flow [B,T,2,H,W], edge [B,T,1,H,W] or None).

        As in the reference the edge map is only computed in training mode unless ``return_edge`` says otherwise.
        """
        if masked_flows.dim() != 5 or masked_flows.shape[2] != 2:
            raise InputError(f"flow completion: expected flows [B,T,2,H,W], got {tuple(masked_flows.shape)}")
        batch, length, _, height, width = masked_flows.shape
        if tuple(masks.shape) != (batch, length, 1, height, width):
            raise InputError(
                f"flow completion: masks {tuple(masks.shape)} must be {(batch, length, 1, height, width)}"
            )
        if height % SPATIAL_STRIDE or width % SPATIAL_STRIDE:
            raise InputError(f"flow completion: size {height}x{width} must be a multiple of {SPATIAL_STRIDE}")
        dtype = self.downsample[0].weight.dtype
        inputs = torch.cat((masked_flows, masks.to(masked_flows.dtype)), dim=2).to(dtype).permute(0, 2, 1, 3, 4)

        x = self.downsample(inputs)
        feat_e1 = self.encoder1(x)
        feat_mid = self.mid_dilation(self.encoder2(feat_e1))  # [B,C,T,h,w]
        feat_prop = self.feat_prop_module(feat_mid.permute(0, 2, 1, 3, 4))
        feat_prop = feat_prop.reshape(batch * length, FEATURE_CHANNELS, height // 8, width // 8)

        channels_e1, h_e1, w_e1 = feat_e1.shape[1], feat_e1.shape[3], feat_e1.shape[4]
        feat_e1 = feat_e1.permute(0, 2, 1, 3, 4).reshape(batch * length, channels_e1, h_e1, w_e1)
        feat_d2 = self.decoder2(feat_prop) + feat_e1
        flow = self.upsample(self.decoder1(feat_d2))

        if return_edge is None:
            return_edge = self.training
        edge = self.edgeDetector(flow).view(batch, length, 1, height, width) if return_edge else None
        return flow.view(batch, length, 2, height, width), edge

    def forward_bidirect_flow(
        self, masked_flows_bi: Sequence[torch.Tensor], masks: torch.Tensor
    ) -> Tuple[list, list]:
        """masked_flows_bi (forward, backward) each [B,T-1,2,H,W]; masks [B,T,1,H,W] (1 = hole).

        Returns ([pred_forward, pred_backward], [edges_forward, edges_backward]); the backward flows run through
        the network in reversed time so the recurrence always follows the flow direction.
        """
        masks_forward = masks[:, :-1].contiguous()
        masks_backward = masks[:, 1:].contiguous()
        flows_forward = masked_flows_bi[0] * (1 - masks_forward)
        flows_backward = masked_flows_bi[1] * (1 - masks_backward)

        pred_forward, edges_forward = self.forward(flows_forward, masks_forward)
        pred_backward, edges_backward = self.forward(
            torch.flip(flows_backward, dims=[1]), torch.flip(masks_backward, dims=[1])
        )
        pred_backward = torch.flip(pred_backward, dims=[1])
        if edges_backward is not None:
            edges_backward = torch.flip(edges_backward, dims=[1])
        return [pred_forward, pred_backward], [edges_forward, edges_backward]

    @staticmethod
    def combine_flow(
        masked_flows_bi: Sequence[torch.Tensor], pred_flows_bi: Sequence[torch.Tensor], masks: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Keep the given flow outside the holes and the prediction inside."""
        masks_forward = masks[:, :-1].contiguous()
        masks_backward = masks[:, 1:].contiguous()
        forward = pred_flows_bi[0] * masks_forward + masked_flows_bi[0] * (1 - masks_forward)
        backward = pred_flows_bi[1] * masks_backward + masked_flows_bi[1] * (1 - masks_backward)
        return forward, backward


def load_flow_completion(path: str) -> RecurrentFlowCompleteNet:
    """Load ``recurrent_flow_completion.pth`` (plain state dict; a ``module.`` prefix is tolerated).

    Returns the model in eval mode on the CPU, fp32.
    """
    what = "ProPainter flow completion (recurrent_flow_completion)"
    state_dict = strip_prefix(read_state_dict(path, what=what))
    model = RecurrentFlowCompleteNet()
    load_state_dict_checked(model, state_dict, path, what)
    logger.debug("loaded %s from %s", what, path)
    return model.eval().requires_grad_(False)
