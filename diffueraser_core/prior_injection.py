"""Prior latents -> the starting latent of the DiffuEraser sampler (reference section 4).

The ProPainter prior, VAE-encoded, is turned into the noisy latent the sampler starts from. Two modes:

* ``forward_noise`` (default, what the reference code does): ``x_T = sqrt(abar_T) * prior + sqrt(1 - abar_T) *
  noise`` with ``T = 999`` at strength 1, i.e. the forward diffusion q(x_T | x_0 = prior). The reference reaches this
  through ``UniPCMultistepScheduler.add_noise(latent, noise, t=0)`` (quirk 1): with no timesteps set, t=0 is looked
  up as the schedule's index 999, giving 0.0682649 * prior + 0.9976672 * noise. Computed here directly from the SD1.5
  betas.
* ``ddim_inversion`` (what the paper describes): a deterministic DDIM inversion of the prior latent with the loaded
  BrushNet + motion UNet, window by window, along the mirror image of the sampler's TCD schedule (eta = 0 TCD is a
  DDIM step), so sampling back with the same number of steps undoes it up to the usual inversion error.

``strength`` < 1 starts later in the schedule, as diffusers' img2img: the TCD schedule of the sampler is taken with
``TCDScheduler.set_timesteps(steps, strength=strength)`` and the start timestep is its first one
(``20 * int(50 * strength) - 1``: 999 at strength 1).

Noise: ONE N(0,1) tensor ``[window_length, 4, h, w]`` drawn from a seeded CPU generator; frame ``t`` uses
``noise[t % window_length]`` (periodic, quirk 8, as the reference tiles its 22-frame noise). The pre-inference pass
reuses the same window noise for its keyframes.

Latents at the boundaries are raw VAE latents (``StartLatents.latent`` / ``prior_latent``); the noise lives in the
scaled space (x ``VAE_SCALING``) where the diffusion runs.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch

from . import temporal_sampling
from .errors import InputError
from .schedule import (  # noqa: F401  (re-exported: the schedule was defined here before)
    BETA_END,
    BETA_START,
    LATENT_CHANNELS,
    MAX_STEPS,
    MIN_STEPS,
    NUM_TRAIN_TIMESTEPS,
    TCD_ORIGINAL_STEPS,
    VAE_SCALING,
    alpha_bar,
    alphas_cumprod,
    check_steps,
    check_strength,
    ddim_update,
    start_timestep_for,
    tcd_timesteps,
)
from .windows import DEFAULT_WINDOW_LENGTH

log = logging.getLogger(__name__)

#: default steps of the DDIM inversion (the sampler mirrors it exactly only with the same step count)
DEFAULT_INVERSION_STEPS = 2
#: key of DiffuEraser's own data inside a ComfyUI LATENT dict
LATENT_KEY = "diffueraser"
LATENT_FORMAT_VERSION = 1

MODES = ("forward_noise", "ddim_inversion")


def forward_noise_coefficients(timestep: int = NUM_TRAIN_TIMESTEPS - 1) -> Tuple[float, float]:
    """``(sqrt(abar_t), sqrt(1 - abar_t))``: 0.0682649 / 0.9976672 at t = 999."""
    a = alpha_bar(timestep)
    return math.sqrt(a), math.sqrt(1.0 - a)


@dataclass
class InjectionSettings:
    """How the prior becomes the starting latent.

    mode: "forward_noise" (reference code) or "ddim_inversion" (paper). seed: the window noise seed.
    window_length: period of the noise (the sampler's window length, 22). strength: 1.0 = start at t = 999.
    inversion_steps: DDIM inversion steps (ddim_inversion only; use the sampler's step count for an exact mirror).
    """

    mode: str = "forward_noise"
    seed: int = 0
    window_length: int = DEFAULT_WINDOW_LENGTH
    strength: float = 1.0
    inversion_steps: int = DEFAULT_INVERSION_STEPS

    def __post_init__(self):
        where = "DiffuEraser Prior Injection"
        if self.mode not in MODES:
            raise InputError(f"{where}: mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if int(self.window_length) != self.window_length or self.window_length < 1:
            raise InputError(f"{where}: window_length must be an integer >= 1, got {self.window_length!r}")
        if int(self.seed) != self.seed or self.seed < 0:
            raise InputError(f"{where}: seed must be an integer >= 0, got {self.seed!r}")
        check_steps(self.inversion_steps, where)
        check_strength(self.strength, 1, where)


def make_window_noise(window_length: int, latent_hw: Tuple[int, int], seed: int) -> torch.Tensor:
    """One N(0,1) tensor ``[window_length, 4, h, w]`` float32 from a seeded CPU generator (device independent)."""
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    h, w = int(latent_hw[0]), int(latent_hw[1])
    return torch.randn((int(window_length), LATENT_CHANNELS, h, w), generator=generator, dtype=torch.float32)


def periodic_noise(noise: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Noise of the frames ``indices``: frame t uses ``noise[t % len(noise)]``."""
    return noise[indices.long() % noise.shape[0]]


@dataclass
class StartLatents:
    """Everything the sampler needs to start: see the module docstring.

    latent: raw-space start latent x_T / VAE_SCALING ``[T,4,h,w]`` float32 CPU.
    prior_latent: raw VAE latents of the prior ``[T,4,h,w]`` (None for a plain LATENT); pre-inference needs it.
    noise: the window noise ``[L,4,h,w]`` (scaled space; None when unknown).
    """

    latent: torch.Tensor
    prior_latent: Optional[torch.Tensor] = None
    noise: Optional[torch.Tensor] = None
    start_timestep: int = NUM_TRAIN_TIMESTEPS - 1
    strength: float = 1.0
    mode: str = "forward_noise"
    seed: Optional[int] = None
    window_length: int = DEFAULT_WINDOW_LENGTH
    extra: dict = field(default_factory=dict)

    @property
    def num_frames(self) -> int:
        return int(self.latent.shape[0])

    @property
    def latent_hw(self) -> Tuple[int, int]:
        return int(self.latent.shape[2]), int(self.latent.shape[3])

    def to_latent_dict(self) -> dict:
        """A ComfyUI LATENT: ``{"samples": raw start latent, "diffueraser": {...}}``."""
        data = {
            "version": LATENT_FORMAT_VERSION,
            "prior_latent": self.prior_latent,
            "noise": self.noise,
            "start_timestep": int(self.start_timestep),
            "strength": float(self.strength),
            "mode": self.mode,
            "seed": self.seed,
            "window_length": int(self.window_length),
        }
        data.update(self.extra)
        return {"samples": self.latent, LATENT_KEY: data}

    @classmethod
    def from_latent_dict(cls, latent: dict, where: str = "DiffuEraser Sampler") -> "StartLatents":
        """Accepts the dict written by ``to_latent_dict`` or a plain LATENT.

        A plain LATENT (no "diffueraser" key) is taken as the start latent at t = 999 in raw space (strength 1).
        Its prior and noise are unknown, so pre-inference, which re-noises the prior, is skipped for it.
        """
        if not isinstance(latent, dict) or "samples" not in latent:
            raise InputError(f"{where}: expected a LATENT dict with 'samples', got {type(latent).__name__}")
        samples = latent["samples"]
        if not isinstance(samples, torch.Tensor) or samples.dim() != 4 or samples.shape[1] != LATENT_CHANNELS:
            shape = tuple(samples.shape) if isinstance(samples, torch.Tensor) else type(samples).__name__
            raise InputError(f"{where}: latent 'samples' must be [frames, 4, h, w] (SD1.5 VAE), got {shape}")
        samples = samples.detach().to("cpu", torch.float32)
        bad = int((~torch.isfinite(samples)).sum())
        if bad:
            raise InputError(f"{where}: the latent contains {bad} NaN/inf values; re-run the node that made it")
        data = latent.get(LATENT_KEY)
        if data is None:
            log.info("%s: plain LATENT given; using it as the start latent at t=999 (no pre-inference)", where)
            return cls(latent=samples, mode="plain")
        known = {"version", "prior_latent", "noise", "start_timestep", "strength", "mode", "seed", "window_length"}
        return cls(
            latent=samples,
            prior_latent=data.get("prior_latent"),
            noise=data.get("noise"),
            start_timestep=int(data.get("start_timestep", NUM_TRAIN_TIMESTEPS - 1)),
            strength=float(data.get("strength", 1.0)),
            mode=str(data.get("mode", "forward_noise")),
            seed=data.get("seed"),
            window_length=int(data.get("window_length", DEFAULT_WINDOW_LENGTH)),
            extra={k: v for k, v in data.items() if k not in known},
        )


def _check_prior_latent(prior_latent: torch.Tensor, where: str) -> None:
    if not isinstance(prior_latent, torch.Tensor) or prior_latent.dim() != 4 or prior_latent.shape[1] != 4:
        shape = tuple(prior_latent.shape) if isinstance(prior_latent, torch.Tensor) else type(prior_latent).__name__
        raise InputError(f"{where}: prior latents must be [frames, 4, h, w], got {shape}")
    if prior_latent.shape[0] < 1:
        raise InputError(f"{where}: prior latents have no frames")


def forward_noise_latents(
    prior_latent: torch.Tensor, noise: torch.Tensor, timestep: int, indices: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Raw-space x_t of raw prior latents: ``(c1 * prior * VAE_SCALING + c2 * periodic noise) / VAE_SCALING``.

    ``indices`` are the frame numbers of ``prior_latent``'s rows (for the periodic noise); default 0..n-1.
    """
    c_prior, c_noise = forward_noise_coefficients(timestep)
    n = prior_latent.shape[0]
    if indices is None:
        indices = torch.arange(n)
    out = torch.empty(prior_latent.shape, dtype=torch.float32)
    period = noise.shape[0]
    for start in range(0, n, period):  # chunked: no second whole-video temporary
        stop = min(start + period, n)
        prior = prior_latent[start:stop].to(torch.float32) * VAE_SCALING
        out[start:stop] = (c_prior * prior + c_noise * periodic_noise(noise, indices[start:stop])) / VAE_SCALING
    return out


def inject_forward_noise(prior_latent: torch.Tensor, settings: InjectionSettings) -> StartLatents:
    """Forward mode: the prior latent noised to the start timestep (t = 999 at strength 1)."""
    where = "DiffuEraser Prior Injection"
    _check_prior_latent(prior_latent, where)
    hw = (int(prior_latent.shape[2]), int(prior_latent.shape[3]))
    noise = make_window_noise(settings.window_length, hw, settings.seed)
    t_start = start_timestep_for(settings.strength)
    latent = forward_noise_latents(prior_latent, noise, t_start)
    return StartLatents(
        latent=latent,
        prior_latent=prior_latent.detach().to("cpu", torch.float32),
        noise=noise,
        start_timestep=t_start,
        strength=float(settings.strength),
        mode="forward_noise",
        seed=int(settings.seed),
        window_length=int(settings.window_length),
    )


def inversion_pairs(steps: int, strength: float) -> List[Tuple[int, int]]:
    """(from, to) timestep pairs of the DDIM inversion: the sampler's TCD moves of ``steps`` steps, reversed."""
    timesteps = tcd_timesteps(steps, strength)
    down = list(zip(timesteps, timesteps[1:] + [0]))
    return [(s, t) for t, s in reversed(down)]


def invert_prior(
    prior_latent: torch.Tensor,
    conditioning,
    text_embeddings: torch.Tensor,
    models,
    settings: InjectionSettings,
    runtime,
    window_overlap: Optional[int] = None,
    brushnet_scale: float = 1.0,
) -> StartLatents:
    """DDIM-inversion mode: run the sampler's deterministic steps backwards from the prior latent.

    ``conditioning`` is the BrushNet conditioning (``temporal_sampling.Conditioning``) the inversion is computed
    under: the pipeline passes the sampler's own (frames with holes + masks), so sampling back mirrors it; a host
    without masks may pass the prior itself with every pixel known (``temporal_sampling.build_conditioning``).
    The windows of inversion step j are those of sampling step ``steps - 1 - j``.
    """
    where = "DiffuEraser Prior Injection"
    _check_prior_latent(prior_latent, where)
    steps = settings.inversion_steps
    pairs = inversion_pairs(steps, settings.strength)
    latents = prior_latent.detach().to("cpu", torch.float32) * VAE_SCALING
    latents = temporal_sampling.denoise_windows(
        latents,
        pairs,
        conditioning,
        text_embeddings,
        None,
        models,
        temporal_sampling.WindowSettings(
            window_length=settings.window_length,
            window_overlap=window_overlap,
            guidance_scale=0.0,
            brushnet_scale=brushnet_scale,
        ),
        runtime,
        stage="inversion",
        step_numbers=[steps - 1 - j for j in range(len(pairs))],
    )
    latents /= VAE_SCALING
    return StartLatents(
        latent=latents,
        prior_latent=prior_latent.detach().to("cpu", torch.float32),
        noise=None,
        start_timestep=pairs[-1][1],
        strength=float(settings.strength),
        mode="ddim_inversion",
        seed=int(settings.seed),
        window_length=int(settings.window_length),
        extra={"inversion_steps": int(steps)},
    )
