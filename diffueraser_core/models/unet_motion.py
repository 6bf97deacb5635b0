"""DiffuEraser's motion UNet: the stock diffusers ``UNetMotionModel`` layout with DiffuEraser's own forward.

The released ``unet_main`` weights load into stock diffusers' UNetMotionModel unchanged (same modules, same
1253-tensor state dict), but DiffuEraser was trained with a different forward, reproduced here on diffusers'
sub-modules (resnets, cross-attention transformers, AnimateDiff motion modules, down/upsamplers):

1. BrushNet features are added: 12 down residuals, 1 mid, 15 up (``BrushNetModel`` produces them).
2. In every down/up layer the residual is added after the resnet (and cross-attention) and *before* the motion
   module; after every down/upsampler it is added to the sampler's output. The conv_in output enters the skip
   stack *before* the first down residual is added to it.
3. Mid block: resnet0 -> attention -> resnet1 -> + mid residual -> motion module -> resnet1 again (the same resnet
   applied twice; stock diffusers runs resnet0 -> attention -> motion -> resnet1). This holds with or without
   residuals, since the weights were trained so.
4. The time embedding is computed once per clip and repeated over the frames; the text embedding is repeated over
   the frames too.

Frames are folded into the batch in (b f) order everywhere; motion modules unfold them with ``num_frames``.
"""

from __future__ import annotations

import logging
from typing import List, Optional, Sequence, Union

import torch
from diffusers import UNetMotionModel

from ..errors import InputError, ModelFileError

logger = logging.getLogger(__name__)

STAGE = "DiffuEraser UNet"


def _residual_counts(unet: UNetMotionModel) -> tuple:
    """Number of (down, up) residual slots: conv_in + one per layer + one per down/upsampler."""
    down = 1 + sum(len(b.resnets) + (b.downsamplers is not None) for b in unet.down_blocks)
    up = sum(len(b.resnets) + (b.upsamplers is not None) for b in unet.up_blocks)
    return down, up


class _ResidualFeed:
    """Hands out BrushNet residuals in execution order; ``None`` everywhere when no residuals were given."""

    def __init__(self, residuals: Optional[Sequence[torch.Tensor]]):
        self._residuals = residuals
        self._next = 0

    def add(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self._residuals is None:
            return hidden_states
        residual = self._residuals[self._next]
        self._next += 1
        return hidden_states + residual.to(hidden_states.dtype)


def match_text_batch(text: torch.Tensor, batch: int, stage: str) -> torch.Tensor:
    """[1 or batch, L, D] -> [batch, L, D]: one prompt embedding may serve every clip / frame."""
    if text.ndim != 3 or text.shape[0] not in (1, batch):
        raise InputError(
            f"{stage}: encoder_hidden_states must be [1 or {batch}, tokens, dim], got shape {tuple(text.shape)}"
        )
    return text.expand(batch, -1, -1) if text.shape[0] != batch else text


class DiffuEraserUNet(UNetMotionModel):
    """``UNetMotionModel`` (same ``__init__``, config and state dict) with DiffuEraser's forward.

    Only the motion mid block (``use_motion_mid_block=True``) exists in DiffuEraser; forward refuses other configs.
    """

    def _time_embedding(self, timestep: Union[torch.Tensor, float, int], batch: int, device) -> torch.Tensor:
        """Embedding [batch, D] of one timestep per clip (a scalar or a [batch] tensor)."""
        if not torch.is_tensor(timestep):
            timestep = torch.tensor([timestep], device=device)
        timesteps = timestep.to(device).reshape(-1).expand(batch)
        # Timesteps() always yields float32; the embedding MLP runs in the weights' dtype.
        t_emb = self.time_proj(timesteps).to(self.time_embedding.linear_1.weight.dtype)
        return self.time_embedding(t_emb)

    def _check_inputs(self, down, mid, up) -> None:
        if not hasattr(self.mid_block, "motion_modules"):
            raise ModelFileError(
                f"{STAGE}: config has use_motion_mid_block={self.config.use_motion_mid_block!r}; DiffuEraser's "
                f"unet_main needs the motion mid block (use_motion_mid_block=true)"
            )
        num_down, num_up = _residual_counts(self)
        if down is not None and len(down) != num_down:
            raise InputError(f"{STAGE}: got {len(down)} down residuals, the network has {num_down} slots")
        if up is not None and len(up) != num_up:
            raise InputError(f"{STAGE}: got {len(up)} up residuals, the network has {num_up} slots")
        if mid is not None and not torch.is_tensor(mid):
            raise InputError(f"{STAGE}: mid residual must be a tensor, got {type(mid).__name__}")

    def forward(
        self,
        sample: torch.Tensor,
        timestep: Union[torch.Tensor, float, int],
        encoder_hidden_states: torch.Tensor,
        down_block_add_samples: Optional[List[torch.Tensor]] = None,
        mid_block_add_sample: Optional[torch.Tensor] = None,
        up_block_add_samples: Optional[List[torch.Tensor]] = None,
    ) -> torch.Tensor:
        """Predict noise for clips.

        sample [B, C, F, h, w]; timestep: scalar or [B]; encoder_hidden_states [B or 1, L, D] (text per clip);
        residuals [B*F, C', h', w'] in (b f) order, in BrushNetModel's output order, or None.
        Returns [B, out_channels, F, h, w] in the weights' dtype (inputs are cast to it).
        """
        if sample.ndim != 5:
            raise InputError(f"{STAGE}: sample must be [B, C, F, h, w], got shape {tuple(sample.shape)}")
        self._check_inputs(down_block_add_samples, mid_block_add_sample, up_block_add_samples)
        batch, channels, num_frames, height, width = sample.shape
        if num_frames > self.config.motion_max_seq_length:
            raise InputError(
                f"{STAGE}: a clip of {num_frames} frames exceeds the motion modules' "
                f"{self.config.motion_max_seq_length} positions; use shorter windows"
            )
        dtype = self.conv_in.weight.dtype

        emb = self._time_embedding(timestep, batch, sample.device)
        emb = emb.repeat_interleave(num_frames, dim=0)
        text = match_text_batch(encoder_hidden_states, batch, STAGE).to(dtype).repeat_interleave(num_frames, dim=0)

        # Upsamplers must hit the skip sizes exactly when the latent is not a multiple of the total down factor.
        up_factor = 2 ** self.num_upsamplers
        forward_upsample_size = height % up_factor != 0 or width % up_factor != 0

        hidden = sample.to(dtype).permute(0, 2, 1, 3, 4).reshape(batch * num_frames, channels, height, width)
        hidden = self.conv_in(hidden)

        down_feed = _ResidualFeed(down_block_add_samples)
        skips = [hidden]
        hidden = down_feed.add(hidden)
        for block in self.down_blocks:
            attentions = getattr(block, "attentions", None)
            for i, (resnet, motion_module) in enumerate(zip(block.resnets, block.motion_modules)):
                hidden = resnet(hidden, emb)
                if attentions is not None:
                    hidden = attentions[i](hidden, encoder_hidden_states=text, return_dict=False)[0]
                hidden = down_feed.add(hidden)
                hidden = motion_module(hidden, num_frames=num_frames)
                skips.append(hidden)
            if block.downsamplers is not None:
                for downsampler in block.downsamplers:
                    hidden = downsampler(hidden)
                hidden = down_feed.add(hidden)
                skips.append(hidden)

        hidden = self._mid_block_forward(hidden, emb, text, num_frames, mid_block_add_sample)

        up_feed = _ResidualFeed(up_block_add_samples)
        for block_index, block in enumerate(self.up_blocks):
            is_final_block = block_index == len(self.up_blocks) - 1
            attentions = getattr(block, "attentions", None)
            for i, (resnet, motion_module) in enumerate(zip(block.resnets, block.motion_modules)):
                hidden = torch.cat([hidden, skips.pop()], dim=1)
                hidden = resnet(hidden, emb)
                if attentions is not None:
                    hidden = attentions[i](hidden, encoder_hidden_states=text, return_dict=False)[0]
                hidden = up_feed.add(hidden)
                hidden = motion_module(hidden, num_frames=num_frames)
            if block.upsamplers is not None:
                output_size = skips[-1].shape[2:] if (forward_upsample_size and not is_final_block) else None
                for upsampler in block.upsamplers:
                    hidden = upsampler(hidden, output_size)
                hidden = up_feed.add(hidden)

        if self.conv_norm_out is not None:
            hidden = self.conv_act(self.conv_norm_out(hidden))
        hidden = self.conv_out(hidden)
        return hidden.reshape(batch, num_frames, -1, height, width).permute(0, 2, 1, 3, 4)

    def _mid_block_forward(self, hidden, emb, text, num_frames, mid_residual):
        mid = self.mid_block
        hidden = mid.resnets[0](hidden, emb)
        for attention, resnet, motion_module in zip(mid.attentions, mid.resnets[1:], mid.motion_modules):
            hidden = attention(hidden, encoder_hidden_states=text, return_dict=False)[0]
            hidden = resnet(hidden, emb)
            if mid_residual is not None:
                hidden = hidden + mid_residual.to(hidden.dtype)
            hidden = motion_module(hidden, num_frames=num_frames)
            # DiffuEraser applies the same resnet a second time here (trained so; see module docstring).
            hidden = resnet(hidden, emb)
        return hidden
