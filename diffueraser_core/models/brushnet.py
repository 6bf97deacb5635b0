"""DiffuEraser's BrushNet: a frame-independent SD1.5 UNet copy whose features condition the motion UNet.

Layout (state-dict keys and config of the released ``brushnet`` folder): the SD1.5 encoder, mid block and decoder
built from diffusers' 2D blocks (cross-attention kept, no motion modules, no conv_out), an input conv
``conv_in_condition`` on concat(noisy latent, conditioning latent), and zero-initialised 1x1 convs that tap
the features: ``brushnet_down_blocks`` (conv_in output, every down layer, every downsampler),
``brushnet_mid_block`` (mid block output) and ``brushnet_up_blocks`` (every up layer, every upsampler), in
execution order. The conditioning latent is 5 channels: the VAE latent of the masked frame (holes black, scaled)
and the mask at latent size with 1 = known, 0 = hole.
"""

from __future__ import annotations

import logging
from typing import List, Tuple, Union

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d_blocks import get_down_block, get_mid_block, get_up_block
from torch import nn

from ..errors import InputError, ModelFileError
from .unet_motion import match_text_batch

logger = logging.getLogger(__name__)

STAGE = "DiffuEraser BrushNet"

SUPPORTED_DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
SUPPORTED_MID_BLOCKS = ("UNetMidBlock2DCrossAttn",)
SUPPORTED_UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")
CHANNEL_ORDERS = ("rgb", "bgr")
# SD1.5 UNet convention: the time-embedding width is 4x the first block's width.
TIME_EMBED_MULTIPLIER = 4
CONV_IN_KERNEL = 3


def _tap_conv(channels: int) -> nn.Conv2d:
    conv = nn.Conv2d(channels, channels, kernel_size=1)
    # Zero init (as BrushNet/ControlNet): an untrained tap contributes nothing. Trained weights replace it.
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


def _per_block(value, n: int, name: str) -> tuple:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ModelFileError(f"{STAGE}: config {name}={list(value)!r} must have one entry per block ({n})")
        return tuple(value)
    return (value,) * n


class BrushNetModel(ModelMixin, ConfigMixin):
    """Cross-attention BrushNet (config keys and state dict of DiffuEraser's released ``brushnet`` folder).

    Embedding options DiffuEraser does not use (class / addition embeddings, encoder_hid projection, pooled
    conditions) keep their config keys for file compatibility but must stay unset.
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 4,
        conditioning_channels: int = 5,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        down_block_types: Tuple[str, ...] = (
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        mid_block_type: str = "UNetMidBlock2DCrossAttn",
        up_block_types: Tuple[str, ...] = (
            "UpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
        ),
        only_cross_attention: Union[bool, Tuple[bool, ...]] = False,
        block_out_channels: Tuple[int, ...] = (320, 640, 1280, 1280),
        layers_per_block: int = 2,
        downsample_padding: int = 1,
        mid_block_scale_factor: float = 1,
        act_fn: str = "silu",
        norm_num_groups: int = 32,
        norm_eps: float = 1e-5,
        cross_attention_dim: int = 768,
        transformer_layers_per_block: Union[int, Tuple[int, ...]] = 1,
        encoder_hid_dim=None,
        encoder_hid_dim_type=None,
        attention_head_dim: Union[int, Tuple[int, ...]] = 8,
        num_attention_heads=None,
        use_linear_projection: bool = False,
        class_embed_type=None,
        addition_embed_type=None,
        addition_time_embed_dim=None,
        num_class_embeds=None,
        upcast_attention: bool = False,
        resnet_time_scale_shift: str = "default",
        projection_class_embeddings_input_dim=None,
        brushnet_conditioning_channel_order: str = "rgb",
        conditioning_embedding_out_channels: Tuple[int, ...] = (16, 32, 96, 256),
        global_pool_conditions: bool = False,
        addition_embed_type_num_heads: int = 64,
    ):
        super().__init__()
        unused = {
            "encoder_hid_dim": encoder_hid_dim,
            "encoder_hid_dim_type": encoder_hid_dim_type,
            "class_embed_type": class_embed_type,
            "num_class_embeds": num_class_embeds,
            "addition_embed_type": addition_embed_type,
        }
        set_unused = {k: v for k, v in unused.items() if v is not None}
        if set_unused or global_pool_conditions:
            raise ModelFileError(
                f"{STAGE}: unsupported config options {set_unused or {'global_pool_conditions': True}!r}; "
                f"DiffuEraser's BrushNet uses none of them"
            )
        if brushnet_conditioning_channel_order not in CHANNEL_ORDERS:
            raise ModelFileError(
                f"{STAGE}: brushnet_conditioning_channel_order={brushnet_conditioning_channel_order!r}, "
                f"expected one of {CHANNEL_ORDERS}"
            )
        bad_types = [t for t in down_block_types if t not in SUPPORTED_DOWN_BLOCKS]
        bad_types += [t for t in up_block_types if t not in SUPPORTED_UP_BLOCKS]
        bad_types += [mid_block_type] if mid_block_type not in SUPPORTED_MID_BLOCKS else []
        if bad_types or len(down_block_types) != len(block_out_channels) or len(up_block_types) != len(
            block_out_channels
        ):
            raise ModelFileError(
                f"{STAGE}: unsupported block layout down={list(down_block_types)!r} mid={mid_block_type!r} "
                f"up={list(up_block_types)!r} for block_out_channels={list(block_out_channels)!r}"
            )

        n_blocks = len(block_out_channels)
        # diffusers' historical naming: SD1.5 configs store the head count in attention_head_dim.
        heads = _per_block(num_attention_heads or attention_head_dim, n_blocks, "num_attention_heads")
        head_dims = _per_block(attention_head_dim, n_blocks, "attention_head_dim")
        cross_only = _per_block(only_cross_attention, n_blocks, "only_cross_attention")
        transformer_layers = _per_block(transformer_layers_per_block, n_blocks, "transformer_layers_per_block")
        upcast = bool(upcast_attention)

        self.conv_in_condition = nn.Conv2d(
            in_channels + conditioning_channels,
            block_out_channels[0],
            kernel_size=CONV_IN_KERNEL,
            padding=CONV_IN_KERNEL // 2,
        )
        time_embed_dim = block_out_channels[0] * TIME_EMBED_MULTIPLIER
        self.time_proj = Timesteps(block_out_channels[0], flip_sin_to_cos, freq_shift)
        self.time_embedding = TimestepEmbedding(block_out_channels[0], time_embed_dim, act_fn=act_fn)

        self.down_blocks = nn.ModuleList()
        self.brushnet_down_blocks = nn.ModuleList([_tap_conv(block_out_channels[0])])
        output_channel = block_out_channels[0]
        for i, block_type in enumerate(down_block_types):
            input_channel, output_channel = output_channel, block_out_channels[i]
            is_final_block = i == n_blocks - 1
            self.down_blocks.append(
                get_down_block(
                    block_type,
                    num_layers=layers_per_block,
                    transformer_layers_per_block=transformer_layers[i],
                    in_channels=input_channel,
                    out_channels=output_channel,
                    temb_channels=time_embed_dim,
                    add_downsample=not is_final_block,
                    resnet_eps=norm_eps,
                    resnet_act_fn=act_fn,
                    resnet_groups=norm_num_groups,
                    cross_attention_dim=cross_attention_dim,
                    num_attention_heads=heads[i],
                    attention_head_dim=head_dims[i],
                    downsample_padding=downsample_padding,
                    use_linear_projection=use_linear_projection,
                    only_cross_attention=cross_only[i],
                    upcast_attention=upcast,
                    resnet_time_scale_shift=resnet_time_scale_shift,
                )
            )
            n_taps = layers_per_block + (0 if is_final_block else 1)
            self.brushnet_down_blocks.extend(_tap_conv(output_channel) for _ in range(n_taps))

        mid_channel = block_out_channels[-1]
        self.mid_block = get_mid_block(
            mid_block_type,
            transformer_layers_per_block=transformer_layers[-1],
            in_channels=mid_channel,
            temb_channels=time_embed_dim,
            resnet_eps=norm_eps,
            resnet_act_fn=act_fn,
            output_scale_factor=mid_block_scale_factor,
            resnet_time_scale_shift=resnet_time_scale_shift,
            cross_attention_dim=cross_attention_dim,
            num_attention_heads=heads[-1],
            resnet_groups=norm_num_groups,
            use_linear_projection=use_linear_projection,
            upcast_attention=upcast,
        )
        self.brushnet_mid_block = _tap_conv(mid_channel)

        self.up_blocks = nn.ModuleList()
        self.brushnet_up_blocks = nn.ModuleList()
        reversed_channels = list(reversed(block_out_channels))
        reversed_heads = list(reversed(heads))
        reversed_transformer_layers = list(reversed(transformer_layers))
        reversed_cross_only = list(reversed(cross_only))
        output_channel = reversed_channels[0]
        for i, block_type in enumerate(up_block_types):
            is_final_block = i == n_blocks - 1
            prev_output_channel, output_channel = output_channel, reversed_channels[i]
            input_channel = reversed_channels[min(i + 1, n_blocks - 1)]
            self.up_blocks.append(
                get_up_block(
                    block_type,
                    num_layers=layers_per_block + 1,
                    transformer_layers_per_block=reversed_transformer_layers[i],
                    in_channels=input_channel,
                    out_channels=output_channel,
                    prev_output_channel=prev_output_channel,
                    temb_channels=time_embed_dim,
                    add_upsample=not is_final_block,
                    resnet_eps=norm_eps,
                    resnet_act_fn=act_fn,
                    resolution_idx=i,
                    resnet_groups=norm_num_groups,
                    cross_attention_dim=cross_attention_dim,
                    num_attention_heads=reversed_heads[i],
                    use_linear_projection=use_linear_projection,
                    only_cross_attention=reversed_cross_only[i],
                    upcast_attention=upcast,
                    resnet_time_scale_shift=resnet_time_scale_shift,
                    # Index not reversed, as the reference does; up blocks ignore it (they use num_attention_heads).
                    attention_head_dim=head_dims[i],
                )
            )
            n_taps = layers_per_block + 1 + (0 if is_final_block else 1)
            self.brushnet_up_blocks.extend(_tap_conv(output_channel) for _ in range(n_taps))

    def _time_embedding(self, timestep, batch: int, device) -> torch.Tensor:
        if not torch.is_tensor(timestep):
            timestep = torch.tensor([timestep], device=device)
        timesteps = timestep.to(device).reshape(-1).expand(batch)
        t_emb = self.time_proj(timesteps).to(self.time_embedding.linear_1.weight.dtype)
        return self.time_embedding(t_emb)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: Union[torch.Tensor, float, int],
        encoder_hidden_states: torch.Tensor,
        brushnet_cond: torch.Tensor,
        conditioning_scale: float = 1.0,
    ) -> Tuple[List[torch.Tensor], torch.Tensor, List[torch.Tensor]]:
        """Residuals for the motion UNet, frame by frame.

        sample [N, 4, h, w] noisy latents (frames folded into N); timestep scalar or [N]; encoder_hidden_states
        [N or 1, L, D]; brushnet_cond [N, 5, h, w]. Returns (down: 12 tensors, mid, up: 15 tensors) for the SD1.5
        layout, each multiplied by conditioning_scale, in the weights' dtype.
        """
        if sample.ndim != 4 or brushnet_cond.ndim != 4 or sample.shape[0] != brushnet_cond.shape[0] or (
            sample.shape[2:] != brushnet_cond.shape[2:]
        ):
            raise InputError(
                f"{STAGE}: sample {tuple(sample.shape)} and brushnet_cond {tuple(brushnet_cond.shape)} must both be "
                f"[N, C, h, w] with the same N, h, w"
            )
        expected_channels = self.config.in_channels + self.config.conditioning_channels
        if sample.shape[1] + brushnet_cond.shape[1] != expected_channels:
            raise InputError(
                f"{STAGE}: sample has {sample.shape[1]} channels and brushnet_cond {brushnet_cond.shape[1]}; "
                f"expected {self.config.in_channels} + {self.config.conditioning_channels}"
            )
        dtype = self.conv_in_condition.weight.dtype
        if self.config.brushnet_conditioning_channel_order == "bgr":
            brushnet_cond = torch.flip(brushnet_cond, dims=[1])
        text = match_text_batch(encoder_hidden_states, sample.shape[0], STAGE).to(dtype)
        emb = self._time_embedding(timestep, sample.shape[0], sample.device)

        hidden = self.conv_in_condition(torch.cat([sample.to(dtype), brushnet_cond.to(dtype)], dim=1))
        skips = [hidden]
        for block in self.down_blocks:
            if getattr(block, "has_cross_attention", False):
                hidden, block_skips = block(hidden_states=hidden, temb=emb, encoder_hidden_states=text)
            else:
                hidden, block_skips = block(hidden_states=hidden, temb=emb)
            skips.extend(block_skips)
        down_taps = [tap(skip) for tap, skip in zip(self.brushnet_down_blocks, skips)]

        hidden = self.mid_block(hidden, emb, encoder_hidden_states=text)
        mid_tap = self.brushnet_mid_block(hidden)

        up_features = self._decoder_features(hidden, emb, text, skips)
        up_taps = [tap(feature) for tap, feature in zip(self.brushnet_up_blocks, up_features)]

        if conditioning_scale != 1.0:
            down_taps = [t * conditioning_scale for t in down_taps]
            mid_tap = mid_tap * conditioning_scale
            up_taps = [t * conditioning_scale for t in up_taps]
        return down_taps, mid_tap, up_taps

    def _decoder_features(self, hidden, emb, text, skips: List[torch.Tensor]):
        """Yield the output of every decoder layer (resnet, then cross-attention if any) and every upsampler."""
        for block_index, block in enumerate(self.up_blocks):
            is_final_block = block_index == len(self.up_blocks) - 1
            attentions = getattr(block, "attentions", None)
            for i, resnet in enumerate(block.resnets):
                hidden = torch.cat([hidden, skips.pop()], dim=1)
                hidden = resnet(hidden, emb)
                if attentions is not None:
                    hidden = attentions[i](hidden, encoder_hidden_states=text, return_dict=False)[0]
                yield hidden
            if block.upsamplers is not None:
                # The reference always upsamples to the next skip's exact size (odd latent sizes included).
                output_size = None if is_final_block else skips[-1].shape[2:]
                for upsampler in block.upsamplers:
                    hidden = upsampler(hidden, output_size)
                yield hidden

