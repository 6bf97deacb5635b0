"""DiffuEraser sampling (BrushNet-conditioned motion UNet over staggered windows) and the final feathered blend."""

from __future__ import annotations

import logging

from diffueraser_core.blend import DEFAULT_FEATHER
from diffueraser_core.errors import InputError
from diffueraser_core.masks import DEFAULT_MASK_DILATION
from diffueraser_core.windows import DEFAULT_WINDOW_LENGTH, MAX_WINDOW_LENGTH, OVERLAP_DIVISOR

from .bridge import ComfyVaeCodec, conditioning_to_embeddings, get_runtime
from .common import CATEGORY_ROOT, DIFFUERASER_MODEL, frames_from_image, image_from_frames, masks_for_video
from .nodes_prior import _cross_attention_dim

log = logging.getLogger(__name__)

# Reference defaults (reference-spec sections 3, 5, 7, 8), from the core modules that use them.
DEFAULT_STEPS = 2
DEFAULT_WINDOW_OVERLAP = DEFAULT_WINDOW_LENGTH // OVERLAP_DIVISOR


class DiffuEraserSampler:
    NODE = "DiffuEraser Sampler"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "diffueraser_model": (DIFFUERASER_MODEL, {"tooltip": "From the DiffuEraser Model Loader."}),
                "vae": ("VAE", {"tooltip": "The SD1.5 VAE, to encode the masked frames for BrushNet."}),
                "positive": ("CONDITIONING", {
                    "tooltip": "Prompt from CLIPTextEncode with the SD1.5 text encoder (CLIP-L). The reference "
                               "uses the empty prompt.",
                }),
                "images": ("IMAGE", {"tooltip": "The original video frames (any size; resized to the latent's "
                                                "working size here)."}),
                "mask": ("MASK", {"tooltip": "What to remove (1 = remove), raw (undilated): one per frame or a "
                                             "single mask for all frames."}),
                "latent": ("LATENT", {"tooltip": "Start latents from DiffuEraser Prior Injection."}),
                "steps": ("INT", {
                    "default": DEFAULT_STEPS, "min": 1, "max": 50, "step": 1,
                    "tooltip": "TCD steps; match the PCM LoRA (2 for pcm_sd15_smallcfg_2step, as the reference).",
                }),
                "cfg": ("FLOAT", {
                    "default": 0.0, "min": 0.0, "max": 30.0, "step": 0.1,
                    "tooltip": "Guidance scale; used only above 1 with a negative prompt connected (the "
                               "reference forces 0).",
                }),
                "window_length": ("INT", {
                    "default": DEFAULT_WINDOW_LENGTH, "min": 1, "max": MAX_WINDOW_LENGTH, "step": 1,
                    "tooltip": "Frames per temporal window (reference 22; at most 32, the motion modules' limit). "
                               "Lower it if a window does not fit in memory.",
                }),
                "window_overlap": ("INT", {
                    "default": DEFAULT_WINDOW_OVERLAP, "min": 0, "max": MAX_WINDOW_LENGTH - 1, "step": 1,
                    "tooltip": "Frames shared by consecutive windows (reference 22 // 4 = 5); must be smaller "
                               "than window_length.",
                }),
                "brushnet_scale": ("FLOAT", {
                    "default": 1.0, "min": 0.0, "max": 2.0, "step": 0.05,
                    "tooltip": "BrushNet conditioning scale (reference 1.0).",
                }),
                "pre_inference": ("BOOLEAN", {
                    "default": True,
                    "tooltip": "For videos longer than two windows, first sample keyframes spread over the whole "
                               "video and use them as known frames (reference behaviour; better long-range "
                               "consistency).",
                }),
                "mask_dilation": ("INT", {
                    "default": DEFAULT_MASK_DILATION, "min": 0, "max": 64, "step": 1,
                    "tooltip": "Square dilation iterations of the mask after one erosion (reference 8); use the "
                               "same value in DiffuEraser Blend.",
                }),
            },
            "optional": {
                "negative": ("CONDITIONING", {"tooltip": "Negative prompt, only used when cfg > 1."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("Raw clean latents at the working size; decode them with the core VAEDecode node.",)
    FUNCTION = "sample"
    CATEGORY = f"{CATEGORY_ROOT}/sampling"
    DESCRIPTION = ("Runs DiffuEraser: BrushNet conditions the motion UNet on the masked frames, window by window "
                   "with staggered windows, from the injected prior.")

    def sample(self, diffueraser_model, vae, positive, images, mask, latent, steps, cfg, window_length,
               window_overlap, brushnet_scale, pre_inference, mask_dilation, negative=None, unique_id=None):
        from diffueraser_core.pipeline import SamplerSettings, sample_video
        from diffueraser_core.prior_injection import StartLatents

        if int(window_overlap) >= int(window_length):
            raise InputError(
                f"{self.NODE}: window_overlap {window_overlap} must be smaller than window_length {window_length}"
            )
        runtime = get_runtime(self.NODE, unique_id)
        start = StartLatents.from_latent_dict(latent, where=self.NODE)
        frames = frames_from_image(images, self.NODE)
        holes = masks_for_video(mask, frames.shape[0], tuple(frames.shape[1:3]), self.NODE)
        dim = _cross_attention_dim(diffueraser_model)
        text = conditioning_to_embeddings(positive, self.NODE, dim)
        neg = conditioning_to_embeddings(negative, self.NODE, dim) if negative is not None else None
        settings = SamplerSettings(
            steps=int(steps), guidance_scale=float(cfg), window_length=int(window_length),
            window_overlap=int(window_overlap), brushnet_scale=float(brushnet_scale),
            pre_inference=bool(pre_inference), mask_dilation=int(mask_dilation),
        )
        codec = ComfyVaeCodec(vae, runtime, node=self.NODE)
        samples = sample_video(start, frames, holes, text, neg, diffueraser_model, codec, settings, runtime)
        return ({"samples": samples},)


class DiffuEraserBlend:
    NODE = "DiffuEraser Blend"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "The original video frames; the output has their size."}),
                "generated": ("IMAGE", {"tooltip": "DiffuEraser's frames (VAEDecode of the sampler's latent), or "
                                                   "any inpainted frames; resized to the original size."}),
                "mask": ("MASK", {"tooltip": "The raw (undilated) mask at the original size, as given to the "
                                             "sampler: one per frame or a single mask."}),
                "mask_dilation": ("INT", {
                    "default": DEFAULT_MASK_DILATION, "min": 0, "max": 64, "step": 1,
                    "tooltip": "Square dilation iterations, as in the sampler (reference 8).",
                }),
                "feather": ("INT", {
                    "default": DEFAULT_FEATHER, "min": 1, "max": 255, "step": 2,
                    "tooltip": "Gaussian feather kernel size in pixels, odd (reference 21; 1 = hard edge).",
                }),
            },
        }

    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    OUTPUT_TOOLTIPS = ("The original frames with the generated content feathered into the masked area; pixels "
                       "outside it are the original's, bit for bit.",)
    FUNCTION = "blend"
    CATEGORY = f"{CATEGORY_ROOT}/postprocess"
    DESCRIPTION = ("Composites the generated frames over the original video at its original size with a "
                   "feathered mask, as the reference's final blending.")

    def blend(self, images, generated, mask, mask_dilation, feather):
        from diffueraser_core.blend import blend_images

        return (blend_images(images, generated, mask, int(mask_dilation), int(feather), node=self.NODE),)
