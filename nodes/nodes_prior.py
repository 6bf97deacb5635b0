"""Prior nodes: the ProPainter prior (also a complete quick removal on its own) and its injection as the sampler's
starting latent."""

from __future__ import annotations

import logging

from diffueraser_core.errors import InputError
from diffueraser_core.video import DEFAULT_MAX_SIDE, MAX_SIDE_RANGE

from .bridge import ComfyVaeCodec, conditioning_to_embeddings, get_runtime
from .comfy_io import io, unique_id
from .common import (
    CATEGORY_ROOT,
    MAX_SEED,
    DiffuEraserModelType,
    ProPainterModelType,
    frames_from_image,
    image_from_frames,
    mask_input,
    masks_and_dilation,
)

log = logging.getLogger(__name__)

# Defaults of the node. ProPainter's own inference defaults (reference-spec section 9), except subvideo_length:
# the node's prior feeds DiffuEraser, whose reference run passes 50 (run_diffueraser.py), not ProPainter's 80.
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


class DiffuEraserProPainterPrior(io.ComfyNode):
    NODE = "DiffuEraser ProPainter Prior"

    @classmethod
    def define_schema(cls):
        d = PROPAINTER_DEFAULTS
        return io.Schema(
            node_id="DiffuEraserProPainterPrior",
            display_name=cls.NODE,
            category=f"{CATEGORY_ROOT}/prior",
            description=("Removes the masked object with ProPainter (flow-guided propagation + transformer). The "
                         "result is DiffuEraser's prior; on its own it is a fast, complete removal."),
            inputs=[
                io.Image.Input("images", tooltip="The video frames (an IMAGE batch, one image per frame)."),
                mask_input("What to remove: the prepared mask from DiffuEraser Prepare Mask (its mask_dilation "
                           "applies), or a plain MASK (1 = remove; one per frame or one for all frames)."),
                ProPainterModelType.Input("propainter_model", tooltip="From the DiffuEraser ProPainter Loader."),
                io.Float.Input("resize_ratio", default=d["resize_ratio"], min=0.1, max=1.0, step=0.05, tooltip=(
                    "ProPainter works at this fraction of the input size (reference 0.6); the result is upscaled "
                    "back and composited into the masked area.")),
                io.Int.Input("max_side", default=d["max_side"], min=64, max=4096, step=8, tooltip=(
                    "Further downscale so the longer working side is at most this (reference 960).")),
                io.Int.Input("mask_dilation", default=d["mask_dilation"], min=0, max=64, step=1, tooltip=(
                    "Only for a plain MASK input: cross-shaped dilation iterations (ProPainter default 4). "
                    "Ignored with a prepared mask, whose mask_dilation applies to every node.")),
                io.Int.Input("ref_stride", default=d["ref_stride"], min=1, max=100, step=1, tooltip=(
                    "Distance between the global reference frames the transformer looks at.")),
                io.Int.Input("neighbor_length", default=d["neighbor_length"], min=2, max=100, step=1, tooltip=(
                    "Number of local neighbouring frames per transformer pass.")),
                io.Int.Input("subvideo_length", default=d["subvideo_length"], min=10, max=1000, step=1, tooltip=(
                    "Frames processed together (flow completion, transformer); 50 as DiffuEraser's reference "
                    "(ProPainter alone uses 80). Lower it for long or large videos if memory runs out.")),
                io.Int.Input("raft_iter", default=d["raft_iter"], min=1, max=100, step=1, tooltip=(
                    "RAFT refinement iterations for the optical flow (reference 20).")),
            ],
            outputs=[
                io.Image.Output(display_name="prior", tooltip=(
                    "Frames with the masked area filled by ProPainter (input size; untouched outside the dilated "
                    "mask). Usable as the final result for a quick removal.")),
                io.Mask.Output(display_name="dilated_mask", tooltip="The dilated mask ProPainter filled."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, images, mask, propainter_model, resize_ratio, max_side, mask_dilation, ref_stride,
                neighbor_length, subvideo_length, raft_iter):
        from diffueraser_core.prior_propainter import ProPainterSettings, run_propainter_prior

        runtime = get_runtime(cls.NODE, unique_id(cls))
        frames = frames_from_image(images, cls.NODE)
        holes, dilation = masks_and_dilation(mask, mask_dilation, frames.shape[0], tuple(frames.shape[1:3]),
                                             cls.NODE)
        settings = ProPainterSettings(
            resize_ratio=float(resize_ratio), max_side=int(max_side), mask_dilation=dilation,
            ref_stride=int(ref_stride), neighbor_length=int(neighbor_length),
            subvideo_length=int(subvideo_length), raft_iter=int(raft_iter),
        )
        result = run_propainter_prior(frames, holes, propainter_model, settings, runtime)
        del frames, holes
        return io.NodeOutput(image_from_frames(result.frames), result.masks.float())


class DiffuEraserPriorInjection(io.ComfyNode):
    NODE = "DiffuEraser Prior Injection"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiffuEraserPriorInjection",
            display_name=cls.NODE,
            category=f"{CATEGORY_ROOT}/prior",
            description=("Encodes the prior at the working size and turns it into the DiffuEraser sampler's "
                         "starting latent (forward noising to t=999 as the reference, or DDIM inversion)."),
            inputs=[
                io.Vae.Input("vae", tooltip="The SD1.5 VAE (vae-ft-mse-840000-ema-pruned) from VAELoader."),
                io.Image.Input("prior", tooltip="The ProPainter prior frames (ProPainter Prior node)."),
                io.Int.Input("seed", default=0, min=0, max=MAX_SEED, step=1, control_after_generate=True, tooltip=(
                    "Seed of the window noise (one noise window repeated over the video, as the reference).")),
                io.Combo.Input("mode", options=INJECTION_MODES, default="forward_noise", tooltip=(
                    "forward_noise: the prior noised to t=999 (what the reference code does). ddim_inversion: "
                    "deterministic DDIM inversion with the model (the paper's description; needs "
                    "diffueraser_model and positive).")),
                io.Float.Input("strength", default=1.0, min=0.01, max=1.0, step=0.01, tooltip=(
                    "How far into the noise schedule to start (1.0 = t=999, reference). Lower keeps more of the "
                    "prior.")),
                io.Int.Input("max_side", default=DEFAULT_MAX_SIDE, min=MAX_SIDE_RANGE[0], max=MAX_SIDE_RANGE[1],
                             step=8, tooltip=(
                                 "Working size: the longer side is scaled down to at most this, both sides "
                                 "rounded down to multiples of 8 (reference 960).")),
                io.Int.Input("inversion_steps", default=DEFAULT_INVERSION_STEPS, min=1, max=50, step=1, tooltip=(
                    "ddim_inversion only: number of inversion steps; use the sampler's step count.")),
                DiffuEraserModelType.Input("diffueraser_model", optional=True,
                                           tooltip="Needed for ddim_inversion only."),
                io.Conditioning.Input("positive", optional=True, tooltip=(
                    "Needed for ddim_inversion only: the (empty) prompt from CLIPTextEncode with the SD1.5 text "
                    "encoder.")),
            ],
            outputs=[
                io.Latent.Output(display_name="latent", tooltip=(
                    "Raw start latents at the working size, with what the sampler needs to continue.")),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, vae, prior, seed, mode, strength, max_side, inversion_steps, diffueraser_model=None,
                positive=None):
        from diffueraser_core import prior_injection, video
        from diffueraser_core.pipeline import encode_prior

        node = cls.NODE
        runtime = get_runtime(node, unique_id(cls))
        frames = frames_from_image(prior, node)
        size = video.working_size(int(frames.shape[1]), int(frames.shape[2]), int(max_side), node=node)
        if mode == "ddim_inversion" and (diffueraser_model is None or positive is None):
            raise InputError(
                f"{node}: mode 'ddim_inversion' needs the diffueraser_model and positive inputs "
                f"connected (got diffueraser_model={'set' if diffueraser_model is not None else 'None'}, "
                f"positive={'set' if positive is not None else 'None'})"
            )
        codec = ComfyVaeCodec(vae, runtime, node=node)
        settings = prior_injection.InjectionSettings(
            mode=mode, seed=int(seed), strength=float(strength), inversion_steps=int(inversion_steps)
        )
        prior_latent = encode_prior(frames, size, codec, runtime)
        if mode == "forward_noise":
            start = prior_injection.inject_forward_noise(prior_latent, settings)
        else:
            from diffueraser_core import temporal_sampling

            text = conditioning_to_embeddings(positive, node, _cross_attention_dim(diffueraser_model))
            # The inversion is conditioned on the prior itself, every pixel known: its latents are the ones just
            # encoded, so no second VAE pass.
            conditioning = temporal_sampling.Conditioning.all_known(prior_latent)
            start = prior_injection.invert_prior(prior_latent, conditioning, text, diffueraser_model, settings,
                                                 runtime)
        return io.NodeOutput(start.to_latent_dict())


def _cross_attention_dim(models):
    config = getattr(getattr(models.unet, "module", None), "config", None)
    return getattr(config, "cross_attention_dim", None) if config is not None else None
