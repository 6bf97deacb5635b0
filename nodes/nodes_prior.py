"""Prior nodes: the ProPainter prior (also a complete quick removal on its own) and its injection as the sampler's
starting latent."""

from __future__ import annotations

import logging

from diffueraser_core.errors import InputError
from diffueraser_core.video import DEFAULT_MAX_SIDE, MAX_SIDE_RANGE

from .bridge import ComfyVaeCodec, conditioning_to_embeddings, get_runtime
from .common import (
    CATEGORY_ROOT,
    DIFFUERASER_MODEL,
    MAX_SEED,
    PROPAINTER_MODEL,
    frames_from_image,
    image_from_frames,
    masks_for_video,
)

log = logging.getLogger(__name__)

# Reference defaults of ProPainter's inference (reference-spec section 9); must equal ProPainterSettings'.
PROPAINTER_DEFAULTS = {
    "resize_ratio": 0.6,
    "max_side": 960,
    "mask_dilation": 4,
    "ref_stride": 10,
    "neighbor_length": 10,
    "subvideo_length": 50,  # run_diffueraser's value (ProPainter alone: 80)
    "raft_iter": 20,
}
INJECTION_MODES = ["forward_noise", "ddim_inversion"]
DEFAULT_INVERSION_STEPS = 2


class DiffuEraserProPainterPrior:
    NODE = "DiffuEraser ProPainter Prior"

    @classmethod
    def INPUT_TYPES(cls):
        d = PROPAINTER_DEFAULTS
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "The video frames (an IMAGE batch, one image per frame)."}),
                "mask": ("MASK", {"tooltip": "What to remove (1 = remove): one mask per frame, or a single mask "
                                             "used for every frame."}),
                "propainter_model": (PROPAINTER_MODEL, {"tooltip": "From the DiffuEraser ProPainter Loader."}),
                "resize_ratio": ("FLOAT", {
                    "default": d["resize_ratio"], "min": 0.1, "max": 1.0, "step": 0.05,
                    "tooltip": "ProPainter works at this fraction of the input size (reference 0.6); the result "
                               "is upscaled back and composited into the masked area.",
                }),
                "max_side": ("INT", {
                    "default": d["max_side"], "min": 64, "max": 4096, "step": 8,
                    "tooltip": "Further downscale so the longer working side is at most this (reference 960).",
                }),
                "mask_dilation": ("INT", {
                    "default": d["mask_dilation"], "min": 0, "max": 64, "step": 1,
                    "tooltip": "Cross-shaped dilation iterations of the mask (ProPainter default 4; the "
                               "DiffuEraser reference pipeline uses 8).",
                }),
                "ref_stride": ("INT", {
                    "default": d["ref_stride"], "min": 1, "max": 100, "step": 1,
                    "tooltip": "Distance between the global reference frames the transformer looks at.",
                }),
                "neighbor_length": ("INT", {
                    "default": d["neighbor_length"], "min": 2, "max": 100, "step": 1,
                    "tooltip": "Number of local neighbouring frames per transformer pass.",
                }),
                "subvideo_length": ("INT", {
                    "default": d["subvideo_length"], "min": 10, "max": 1000, "step": 1,
                    "tooltip": "Frames processed together (flow completion, transformer). Lower it for long or "
                               "large videos if memory runs out; device memory depends on it, not on length.",
                }),
                "raft_iter": ("INT", {
                    "default": d["raft_iter"], "min": 1, "max": 100, "step": 1,
                    "tooltip": "RAFT refinement iterations for the optical flow (reference 20).",
                }),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    RETURN_TYPES = ("IMAGE", "MASK")
    RETURN_NAMES = ("prior", "dilated_mask")
    OUTPUT_TOOLTIPS = (
        "Frames with the masked area filled by ProPainter (input size; untouched outside the dilated mask). "
        "Usable as the final result for a quick removal.",
        "The dilated mask ProPainter filled.",
    )
    FUNCTION = "run"
    CATEGORY = f"{CATEGORY_ROOT}/prior"
    DESCRIPTION = ("Removes the masked object with ProPainter (flow-guided propagation + transformer). The result "
                   "is DiffuEraser's prior; on its own it is a fast, complete removal.")

    def run(self, images, mask, propainter_model, resize_ratio, max_side, mask_dilation, ref_stride,
            neighbor_length, subvideo_length, raft_iter, unique_id=None):
        from diffueraser_core.prior_propainter import ProPainterSettings, run_propainter_prior

        runtime = get_runtime(self.NODE, unique_id)
        frames = frames_from_image(images, self.NODE)
        holes = masks_for_video(mask, frames.shape[0], tuple(frames.shape[1:3]), self.NODE)
        settings = ProPainterSettings(
            resize_ratio=float(resize_ratio), max_side=int(max_side), mask_dilation=int(mask_dilation),
            ref_stride=int(ref_stride), neighbor_length=int(neighbor_length),
            subvideo_length=int(subvideo_length), raft_iter=int(raft_iter),
        )
        result = run_propainter_prior(frames, holes, propainter_model, settings, runtime)
        del frames, holes
        return (image_from_frames(result.frames), result.masks.float())


class DiffuEraserPriorInjection:
    NODE = "DiffuEraser Prior Injection"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vae": ("VAE", {"tooltip": "The SD1.5 VAE (vae-ft-mse-840000-ema-pruned) from VAELoader."}),
                "prior": ("IMAGE", {"tooltip": "The ProPainter prior frames (ProPainter Prior node)."}),
                "seed": ("INT", {
                    "default": 0, "min": 0, "max": MAX_SEED, "step": 1, "control_after_generate": True,
                    "tooltip": "Seed of the window noise (one noise window repeated over the video, as the "
                               "reference).",
                }),
                "mode": (INJECTION_MODES, {
                    "default": "forward_noise",
                    "tooltip": "forward_noise: the prior noised to t=999 (what the reference code does). "
                               "ddim_inversion: deterministic DDIM inversion with the model (the paper's "
                               "description; needs diffueraser_model and positive).",
                }),
                "strength": ("FLOAT", {
                    "default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01,
                    "tooltip": "How far into the noise schedule to start (1.0 = t=999, reference). Lower keeps "
                               "more of the prior.",
                }),
                "max_side": ("INT", {
                    "default": DEFAULT_MAX_SIDE, "min": MAX_SIDE_RANGE[0], "max": MAX_SIDE_RANGE[1], "step": 8,
                    "tooltip": "Working size: the longer side is scaled down to at most this, both sides rounded "
                               "down to multiples of 8 (reference 960).",
                }),
                "inversion_steps": ("INT", {
                    "default": DEFAULT_INVERSION_STEPS, "min": 1, "max": 50, "step": 1,
                    "tooltip": "ddim_inversion only: number of inversion steps; use the sampler's step count.",
                }),
            },
            "optional": {
                "diffueraser_model": (DIFFUERASER_MODEL, {"tooltip": "Needed for ddim_inversion only."}),
                "positive": ("CONDITIONING", {"tooltip": "Needed for ddim_inversion only: the (empty) prompt "
                                                          "from CLIPTextEncode with the SD1.5 text encoder."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("Raw start latents at the working size, with what the sampler needs to continue.",)
    FUNCTION = "inject"
    CATEGORY = f"{CATEGORY_ROOT}/prior"
    DESCRIPTION = ("Encodes the prior at the working size and turns it into the DiffuEraser sampler's starting "
                   "latent (forward noising to t=999 as the reference, or DDIM inversion).")

    def inject(self, vae, prior, seed, mode, strength, max_side, inversion_steps, diffueraser_model=None,
               positive=None, unique_id=None):
        from diffueraser_core import prior_injection, video
        from diffueraser_core.pipeline import encode_prior

        runtime = get_runtime(self.NODE, unique_id)
        frames = frames_from_image(prior, self.NODE)
        size = video.working_size(int(frames.shape[1]), int(frames.shape[2]), int(max_side), node=self.NODE)
        codec = ComfyVaeCodec(vae, runtime, node=self.NODE)
        settings = prior_injection.InjectionSettings(
            mode=mode, seed=int(seed), strength=float(strength), inversion_steps=int(inversion_steps)
        )
        prior_latent = encode_prior(frames, size, codec)
        if mode == "forward_noise":
            start = prior_injection.inject_forward_noise(prior_latent, settings)
        else:
            if diffueraser_model is None or positive is None:
                raise InputError(
                    f"{self.NODE}: mode 'ddim_inversion' needs the diffueraser_model and positive inputs "
                    f"connected (got diffueraser_model={'set' if diffueraser_model is not None else 'None'}, "
                    f"positive={'set' if positive is not None else 'None'})"
                )
            from diffueraser_core import temporal_sampling

            text = conditioning_to_embeddings(positive, self.NODE, _cross_attention_dim(diffueraser_model))
            # The inversion is conditioned on the prior itself, every pixel known: its latents are the ones just
            # encoded, so no second VAE pass.
            conditioning = temporal_sampling.Conditioning.all_known(prior_latent)
            start = prior_injection.invert_prior(prior_latent, conditioning, text, diffueraser_model, settings,
                                                 runtime)
        return (start.to_latent_dict(),)


def _cross_attention_dim(models):
    config = getattr(getattr(models.unet, "module", None), "config", None)
    return getattr(config, "cross_attention_dim", None) if config is not None else None
