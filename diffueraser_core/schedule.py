"""The SD1.5 noise schedule, the sampler's timesteps and its update step (reference section 3).

The lowest layer of the diffusion stages: ``prior_injection`` (start latents), ``temporal_sampling`` (windows) and
``pre_inference`` all take their constants and the per-step update from here, so none of them needs another's
internals.

TCD with eta = 0 (the reference pipeline's default, so TCD's gamma is 0) is the deterministic DDIM step
``ddim_update``; run with ascending timestep pairs the same function is the DDIM inversion.
"""

from __future__ import annotations

import math
from typing import List, Tuple

import torch

from .errors import InputError

#: SD1.5 VAE latent scaling factor (``vae.config.scaling_factor``)
VAE_SCALING = 0.18215
#: SD1.5 training schedule: scaled_linear betas 0.00085..0.012 over 1000 steps
NUM_TRAIN_TIMESTEPS = 1000
BETA_START = 0.00085
BETA_END = 0.012
#: TCD's original (distillation) schedule length, diffusers' default ``original_inference_steps``
TCD_ORIGINAL_STEPS = 50
#: accepted sampler step counts (PCM ships 2/4/8/16-step LoRAs; any count up to the TCD schedule works)
MIN_STEPS, MAX_STEPS = 1, TCD_ORIGINAL_STEPS
LATENT_CHANNELS = 4


def alphas_cumprod() -> torch.Tensor:
    """abar_t of the SD1.5 schedule, float64 ``[1000]`` (same values as diffusers' schedulers, in float64)."""
    betas = torch.linspace(BETA_START**0.5, BETA_END**0.5, NUM_TRAIN_TIMESTEPS, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def alpha_bar(timestep: int) -> float:
    return float(alphas_cumprod()[int(timestep)])


def check_steps(steps: int, where: str = "DiffuEraser Sampler") -> int:
    if int(steps) != steps or not MIN_STEPS <= steps <= MAX_STEPS:
        raise InputError(f"{where}: steps must be an integer in {MIN_STEPS}..{MAX_STEPS}, got {steps!r}")
    return int(steps)


def check_strength(strength: float, steps: int = 1, where: str = "DiffuEraser Prior Injection") -> float:
    strength = float(strength)
    # TCD keeps int(50 * strength) of its original steps and needs at least one per inference step
    if not (0.0 < strength <= 1.0) or int(TCD_ORIGINAL_STEPS * strength) < steps:
        low = steps / TCD_ORIGINAL_STEPS
        raise InputError(f"{where}: strength must be in {low:g}..1 for {steps} step(s), got {strength!r}")
    return strength


def tcd_timesteps(steps: int, strength: float = 1.0) -> List[int]:
    """The sampler's timesteps: diffusers' TCDScheduler with trailing spacing (2 steps -> [999, 499])."""
    from diffusers import TCDScheduler

    steps = check_steps(steps)
    strength = check_strength(strength, steps, "DiffuEraser Sampler")
    scheduler = TCDScheduler(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        beta_start=BETA_START,
        beta_end=BETA_END,
        beta_schedule="scaled_linear",
        timestep_spacing="trailing",
    )
    scheduler.set_timesteps(steps, strength=strength)
    return [int(t) for t in scheduler.timesteps]


def start_timestep_for(strength: float) -> int:
    """First timestep of the TCD schedule at ``strength`` (independent of the step count)."""
    strength = check_strength(strength)
    return (NUM_TRAIN_TIMESTEPS // TCD_ORIGINAL_STEPS) * int(TCD_ORIGINAL_STEPS * strength) - 1


def pairs_down(timesteps: List[int]) -> List[Tuple[int, int]]:
    """TCD moves ``(t_k, t_{k+1})``, the last one to t = 0 (diffusers' TCD: a_0 = alphas_cumprod[0])."""
    return list(zip(timesteps, timesteps[1:] + [0]))


def ddim_update(x: torch.Tensor, eps: torch.Tensor, timestep: int, next_timestep: int) -> torch.Tensor:
    """Deterministic DDIM / TCD (eta = gamma = 0) move of ``x`` from ``timestep`` to ``next_timestep``.

    ``x0 = (x - sqrt(1-a_t) eps) / sqrt(a_t)``; ``x_s = sqrt(a_s) x0 + sqrt(1-a_s) eps``. Going down it is the TCD
    step (the last step goes to s = 0, a_0 = 0.99915, as diffusers' TCDScheduler); going up it is DDIM inversion.
    Computed in float32.
    """
    abar = alphas_cumprod()
    a_t, a_s = float(abar[int(timestep)]), float(abar[int(next_timestep)])
    x = x.float()
    eps = eps.float()
    x0 = (x - math.sqrt(1.0 - a_t) * eps) / math.sqrt(a_t)
    return math.sqrt(a_s) * x0 + math.sqrt(1.0 - a_s) * eps
