"""DiffuEraser sampling (BrushNet-conditioned motion UNet over staggered windows) and the final feathered blend."""

from __future__ import annotations

import logging

from diffueraser_core.blend import DEFAULT_FEATHER
from diffueraser_core.errors import InputError
from diffueraser_core.masks import DEFAULT_MASK_DILATION
from diffueraser_core.windows import DEFAULT_WINDOW_LENGTH, MAX_WINDOW_LENGTH, OVERLAP_DIVISOR

from .bridge import ComfyVaeCodec, conditioning_to_embeddings, get_runtime
from .comfy_io import io, unique_id
from .common import (
    CATEGORY_ROOT,
    DiffuEraserModelType,
    frames_from_image,
    mask_input,
    masks_and_dilation,
)
from .nodes_prior import _cross_attention_dim

log = logging.getLogger(__name__)

# Reference defaults (reference-spec sections 3, 5, 7, 8), from the core modules that use them.
DEFAULT_STEPS = 2
DEFAULT_WINDOW_OVERLAP = DEFAULT_WINDOW_LENGTH // OVERLAP_DIVISOR
LEGACY_DILATION_TOOLTIP = ("Only for a plain MASK input: square dilation iterations after one erosion (reference "
                           "8). Ignored with a prepared mask, whose mask_dilation applies to every node.")


class DiffuEraserSampler(io.ComfyNode):
    NODE = "DiffuEraser Sampler"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiffuEraserSampler",
            display_name=cls.NODE,
            category=f"{CATEGORY_ROOT}/sampling",
            description=("Runs DiffuEraser: BrushNet conditions the motion UNet on the masked frames, window by "
                         "window with staggered windows, from the injected prior."),
            inputs=[
                DiffuEraserModelType.Input("diffueraser_model", tooltip="From the DiffuEraser Model Loader."),
                io.Vae.Input("vae", tooltip="The SD1.5 VAE, to encode the masked frames for BrushNet."),
                io.Conditioning.Input("positive", tooltip=(
                    "Prompt from CLIPTextEncode with the SD1.5 text encoder (CLIP-L). The reference uses the "
                    "empty prompt.")),
                io.Image.Input("images", tooltip=(
                    "The original video frames (any size; resized to the latent's working size here).")),
                mask_input("What to remove: the prepared mask from DiffuEraser Prepare Mask, or a plain raw "
                           "(undilated) MASK: one per frame or a single mask for all frames."),
                io.Latent.Input("latent", tooltip="Start latents from DiffuEraser Prior Injection."),
                io.Int.Input("steps", default=DEFAULT_STEPS, min=1, max=50, step=1, tooltip=(
                    "TCD steps; match the PCM LoRA (2 for pcm_sd15_smallcfg_2step, as the reference).")),
                io.Float.Input("cfg", default=0.0, min=0.0, max=30.0, step=0.1, tooltip=(
                    "Guidance scale; used only above 1 with a negative prompt connected (the reference forces "
                    "0).")),
                io.Int.Input("window_length", default=DEFAULT_WINDOW_LENGTH, min=1, max=MAX_WINDOW_LENGTH, step=1,
                             tooltip=("Frames per temporal window (reference 22; at most 32, the motion modules' "
                                      "limit). Lower it if a window does not fit in memory.")),
                io.Int.Input("window_overlap", default=DEFAULT_WINDOW_OVERLAP, min=0, max=MAX_WINDOW_LENGTH - 1,
                             step=1, tooltip=("Frames shared by consecutive windows (reference 22 // 4 = 5); must "
                                              "be smaller than window_length.")),
                io.Float.Input("brushnet_scale", default=1.0, min=0.0, max=2.0, step=0.05,
                               tooltip="BrushNet conditioning scale (reference 1.0)."),
                io.Boolean.Input("pre_inference", default=True, tooltip=(
                    "For videos longer than two windows, first sample keyframes spread over the whole video and "
                    "use them as known frames (reference behaviour; better long-range consistency).")),
                io.Int.Input("mask_dilation", default=DEFAULT_MASK_DILATION, min=0, max=64, step=1,
                             tooltip=LEGACY_DILATION_TOOLTIP),
                io.Conditioning.Input("negative", optional=True, tooltip="Negative prompt, only used when cfg > 1."),
            ],
            outputs=[
                io.Latent.Output(display_name="latent", tooltip=(
                    "Raw clean latents at the working size; decode them with the core VAEDecode node.")),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, diffueraser_model, vae, positive, images, mask, latent, steps, cfg, window_length,
                window_overlap, brushnet_scale, pre_inference, mask_dilation, negative=None):
        from diffueraser_core.pipeline import SamplerSettings, sample_video
        from diffueraser_core.prior_injection import StartLatents

        node = cls.NODE
        if int(window_overlap) >= int(window_length):
            raise InputError(
                f"{node}: window_overlap {window_overlap} must be smaller than window_length {window_length}"
            )
        runtime = get_runtime(node, unique_id(cls))
        start = StartLatents.from_latent_dict(latent, where=node)
        frames = frames_from_image(images, node)
        holes, dilation = masks_and_dilation(mask, mask_dilation, frames.shape[0], tuple(frames.shape[1:3]), node)
        dim = _cross_attention_dim(diffueraser_model)
        text = conditioning_to_embeddings(positive, node, dim)
        neg = conditioning_to_embeddings(negative, node, dim) if negative is not None else None
        settings = SamplerSettings(
            steps=int(steps), guidance_scale=float(cfg), window_length=int(window_length),
            window_overlap=int(window_overlap), brushnet_scale=float(brushnet_scale),
            pre_inference=bool(pre_inference), mask_dilation=dilation,
        )
        codec = ComfyVaeCodec(vae, runtime, node=node)
        samples = sample_video(start, frames, holes, text, neg, diffueraser_model, codec, settings, runtime)
        return io.NodeOutput({"samples": samples})


class DiffuEraserBlend(io.ComfyNode):
    NODE = "DiffuEraser Blend"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiffuEraserBlend",
            display_name=cls.NODE,
            category=f"{CATEGORY_ROOT}/postprocess",
            description=("Composites the generated frames over the original video at its original size with a "
                         "feathered mask, as the reference's final blending."),
            inputs=[
                io.Image.Input("images", tooltip="The original video frames; the output has their size."),
                io.Image.Input("generated", tooltip=(
                    "DiffuEraser's frames (VAEDecode of the sampler's latent), or any inpainted frames; resized "
                    "to the original size.")),
                mask_input("The prepared mask from DiffuEraser Prepare Mask, or the plain raw (undilated) MASK "
                           "given to the sampler: one per frame or a single mask."),
                io.Int.Input("mask_dilation", default=DEFAULT_MASK_DILATION, min=0, max=64, step=1,
                             tooltip=LEGACY_DILATION_TOOLTIP),
                io.Int.Input("feather", default=DEFAULT_FEATHER, min=1, max=255, step=2, tooltip=(
                    "Gaussian feather kernel size in pixels, odd (reference 21; 1 = hard edge).")),
            ],
            outputs=[
                io.Image.Output(display_name="images", tooltip=(
                    "The original frames with the generated content feathered into the masked area; pixels "
                    "outside it are the original's, bit for bit.")),
            ],
        )

    @classmethod
    def execute(cls, images, generated, mask, mask_dilation, feather):
        import torch

        from diffueraser_core.blend import blend_images

        node = cls.NODE
        num = int(images.shape[0]) if isinstance(images, torch.Tensor) and images.dim() == 4 else 1
        size = tuple(images.shape[1:3]) if isinstance(images, torch.Tensor) and images.dim() == 4 else None
        if size is None:
            raise InputError(f"{node}: images must be an IMAGE [frames, height, width, 3|4], got "
                             f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
        holes, dilation = masks_and_dilation(mask, mask_dilation, num, size, node)
        # float IMAGE in, float IMAGE out: untouched pixels keep the input's own values bit for bit (blend_images)
        return io.NodeOutput(blend_images(images, generated, holes, dilation, int(feather), node=node))
