"""Keyframes across the whole video, denoised first and written back before the main pass (reference section 6).

For a video longer than two windows (N > 2 * 22, quirk 6), one window made of the keyframes
``int(i * (N / L))`` (i = 0..L-1, in floating point, dividing first, as the reference) is sampled first, starting from the prior latents of those frames noised with the
same window noise (noise row i for keyframe i). Their results then act as fully known BrushNet conditioning in the
main pass: for each keyframe the prior latent becomes the result, the mask becomes all known and the masked image
becomes the decoded result (so its conditioning latent is the encode of that decode). The main pass re-noises the
keyframes' new prior latents like every other frame. Final blending still uses the original frames and masks.

In ``ddim_inversion`` mode the keyframe window starts from the video's inverted start latents at those frames and
the keyframes' new start latents are the DDIM inversion of their result under the new conditioning.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from .prior_injection import StartLatents, forward_noise_latents, inversion_pairs
from .schedule import VAE_SCALING, SamplerStep, pairs_down
from .temporal_sampling import Conditioning, WindowSettings, denoise_windows

log = logging.getLogger(__name__)

#: pre-inference runs only on videos longer than this many windows (reference: N > 2 * 22)
MIN_WINDOWS_FOR_PRE_INFERENCE = 2
STAGE = "pre-inference"


def should_pre_infer(num_frames: int, window_length: int, start: StartLatents, enabled: bool = True) -> bool:
    if not enabled or num_frames <= MIN_WINDOWS_FOR_PRE_INFERENCE * window_length:
        return False
    if start.prior_latent is None:
        log.info("DiffuEraser pre-inference: skipped, the latent carries no prior (plain LATENT)")
        return False
    if start.mode == "forward_noise" and start.noise is None:
        log.info("DiffuEraser pre-inference: skipped, the latent carries no window noise")
        return False
    return True


def keyframe_indices(num_frames: int, window_length: int) -> torch.Tensor:
    """``int(i * (N / L))`` for i = 0..L-1 (int64), as the reference computes it.

    The reference divides first, in double precision (``step = N / L``, then ``int(i * step)``). The rounding of
    ``N / L`` makes that one frame lower than the exact ``floor(i * N / L)`` for some lengths (N = 60, 120, 240,
    480, ...: about 2% of lengths); the keyframes pick the frames the reference picks.
    """
    step = num_frames / window_length
    return torch.tensor([int(i * step) for i in range(window_length)], dtype=torch.long)


@dataclass
class PreInferenceResult:
    """What the main pass uses: start latents (raw) and conditioning with the keyframes written back."""

    start_latent: torch.Tensor
    conditioning: Conditioning
    keyframes: torch.Tensor


def run_pre_inference(
    start: StartLatents,
    conditioning: Conditioning,
    timesteps: List[int],
    text_embeddings: torch.Tensor,
    negative_embeddings: Optional[torch.Tensor],
    models,
    codec,
    settings: WindowSettings,
    runtime,
    step: Optional[SamplerStep] = None,
    pairs: Optional[List[Tuple[int, int]]] = None,
) -> PreInferenceResult:
    """Sample the keyframe window, write it back and return the main pass's start latents and conditioning.

    ``step`` / ``pairs``: the sampler's update and its timestep pairs (default TCD: ``pairs_down(timesteps)``);
    the LCM sampler passes its own, and its step noise continues into the main pass as in the reference.
    Neither ``start`` nor ``conditioning`` is modified (a host may cache them); the returned tensors are copies.
    """
    num = start.num_frames
    length = settings.window_length
    idx = keyframe_indices(num, length)
    key_cond = conditioning.select(idx)
    if start.mode == "forward_noise":
        noise_rows = torch.arange(length)  # the keyframe window reuses the window noise row by row
        x = forward_noise_latents(start.prior_latent[idx], start.noise, start.start_timestep, noise_rows)
    else:
        x = start.latent[idx].to(torch.float32)
    clean = denoise_windows(
        x * VAE_SCALING,
        pairs if pairs is not None else pairs_down(timesteps),
        key_cond,
        text_embeddings,
        negative_embeddings,
        models,
        settings,
        runtime,
        stage=STAGE,
        step=step,
    )
    clean_raw = clean / VAE_SCALING
    decoded = codec.decode(clean_raw)  # uint8 [L, 8h, 8w, 3]
    new_cond = Conditioning(conditioning.masked_latents.clone(), conditioning.known.clone())
    new_cond.masked_latents[idx] = codec.encode(decoded).to(torch.float32) * VAE_SCALING
    new_cond.known[idx] = True
    start_latent = start.latent.clone()
    if start.mode == "forward_noise":
        start_latent[idx] = forward_noise_latents(clean_raw, start.noise, start.start_timestep, idx)
    else:
        steps = int(start.extra.get("inversion_steps", len(timesteps)))
        pairs = inversion_pairs(steps, start.strength)
        inverted = denoise_windows(
            clean,
            pairs,
            new_cond.select(idx),
            text_embeddings,
            None,
            models,
            WindowSettings(length, settings.window_overlap, 0.0, settings.brushnet_scale),
            runtime,
            stage=STAGE,
            step_numbers=[steps - 1 - j for j in range(len(pairs))],
        )
        start_latent[idx] = inverted / VAE_SCALING
    return PreInferenceResult(start_latent, new_cond, idx)
