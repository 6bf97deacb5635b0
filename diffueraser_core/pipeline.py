"""The stages strung together: prior -> working size -> encode -> inject -> (pre-inference) -> sample -> decode ->
blend. Used by the CLI; the ComfyUI nodes call the same stages one by one.

Memory: frames stay uint8 and masks bool on the CPU; every stage works chunk by chunk or window by window; the only
whole-video float tensors are latent-sized (4 float32 per 8x8 pixel block: 1/12 of the uint8 frames' bytes at the
working size), a few of them at a time (start latents, BrushNet conditioning, the step's merged result).
``remove_objects`` never holds the prior video: ProPainter hands its finished frames over a chunk at a time and
they are resized and VAE-encoded into the prior latent at once (the nodes, which pass the prior on as an IMAGE,
encode it whole with ``encode_prior``).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch

from .errors import InputError
from .vae_codec import (  # noqa: F401  (re-exported: callers build the codec from here)
    VAE_CHUNK,
    VAE_DECODE_BYTES_PER_PIXEL,
    VAE_ENCODE_BYTES_PER_PIXEL,
    DiffusersVaeCodec,
)
from .prior_injection import InjectionSettings, StartLatents, inject_forward_noise, invert_prior
from .pre_inference import run_pre_inference, should_pre_infer
from .schedule import (
    LATENT_CHANNELS,
    VAE_SCALING,
    SamplerStep,
    StepNoise,
    check_scheduler,
    check_steps,
    lcm_pairs,
    lcm_timesteps,
    pairs_down,
    tcd_timesteps,
)
from .temporal_sampling import (
    Conditioning,
    WindowSettings,
    build_conditioning,
    check_latent_frames,
    check_windows_per_batch,
    denoise_windows,
)
from .blend import DEFAULT_FEATHER
from .video import DEFAULT_MAX_SIDE, FRAME_CHUNK
from .windows import DEFAULT_WINDOW_LENGTH, MAX_WINDOW_LENGTH

log = logging.getLogger(__name__)

NODE = "DiffuEraser"


@dataclass
class SamplerSettings:
    """The sampler's knobs with the reference defaults (run_diffueraser: 2-Step PCM, guidance forced to 0, 22-frame
    windows overlapping by 22 // 4, pre-inference on, mask dilation 8)."""

    steps: int = 2
    guidance_scale: float = 0.0
    window_length: int = DEFAULT_WINDOW_LENGTH
    window_overlap: Optional[int] = None
    brushnet_scale: float = 1.0
    pre_inference: bool = True
    mask_dilation: int = 8
    #: sampling windows per BrushNet/UNet forward (1 = the reference; more = same result, more memory per forward)
    windows_per_batch: int = 1
    #: "auto" (the one the loaded PCM LoRA needs: ``DiffuEraserModels.scheduler``), "tcd" or "lcm"
    scheduler: str = "auto"

    def __post_init__(self):
        check_steps(self.steps)
        if self.scheduler != "auto":
            check_scheduler(self.scheduler)
        self.windows_per_batch = check_windows_per_batch(self.windows_per_batch)
        if int(self.window_length) != self.window_length or not 1 <= self.window_length <= MAX_WINDOW_LENGTH:
            raise InputError(
                f"DiffuEraser Sampler: window_length must be an integer in 1..{MAX_WINDOW_LENGTH} (the motion "
                f"modules' positional table holds {MAX_WINDOW_LENGTH} frames), got {self.window_length!r}"
            )
        if int(self.mask_dilation) != self.mask_dilation or self.mask_dilation < 0:
            raise InputError(f"DiffuEraser Sampler: mask_dilation must be an integer >= 0, got {self.mask_dilation!r}")
        if self.guidance_scale < 0:
            raise InputError(f"DiffuEraser Sampler: guidance_scale must be >= 0, got {self.guidance_scale!r}")

    def window_settings(self) -> WindowSettings:
        return WindowSettings(
            window_length=int(self.window_length),
            window_overlap=self.window_overlap,
            guidance_scale=float(self.guidance_scale),
            brushnet_scale=float(self.brushnet_scale),
            windows_per_batch=int(self.windows_per_batch),
        )


@dataclass
class DiffuEraserModels:
    """Runtime handles of the motion UNet (with the PCM LoRA applied) and BrushNet, and the scheduler that LoRA
    is sampled with ("tcd"; "lcm" for the LCM-like PCM LoRA: ``schedule.scheduler_for_lora``)."""

    unet: object
    brushnet: object
    scheduler: str = "tcd"


def _host_work_device(runtime) -> Optional[torch.device]:
    """Where the per-frame image work (resizes, mask morphology, feather, composite) runs: the compute device,
    a chunk at a time, unless that is the CPU anyway (at 720p it is about 0.35 CPU-seconds a frame on the host,
    bench/host_work.py)."""
    device = torch.device(runtime.device)
    return None if device.type == "cpu" else device


def _check_video(frames: torch.Tensor, where: str) -> None:
    if not isinstance(frames, torch.Tensor) or frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[-1] != 3:
        desc = f"{frames.dtype} {tuple(frames.shape)}" if isinstance(frames, torch.Tensor) else type(frames).__name__
        raise InputError(f"{where}: expected uint8 frames [T,H,W,3], got {desc}")
    if frames.shape[0] < 1:
        raise InputError(f"{where}: the video has no frames")


def encode_prior(prior_frames: torch.Tensor, working_size: Tuple[int, int], codec, runtime=None) -> torch.Tensor:
    """Prior frames uint8 ``[T,H,W,3]`` -> raw latents ``[T,4,h/8,w/8]`` at ``working_size`` (bicubic resize, as the
    reference reads the prior back at the working size), chunk by chunk."""
    from .video import resize_frames

    _check_video(prior_frames, f"{NODE} prior encode")
    h, w = int(working_size[0]), int(working_size[1])
    if h % 8 or w % 8:
        raise InputError(f"{NODE} prior encode: working size {w}x{h} is not a multiple of 8")
    num = prior_frames.shape[0]
    out = torch.empty((num, 4, h // 8, w // 8), dtype=torch.float32)
    if runtime is not None:
        runtime.progress("encode", 0, num)
    for start in range(0, num, FRAME_CHUNK):
        stop = min(start + FRAME_CHUNK, num)
        out[start:stop] = codec.encode(resize_frames(prior_frames[start:stop], (h, w)))
        if runtime is not None:
            runtime.progress("encode", stop, num)
    return out


class _PriorLatentSink:
    """A ``run_propainter_prior`` sink: VAE-encodes the prior frames at ``working_size`` into ``latent`` as they
    arrive, so the input-size prior video is never held whole.

    Frames are batched into the same ``FRAME_CHUNK`` ranges as ``encode_prior`` (the prior hands them over in
    ranges of its own), so the VAE sees the same batches and the latent is bit for bit ``encode_prior``'s.
    At most one such range plus one incoming range of input-size frames is held at a time.
    """

    def __init__(self, num: int, working_size: Tuple[int, int], codec, runtime):
        self.num = int(num)
        self.size = (int(working_size[0]), int(working_size[1]))
        if self.size[0] % 8 or self.size[1] % 8:
            raise InputError(f"{NODE} prior encode: working size {self.size[1]}x{self.size[0]} is not a multiple of 8")
        self.codec = codec
        self.runtime = runtime
        self.latent = torch.empty((self.num, 4, self.size[0] // 8, self.size[1] // 8), dtype=torch.float32)
        self.received = 0
        self.encoded = 0
        self.waiting: list = []  # input-size frames [encoded, received), in order

    def __call__(self, start: int, stop: int, frames: torch.Tensor) -> None:
        if start != self.received or not start < stop <= self.num or frames.shape[0] != stop - start:
            raise RuntimeError(
                f"{NODE} prior encode: internal error, got frames {start}..{stop} ({frames.shape[0]} frames) "
                f"after {self.received} of {self.num}"
            )
        self.waiting.append(frames)
        self.received = stop
        while self.received - self.encoded >= FRAME_CHUNK or (self.received == self.num > self.encoded):
            end = min(self.encoded + FRAME_CHUNK, self.num)
            held = self.waiting[0] if len(self.waiting) == 1 else torch.cat(self.waiting)
            take = end - self.encoded
            self._encode(self.encoded, end, held[:take])
            self.waiting = [held[take:]] if take < held.shape[0] else []
            self.encoded = end
            self.runtime.progress("encode", end, self.num)

    def _encode(self, start: int, stop: int, frames: torch.Tensor) -> None:
        """Encode one ``FRAME_CHUNK`` range (the Ray executor overrides this to encode on another worker)."""
        from .video import resize_frames

        self.latent[start:stop] = self.codec.encode(resize_frames(frames, self.size))

    def result(self) -> torch.Tensor:
        if self.encoded != self.num:
            raise RuntimeError(f"{NODE} prior encode: internal error, {self.encoded} of {self.num} frames encoded")
        return self.latent


def prepare_sampling_inputs(frames, masks, where: str = "DiffuEraser Sampler"):
    """Validated uint8 frames and bool masks broadcast to the frames' count (single mask -> all). A mask of another
    size is kept at its size: each stage resizes it once, straight to the size it works at (as the reference)."""
    from .masks import broadcast_masks

    _check_video(frames, where)
    if not isinstance(masks, torch.Tensor) or masks.dtype != torch.bool:
        raise InputError(f"{where}: masks must be a bool tensor [T,H,W], got {getattr(masks, 'dtype', type(masks))}")
    if masks.dim() == 2:
        masks = masks.unsqueeze(0)
    return broadcast_masks(masks, frames.shape[0], (frames.shape[1], frames.shape[2]), where, resize=False)


def sampler_plan(scheduler: str, steps: int, start: StartLatents, where: str = "DiffuEraser Sampler"):
    """``(timesteps, timestep pairs, SamplerStep)`` of a run with ``scheduler`` ("tcd" or "lcm"), shared by
    ``sample_video`` and the Ray driver. The LCM step holds the run's step noise generator: as the reference,
    LCMScheduler() timesteps and step noise from the run's generator, which drew the window noise first."""
    check_scheduler(scheduler, where)
    if scheduler == "lcm":
        timesteps = lcm_timesteps(steps, start.strength)
        seed = 0 if start.seed is None else int(start.seed)
        drawn = tuple(start.noise.shape) if start.noise is not None else (
            start.window_length, LATENT_CHANNELS, *start.latent_hw)
        return timesteps, lcm_pairs(timesteps), SamplerStep("lcm", StepNoise(seed, drawn))
    timesteps = tcd_timesteps(steps, start.strength)
    return timesteps, pairs_down(timesteps), SamplerStep("tcd")


def sample_video(
    start: StartLatents,
    frames: torch.Tensor,
    masks: torch.Tensor,
    text_embeddings: torch.Tensor,
    negative_embeddings: Optional[torch.Tensor],
    models: DiffuEraserModels,
    codec,
    settings: SamplerSettings,
    runtime,
    conditioning: Optional[Conditioning] = None,
) -> torch.Tensor:
    """Start latents -> raw clean latents ``[T,4,h,w]`` (CPU float32).

    ``frames`` uint8 ``[T,H,W,3]`` and raw bool ``masks`` at the original size; they are resized to the latent size
    x 8 here for the BrushNet conditioning. Pre-inference runs when enabled and T > 2 x window_length.
    ``conditioning`` may pass one already built from the same frames/masks/settings.
    """
    where = "DiffuEraser Sampler"
    masks = prepare_sampling_inputs(frames, masks, where)
    check_latent_frames(start.num_frames, int(frames.shape[0]), where)
    latent_hw = start.latent_hw
    if conditioning is None:
        conditioning = build_conditioning(frames, masks, latent_hw, codec, settings.mask_dilation,
                                          device=_host_work_device(runtime), runtime=runtime)
    scheduler = settings.scheduler if settings.scheduler != "auto" else getattr(models, "scheduler", "tcd")
    timesteps, pairs, step = sampler_plan(scheduler, settings.steps, start, where)
    if timesteps[0] != start.start_timestep:
        log.warning(
            "%s: the latent was prepared for timestep %d but the schedule starts at %d",
            where,
            start.start_timestep,
            timesteps[0],
        )
    window = settings.window_settings()
    start_latent = start.latent
    if should_pre_infer(start.num_frames, window.window_length, start, settings.pre_inference):
        pre = run_pre_inference(
            start, conditioning, timesteps, text_embeddings, negative_embeddings, models, codec, window, runtime,
            step=step, pairs=pairs,
        )
        start_latent, conditioning = pre.start_latent, pre.conditioning
    latents = denoise_windows(
        start_latent.to(torch.float32) * VAE_SCALING,
        pairs,
        conditioning,
        text_embeddings,
        negative_embeddings,
        models,
        window,
        runtime,
        stage="sampling",
        step=step,
    )
    latents /= VAE_SCALING
    return latents


def decode_and_blend(
    latents: torch.Tensor,
    frames: torch.Tensor,
    masks: torch.Tensor,
    codec,
    runtime,
    mask_dilation: int = 8,
    feather: int = DEFAULT_FEATHER,
    out: Optional[torch.Tensor] = None,
    original: Optional[torch.Tensor] = None,
    on_frames: Optional[Callable[[int, int, torch.Tensor], None]] = None,
) -> torch.Tensor:
    """Decode raw latents and composite them over the original frames chunk by chunk.

    The generated video never exists whole: each decoded chunk is blended at once into ``out`` (which may be
    ``frames`` itself), so the host holds the input, its latents and one chunk. ``original``: the frames to
    composite into when the source has more than 8-bit RGB (uint16 and/or an alpha channel); the result is written
    into it in place and returned, untouched pixels keeping every bit. ``on_frames(start, stop, chunk)`` gets each
    finished chunk of the result (a slice of the returned tensor) in frame order, e.g. to write it at once.
    """
    from .blend import blend_video

    num = int(latents.shape[0])
    base = frames
    if original is not None:
        base = out = original
    if out is None:
        out = torch.empty_like(frames)
    # the composite (mask resizes and morphology, feather, bicubic resize) runs on the compute device
    blend_device = _host_work_device(runtime)
    for start in range(0, num, FRAME_CHUNK):
        stop = min(start + FRAME_CHUNK, num)
        generated = codec.decode(latents[start:stop])
        runtime.progress("decode", stop, num)
        blend_video(
            base[start:stop], generated, masks[start:stop], mask_dilation=mask_dilation, feather=feather,
            out=out[start:stop], device=blend_device,
        )
        runtime.progress("blend", stop, num)
        if on_frames is not None:
            on_frames(start, stop, out[start:stop])
        runtime.check_interrupt()
    return out


def _propainter_settings(settings, mask_dilation: int):
    from .prior_propainter import ProPainterSettings

    if settings is not None:
        return settings
    # run_diffueraser passes its mask dilation (8) to ProPainter too (ProPainter's own default is 4); the settings'
    # default subvideo_length is already run_diffueraser's 50
    settings = ProPainterSettings()
    if any(f.name == "mask_dilation" for f in dataclasses.fields(settings)):
        settings = dataclasses.replace(settings, mask_dilation=mask_dilation)
    return settings


def _into_original(result: torch.Tensor, frames: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """Pixels the 8-bit ``result`` changed relative to ``frames`` are written (scaled) into ``original``; the others
    keep the original's bits. Used for the prior-only output, which ProPainter composites with a hard mask."""
    for s in range(0, result.shape[0], FRAME_CHUNK):
        part = original[s : s + FRAME_CHUNK]
        changed = (result[s : s + FRAME_CHUNK] != frames[s : s + FRAME_CHUNK]).any(-1, keepdim=True)
        scale = float(torch.iinfo(original.dtype).max) / 255.0
        scaled = (result[s : s + FRAME_CHUNK].to(torch.float32) * scale).round_().to(original.dtype)
        part[..., :3] = torch.where(changed, scaled, part[..., :3])
    return original


def default_settings(sampler_settings=None, injection_settings=None):
    """(SamplerSettings, InjectionSettings) with the defaults of a removal filled in (the window noise follows the
    sampler's window length and step count); shared by ``remove_objects`` and the Ray executor."""
    sampler_settings = sampler_settings or SamplerSettings()
    injection_settings = injection_settings or InjectionSettings(
        seed=0, window_length=sampler_settings.window_length, inversion_steps=sampler_settings.steps
    )
    return sampler_settings, injection_settings


def unchanged_result(frames: torch.Tensor, output: Optional[torch.Tensor], original: Optional[torch.Tensor]):
    """What a removal with an empty mask returns: the input itself (its full-depth / alpha original when there is
    one), copied into ``output`` when that was given."""
    log.info("%s: the mask is empty; returning the input unchanged", NODE)
    if original is not None:
        return original
    return frames if output is None else output.copy_(frames)


def remove_objects(
    frames: torch.Tensor,
    masks: torch.Tensor,
    *,
    propainter_nets,
    runtime,
    models: Optional[DiffuEraserModels] = None,
    codec=None,
    text_embeddings: Optional[torch.Tensor] = None,
    negative_embeddings: Optional[torch.Tensor] = None,
    sampler_settings: Optional[SamplerSettings] = None,
    injection_settings: Optional[InjectionSettings] = None,
    propainter_settings=None,
    max_side: int = DEFAULT_MAX_SIDE,
    feather: int = DEFAULT_FEATHER,
    prior_only: bool = False,
    output: Optional[torch.Tensor] = None,
    original: Optional[torch.Tensor] = None,
    on_frames: Optional[Callable[[int, int, torch.Tensor], None]] = None,
) -> torch.Tensor:
    """Whole DiffuEraser removal: uint8 ``[T,H,W,3]`` + bool masks (True = remove; one mask or one per frame) ->
    uint8 ``[T,H,W,3]`` with the input's frame count and size; pixels outside the blended mask are the input's.

    ``prior_only`` returns the ProPainter prior (composited inside its dilated mask) without diffusion.
    ``output``: where to write the result (uint8 ``[T,H,W,3]``); it may be ``frames`` itself when the caller no
    longer needs the input, so the run never holds a second full-size copy of the video.
    ``original``: the source at full depth / with alpha (uint16 or uint8 ``[T,H,W,3|4]``, ``frames`` being its 8-bit
    RGB); the result is composited into it in place and returned, so untouched pixels keep every bit. Masks may be
    at another size than the frames (same aspect ratio): each stage resizes them once to its own size.
    ``on_frames(start, stop, chunk)``: called with each finished ``FRAME_CHUNK`` range of the result (a slice of
    the returned tensor: uint8, or the original when one is given) in frame order, as it completes (the prior-only
    result is handed over once the prior is done); not called for an empty mask, where the input is returned as is.
    The Ray executor (``distributed.RayRemover.remove``) keeps the same contract.
    """
    from .prior_propainter import run_propainter_prior
    from .video import working_size

    sampler_settings, injection_settings = default_settings(sampler_settings, injection_settings)
    masks = prepare_sampling_inputs(frames, masks, NODE)
    num, height, width = int(frames.shape[0]), int(frames.shape[1]), int(frames.shape[2])
    if not bool(masks.any()):
        return unchanged_result(frames, output, original)
    if not prior_only and (models is None or codec is None or text_embeddings is None):
        raise InputError(f"{NODE}: the diffusion stage needs models, a VAE codec and text embeddings")
    # validate the working size before the (long) prior stage
    work_h, work_w = working_size(height, width, max_side)
    prior_settings = _propainter_settings(propainter_settings, sampler_settings.mask_dilation)
    # masks at their own size: the prior resizes them once to its working size and once to the frames' size
    if prior_only:
        prior = run_propainter_prior(frames, masks, propainter_nets, prior_settings, runtime).frames
        out = prior if original is None else _into_original(prior, frames, original)
        if on_frames is not None:
            for start in range(0, num, FRAME_CHUNK):
                on_frames(start, min(start + FRAME_CHUNK, num), out[start:start + FRAME_CHUNK])
        return out
    encoder = _PriorLatentSink(num, (work_h, work_w), codec, runtime)
    run_propainter_prior(frames, masks, propainter_nets, prior_settings, runtime, sink=encoder)
    prior_latent = encoder.result()
    del encoder
    latent_hw = (work_h // 8, work_w // 8)
    conditioning = build_conditioning(frames, masks, latent_hw, codec, sampler_settings.mask_dilation,
                                      device=_host_work_device(runtime), runtime=runtime)
    if injection_settings.mode == "ddim_inversion":
        start = invert_prior(
            prior_latent,
            conditioning,
            text_embeddings,
            models,
            injection_settings,
            runtime,
            window_overlap=sampler_settings.window_overlap,
            brushnet_scale=sampler_settings.brushnet_scale,
        )
    else:
        start = inject_forward_noise(prior_latent, injection_settings)
    del prior_latent
    latents = sample_video(
        start,
        frames,
        masks,
        text_embeddings,
        negative_embeddings,
        models,
        codec,
        sampler_settings,
        runtime,
        conditioning=conditioning,
    )
    del start, conditioning
    out = decode_and_blend(
        latents, frames, masks, codec, runtime, mask_dilation=sampler_settings.mask_dilation, feather=feather,
        out=output, original=original, on_frames=on_frames,
    )
    del latents
    if out.shape[0] != num:
        raise InputError(f"{NODE}: internal error, produced {out.shape[0]} frames for {num}")
    return out
