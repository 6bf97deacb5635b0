"""The SD1.5 noise schedule, the sampler's timesteps and its update step (reference section 3).

The lowest layer of the diffusion stages: ``prior_injection`` (start latents), ``temporal_sampling`` (windows) and
``pre_inference`` all take their constants and the per-step update from here, so none of them needs another's
internals.

TCD with eta = 0 (the reference pipeline's default, so TCD's gamma is 0) is the deterministic DDIM step
``ddim_update``; run with ascending timestep pairs the same function is the DDIM inversion.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

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


# ------------------------------------------------------------------------------------------------------- LCM
# The LCM-like PCM LoRA (pcm_sd15_lcmlike_lora_converted) is sampled by the reference with diffusers'
# ``LCMScheduler()`` at its default config (the same SD1.5 betas, original_inference_steps 50, "leading" spacing,
# timestep_scaling 10): timesteps 4 -> [999, 759, 499, 259]. Each step denoises with the consistency boundary
# condition and, except after the last, re-noises to the next timestep with FRESH noise drawn from the run's
# generator, window by window (the reference passes its seeded generator to ``scheduler.step``).
SCHEDULERS = ("tcd", "lcm")
#: file names containing this are the LCM-like PCM LoRA, which the reference samples with LCMScheduler
LCM_LIKE_LORA_MARKER = "lcmlike"
#: LCMScheduler's consistency-model boundary condition: sigma_data and the timestep scaling (diffusers defaults)
LCM_SIGMA_DATA = 0.5
LCM_TIMESTEP_SCALING = 10.0
#: the "next timestep" of LCM's last step: the denoised sample is the result, no noise is added
LCM_FINAL = -1


def scheduler_for_lora(lora_path) -> str:
    """``"lcm"`` for the LCM-like PCM LoRA (by file name, as the reference's checkpoint table), else ``"tcd"``."""
    if lora_path is None:
        return "tcd"
    import os

    return "lcm" if LCM_LIKE_LORA_MARKER in os.path.basename(str(lora_path)).lower() else "tcd"


def check_scheduler(name: str, where: str = "DiffuEraser Sampler") -> str:
    if name not in SCHEDULERS:
        raise InputError(f"{where}: scheduler must be one of {', '.join(SCHEDULERS)}, got {name!r}")
    return name


def lcm_timesteps(steps: int, strength: float = 1.0) -> List[int]:
    """The LCM sampler's timesteps: diffusers' ``LCMScheduler()`` default config (4 steps -> [999, 759, 499, 259])."""
    from diffusers import LCMScheduler

    steps = check_steps(steps)
    strength = check_strength(strength, steps, "DiffuEraser Sampler")
    scheduler = LCMScheduler()
    scheduler.set_timesteps(steps, strength=strength)
    return [int(t) for t in scheduler.timesteps]


def lcm_pairs(timesteps: List[int]) -> List[Tuple[int, int]]:
    """LCM moves ``(t_k, t_{k+1})``; the last one is ``(t_last, LCM_FINAL)``: return the denoised sample."""
    return list(zip(timesteps, timesteps[1:] + [LCM_FINAL]))


def lcm_boundary_scalings(timestep: int) -> Tuple[float, float]:
    """``(c_skip, c_out)`` of LCMScheduler's boundary condition at ``timestep``."""
    scaled = timestep * LCM_TIMESTEP_SCALING
    c_skip = LCM_SIGMA_DATA**2 / (scaled**2 + LCM_SIGMA_DATA**2)
    c_out = scaled / (scaled**2 + LCM_SIGMA_DATA**2) ** 0.5
    return c_skip, c_out


def lcm_update(
    x: torch.Tensor, eps: torch.Tensor, timestep: int, next_timestep: int, noise: Optional[torch.Tensor]
) -> torch.Tensor:
    """One LCMScheduler step (epsilon prediction): ``denoised = c_out * x0 + c_skip * x``; then
    ``sqrt(a_s) * denoised + sqrt(1 - a_s) * noise`` towards ``next_timestep``, or ``denoised`` itself when
    ``next_timestep`` is ``LCM_FINAL`` (``noise`` is then unused). Computed in float32."""
    abar = alphas_cumprod()
    a_t = float(abar[int(timestep)])
    x = x.float()
    x0 = (x - math.sqrt(1.0 - a_t) * eps.float()) / math.sqrt(a_t)
    c_skip, c_out = lcm_boundary_scalings(int(timestep))
    denoised = c_out * x0 + c_skip * x
    if next_timestep == LCM_FINAL:
        return denoised
    a_s = float(abar[int(next_timestep)])
    return math.sqrt(a_s) * denoised + math.sqrt(1.0 - a_s) * noise.to(denoised.device, torch.float32)


class StepNoise:
    """LCM's per-step noise, drawn as the reference draws it: one CPU generator seeded with the run's seed, which
    first draws the window noise (``skip_shape``, what prior injection drew from the same seed) and then one
    N(0,1) tensor per window per step, in window order, shaped like the window's latents."""

    def __init__(self, seed: int, skip_shape: Optional[Tuple[int, ...]] = None):
        self.generator = torch.Generator(device="cpu").manual_seed(int(seed))
        if skip_shape is not None:
            torch.randn(tuple(skip_shape), generator=self.generator, dtype=torch.float32)

    def draw(self, shape) -> torch.Tensor:
        return torch.randn(tuple(shape), generator=self.generator, dtype=torch.float32)


class PresetNoise:
    """Step noise drawn elsewhere, handed out again in the order it was drawn: what a Ray worker steps its window
    with (the driver owns the run's ``StepNoise`` and draws every window's noise in the single-process order; a
    worker never draws its own). Asking for more noise than was preset, or another shape, is an error."""

    def __init__(self, tensors: Sequence[torch.Tensor]):
        self.tensors = list(tensors)
        self.used = 0

    def draw(self, shape) -> torch.Tensor:
        if self.used >= len(self.tensors):
            raise RuntimeError(f"PresetNoise: internal error, asked for noise #{self.used + 1} of {len(self.tensors)}")
        fresh = self.tensors[self.used]
        if tuple(fresh.shape) != tuple(shape):
            raise RuntimeError(f"PresetNoise: internal error, noise #{self.used + 1} is {tuple(fresh.shape)}, "
                               f"asked for {tuple(shape)}")
        self.used += 1
        return fresh

    def check_used(self) -> None:
        """Every preset tensor was drawn (a step that drew fewer than the driver did is out of order)."""
        if self.used != len(self.tensors):
            raise RuntimeError(f"PresetNoise: internal error, {self.used} of {len(self.tensors)} noise tensors used")


class SamplerStep:
    """How a window moves from ``t`` to ``s``: ``"tcd"`` (deterministic, the DDIM update; also the inversion) or
    ``"lcm"`` (``lcm_update`` with fresh noise from ``noise``: a ``StepNoise`` or a ``PresetNoise``). ``x``/``eps``
    ``[F,4,h,w]`` or, for a batch of windows, ``[K,F,4,h,w]`` (noise drawn window by window, in order)."""

    def __init__(self, scheduler: str = "tcd", noise=None):
        self.scheduler = check_scheduler(scheduler)
        if scheduler == "lcm" and noise is None:
            raise ValueError("SamplerStep: the LCM scheduler needs a StepNoise")
        self.noise = noise

    def fresh_noise(self, shape, next_timestep: int) -> Optional[torch.Tensor]:
        """The noise this step draws for one window of ``shape`` moving to ``next_timestep`` (None: draws none)."""
        if self.scheduler == "tcd" or next_timestep == LCM_FINAL:
            return None
        return self.noise.draw(shape)

    def replay(self, moves: Sequence[Tuple[Tuple[int, ...], int]]) -> "SamplerStep":
        """This step for another process: the noise of ``moves`` (window shape, next timestep), one window after
        another in the order this step would step them, drawn here now, in a step that hands out exactly that
        noise. TCD draws nothing: itself."""
        if self.scheduler == "tcd":
            return self
        drawn = [self.fresh_noise(shape, s) for shape, s in moves]
        return SamplerStep("lcm", PresetNoise([n for n in drawn if n is not None]))

    def __call__(self, x: torch.Tensor, eps: torch.Tensor, timestep: int, next_timestep: int) -> torch.Tensor:
        if self.scheduler == "tcd":
            return ddim_update(x, eps, timestep, next_timestep)
        fresh = None
        if next_timestep != LCM_FINAL:
            if x.dim() == 5:
                fresh = torch.stack([self.fresh_noise(x.shape[1:], next_timestep) for _ in range(x.shape[0])])
            else:
                fresh = self.fresh_noise(x.shape, next_timestep)
        return lcm_update(x, eps, timestep, next_timestep, fresh)
