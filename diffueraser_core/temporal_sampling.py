"""BrushNet residuals -> motion UNet, window by window, TCD step by step (reference sections 2, 3, 5).

One denoising step walks the video in the staggered windows of ``windows.py`` (list A on even steps, B on odd):
for each window its latents and BrushNet conditioning go to the device, BrushNet runs once on the window's frames
(independently per frame), the motion UNet once on the whole window with BrushNet's 28 residuals, and the window
moves by one deterministic TCD step (eta = 0, i.e. a DDIM step, as the reference's pipeline default), or by one
LCMScheduler step for the LCM-like PCM LoRA (``schedule.SamplerStep``). The windows'
results are merged on the CPU with ``WindowAccumulator``, in list order.

Window batching (``WindowSettings.windows_per_batch`` > 1): the windows of one step all read the previous step's
latents and only meet in the accumulator, so consecutive windows of equal length can go through BrushNet and the
UNet as one batch of videos; the accumulator still receives them one by one in list order, so the result is the
one-window-at-a-time result (up to the last bits of batched conv/attention reductions). At small resolutions one
window leaves most of a GPU idle, which is what this buys back. A batch that runs out of memory is redone window by
window, and the rest of that ``denoise_windows`` call stays at one window per forward.

Classifier-free guidance runs only when ``guidance_scale > 1`` and a negative embedding is given (the reference
forces guidance 0 for every PCM checkpoint, quirk 10): uncond and cond then go as a batch of 2, split into two
passes when that batch does not fit in memory.

BrushNet conditioning (section 2): the frame with its holes black (uint8, as the reference), VAE-encoded and scaled,
concatenated with the mask at latent size (1 = known, 0 = hole; nearest, torch's default "nearest" as the
reference's ``F.interpolate``) -> 5 channels.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .errors import InputError
from .schedule import VAE_SCALING, SamplerStep, pairs_down  # noqa: F401  (pairs_down re-exported)
from .windows import DEFAULT_WINDOW_LENGTH, WindowAccumulator, windows_for_step

log = logging.getLogger(__name__)

#: frames per chunk when building the conditioning (resize / mask preparation / encode)
CONDITIONING_CHUNK = 16
#: rough activation bytes per latent pixel per frame per batch item per byte of dtype, for memory_required hints
#: (SD1.5 motion UNet + BrushNet with SDPA: a 22-frame 720p window in fp16 ~ 7.6 GB; a hint for the host's
#: memory manager, not a limit)
ACTIVATION_BYTES_PER_LATENT_PIXEL = 12_000


def check_windows_per_batch(value, where: str = "DiffuEraser Sampler") -> int:
    try:
        ok = not isinstance(value, bool) and int(value) == value and value >= 1
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok:
        raise InputError(f"{where}: windows_per_batch must be an integer >= 1, got {value!r}")
    return int(value)


@dataclass
class WindowSettings:
    """Per-window knobs: window_length/overlap (22, 22//4), guidance_scale (CFG only if > 1 and a negative is
    given), brushnet_scale (BrushNet conditioning_scale, 1.0), overwrite_last_overlap (reference quirk 3).

    windows_per_batch: 1 (default) is the reference behaviour, one window per BrushNet/UNet forward; > 1 lets up to
    that many consecutive windows of equal length of one step share a forward (same result, more memory per
    forward; falls back to one window at a time on out-of-memory).
    """

    window_length: int = DEFAULT_WINDOW_LENGTH
    window_overlap: Optional[int] = None
    guidance_scale: float = 0.0
    brushnet_scale: float = 1.0
    overwrite_last_overlap: bool = True
    windows_per_batch: int = 1

    def __post_init__(self):
        self.windows_per_batch = check_windows_per_batch(self.windows_per_batch)


@dataclass
class Conditioning:
    """The whole video's BrushNet conditioning on the CPU.

    masked_latents: scaled VAE latents of the masked frames, float32 ``[T,4,h,w]``.
    known: bool ``[T,h,w]``, True = known pixel (the inverse of the hole mask) at latent size.
    """

    masked_latents: torch.Tensor
    known: torch.Tensor

    @property
    def num_frames(self) -> int:
        return int(self.masked_latents.shape[0])

    def window(self, start: int, stop: int) -> torch.Tensor:
        """``brushnet_cond`` ``[F,5,h,w]`` float32 of frames ``[start, stop)``."""
        known = self.known[start:stop].unsqueeze(1).to(torch.float32)
        return torch.cat([self.masked_latents[start:stop], known], dim=1)

    def select(self, indices: torch.Tensor) -> "Conditioning":
        return Conditioning(self.masked_latents[indices], self.known[indices])

    @classmethod
    def all_known(cls, raw_latents: torch.Tensor) -> "Conditioning":
        """Conditioning on already encoded frames with every pixel known (e.g. the prior itself): no VAE pass."""
        num, _, h, w = raw_latents.shape
        return cls(raw_latents.to(torch.float32) * VAE_SCALING, torch.ones((num, h, w), dtype=torch.bool))


def known_at_latent_size(hole_masks: torch.Tensor, latent_hw: Tuple[int, int]) -> torch.Tensor:
    """bool holes ``[n,H,W]`` at the working size -> bool known ``[n,h,w]`` (nearest, as the reference)."""
    known = (~hole_masks).unsqueeze(1).to(torch.float32)
    return F.interpolate(known, size=tuple(latent_hw), mode="nearest")[:, 0] > 0.5


def masked_frames(frames: torch.Tensor, holes: torch.Tensor) -> torch.Tensor:
    """uint8 frames with the hole pixels black (``frame * (1 - mask)`` in uint8, reference section 2)."""
    return frames * (~holes).unsqueeze(-1).to(torch.uint8)


def build_conditioning(
    frames: torch.Tensor,
    masks: Optional[torch.Tensor],
    latent_hw: Tuple[int, int],
    codec,
    mask_dilation: int = 8,
    chunk: int = CONDITIONING_CHUNK,
    device: Optional[torch.device] = None,
    runtime=None,
) -> Conditioning:
    """Conditioning of uint8 frames ``[T,H,W,3]`` (any size) and raw bool hole masks ``[T,H,W]`` (True = hole).

    Chunk by chunk: frames resized to the working size (latent size x 8, bicubic), masks resized (nearest) and
    prepared as the reference (erode 1, dilate ``mask_dilation``), holes blacked out, encoded. ``masks=None`` means
    every pixel is known (e.g. conditioning on the prior itself). ``device``: where the resizes and the mask
    preparation run (uint8/bool chunks travel; the VAE takes the chunk from there), else on the host.
    """
    from .masks import prepare_diffueraser_masks, resize_masks_nearest
    from .video import resize_frames

    num = int(frames.shape[0])
    h, w = int(latent_hw[0]), int(latent_hw[1])
    size = (h * 8, w * 8)
    if masks is not None and masks.shape[0] != num:
        raise InputError(f"DiffuEraser Sampler: mask has {masks.shape[0]} frames but the video has {num}")
    masked_latents = torch.empty((num, 4, h, w), dtype=torch.float32)
    known = torch.ones((num, h, w), dtype=torch.bool)
    if runtime is not None:
        runtime.progress("encode", 0, num)
    for start in range(0, num, chunk):
        stop = min(start + chunk, num)
        part_frames = frames[start:stop] if device is None else frames[start:stop].to(device)
        part = resize_frames(part_frames, size)
        if masks is not None:
            part_masks = masks[start:stop] if device is None else masks[start:stop].to(device)
            holes = prepare_diffueraser_masks(resize_masks_nearest(part_masks, size), mask_dilation)
            part = masked_frames(part, holes)
            known[start:stop] = known_at_latent_size(holes, (h, w))
        masked_latents[start:stop] = codec.encode(part).to(torch.float32) * VAE_SCALING
        if runtime is not None:
            runtime.progress("encode", stop, num)
    return Conditioning(masked_latents, known)


def _model_dtype(module: torch.nn.Module) -> torch.dtype:
    for p in module.parameters():
        return p.dtype
    return torch.float32


def _repeat_frames(embedding: torch.Tensor, frames: int) -> torch.Tensor:
    return embedding.repeat_interleave(frames, dim=0)


def predict_noise(
    unet: torch.nn.Module,
    brushnet: torch.nn.Module,
    x: torch.Tensor,
    timestep: int,
    cond: torch.Tensor,
    embeddings: torch.Tensor,
    brushnet_scale: float,
) -> torch.Tensor:
    """eps for a window: ``x`` ``[F,4,h,w]`` (scaled), ``cond`` ``[F,5,h,w]``, ``embeddings`` ``[B,L,D]`` (B text
    embeddings, e.g. uncond + cond). Returns ``[B,F,4,h,w]`` float32 on the device.

    Several windows of the same length at once: ``x`` ``[K,F,4,h,w]`` and ``cond`` ``[K,F,5,h,w]`` run as K*B
    videos in one forward of each network and give ``[K,B,F,4,h,w]``.
    """
    single = x.dim() == 4
    if single:
        x, cond = x.unsqueeze(0), cond.unsqueeze(0)
    if cond.shape[:2] != x.shape[:2]:
        raise InputError(
            f"DiffuEraser Sampler: conditioning {tuple(cond.shape)} does not match the latents {tuple(x.shape)}"
        )
    windows, frames = x.shape[0], x.shape[1]
    batch = embeddings.shape[0]
    videos = windows * batch
    device = x.device
    b_dtype, u_dtype = _model_dtype(brushnet), _model_dtype(unet)
    t = torch.tensor(int(timestep), device=device, dtype=torch.long)
    # (k b f) order: the UNet reads BrushNet's residuals as [video, frame], so frames must stay innermost
    sample = x.unsqueeze(1).expand(windows, batch, *x.shape[1:]).reshape(videos * frames, *x.shape[2:])
    video_cond = cond.unsqueeze(1).expand(windows, batch, *cond.shape[1:]).reshape(videos * frames, *cond.shape[2:])
    video_text = embeddings.repeat(windows, 1, 1)
    down, mid, up = brushnet(
        sample.to(b_dtype),
        t,
        encoder_hidden_states=_repeat_frames(video_text, frames).to(b_dtype),
        brushnet_cond=video_cond.to(b_dtype),
        conditioning_scale=brushnet_scale,
    )
    video = sample.view(videos, frames, *x.shape[2:]).permute(0, 2, 1, 3, 4)  # [K*B,4,F,h,w]
    out = unet(
        video.to(u_dtype),
        t,
        encoder_hidden_states=video_text.to(u_dtype),
        down_block_add_samples=[d.to(u_dtype) for d in down],
        mid_block_add_sample=mid.to(u_dtype),
        up_block_add_samples=[u.to(u_dtype) for u in up],
    )
    if not isinstance(out, torch.Tensor):  # a diffusers output object
        out = out[0]
    out = out.permute(0, 2, 1, 3, 4).to(torch.float32)
    out = out.reshape(windows, batch, *out.shape[1:])
    return out[0] if single else out


# An out-of-memory window is retried once asking for this many times the estimate (see _guided_noise).
OOM_RETRY_MEMORY_FACTOR = 2


def _memory_hint(frames: int, latent_hw: Tuple[int, int], batch: int, dtype: torch.dtype) -> int:
    itemsize = torch.empty((), dtype=dtype).element_size()
    return int(ACTIVATION_BYTES_PER_LATENT_PIXEL * frames * latent_hw[0] * latent_hw[1] * batch * itemsize)


def _use_cfg(negative: Optional[torch.Tensor], settings: WindowSettings) -> bool:
    return negative is not None and settings.guidance_scale > 1.0


def _batched_guided_noise(
    models,
    xs: torch.Tensor,
    timestep: int,
    conds: torch.Tensor,
    text: torch.Tensor,
    negative: Optional[torch.Tensor],
    settings: WindowSettings,
    runtime,
) -> torch.Tensor:
    """eps ``[K,F,4,h,w]`` of K equal-length windows ``xs`` ``[K,F,4,h,w]`` in one forward, CFG as in
    ``_guided_noise``. No out-of-memory handling here: the caller redoes the windows one by one."""
    use_cfg = _use_cfg(negative, settings)
    device = runtime.device
    embeddings = torch.cat([negative, text]) if use_cfg else text
    windows, frames = xs.shape[0], xs.shape[1]
    memory = _memory_hint(frames, (xs.shape[3], xs.shape[4]), windows * embeddings.shape[0], runtime.dtype)
    brushnet = models.brushnet.acquire(memory_required=memory)
    unet = models.unet.acquire(memory_required=memory)
    eps = predict_noise(
        unet, brushnet, xs.to(device), timestep, conds.to(device), embeddings.to(device), settings.brushnet_scale
    )
    if use_cfg:
        uncond, cond_eps = eps[:, 0], eps[:, 1]
        return uncond + settings.guidance_scale * (cond_eps - uncond)
    return eps[:, 0]


def _equal_length_run(windows: Sequence[Tuple[int, int]], first: int, limit: int) -> int:
    """How many windows from ``first`` on (at most ``limit``) have the length of window ``first``."""
    length = windows[first][1] - windows[first][0]
    end = first + 1
    while end < len(windows) and end - first < limit and windows[end][1] - windows[end][0] == length:
        end += 1
    return end - first


def _guided_noise(
    models,
    x: torch.Tensor,
    timestep: int,
    cond: torch.Tensor,
    text: torch.Tensor,
    negative: Optional[torch.Tensor],
    settings: WindowSettings,
    runtime,
) -> torch.Tensor:
    """eps of one window with CFG when asked.

    On out-of-memory: a CFG batch is retried as two passes; then the window is retried once asking the host for
    twice the memory, which makes ComfyUI free more or load the networks partially (low-VRAM streaming). The
    temporal attention needs the whole window at once, so a window itself is never split.
    """
    use_cfg = _use_cfg(negative, settings)
    device = runtime.device
    embeddings = torch.cat([negative, text]) if use_cfg else text
    hw = (x.shape[2], x.shape[3])
    # (embeddings or None for the split CFG passes, factor on the memory asked for)
    attempts = [(embeddings, 1)] + ([(None, 1)] if use_cfg else [])
    attempts.append((attempts[-1][0], OOM_RETRY_MEMORY_FACTOR))
    for attempt, (emb, factor) in enumerate(attempts):
        try:
            memory = factor * _memory_hint(x.shape[0], hw, 1 if emb is None else emb.shape[0], runtime.dtype)
            brushnet = models.brushnet.acquire(memory_required=memory)
            unet = models.unet.acquire(memory_required=memory)
            x_dev = x.to(device)
            cond_dev = cond.to(device)
            if emb is not None:
                eps = predict_noise(unet, brushnet, x_dev, timestep, cond_dev, emb.to(device), settings.brushnet_scale)
            else:
                parts = [
                    predict_noise(unet, brushnet, x_dev, timestep, cond_dev, e.to(device), settings.brushnet_scale)
                    for e in (negative, text)
                ]
                eps = torch.cat(parts)
            break
        except Exception as exc:  # only out-of-memory is handled; everything else propagates unchanged
            if not runtime.is_oom(exc):
                raise
            runtime.empty_cache()
            if attempt + 1 < len(attempts):
                log.warning("DiffuEraser Sampler: out of memory on a window (attempt %d); retrying with %s",
                            attempt + 1, "two CFG passes" if attempts[attempt + 1][0] is None and emb is not None
                            else "more memory requested from the host")
                continue
            raise torch.OutOfMemoryError(
                f"DiffuEraser Sampler: out of memory on a window of {x.shape[0]} frames at latent size "
                f"{hw[0]}x{hw[1]} (frames {hw[1] * 8}x{hw[0] * 8}); this cannot be split further: lower the "
                "resolution (max_side) or the window length"
            ) from exc
    if use_cfg:
        uncond, cond_eps = eps[0], eps[1]
        return uncond + settings.guidance_scale * (cond_eps - uncond)
    return eps[0]


def denoise_windows(
    latents: torch.Tensor,
    timestep_pairs: Sequence[Tuple[int, int]],
    conditioning: Conditioning,
    text_embeddings: torch.Tensor,
    negative_embeddings: Optional[torch.Tensor],
    models,
    settings: WindowSettings,
    runtime,
    stage: str = "sampling",
    step_numbers: Optional[Sequence[int]] = None,
    step: Optional[SamplerStep] = None,
) -> torch.Tensor:
    """Move scaled latents ``[T,4,h,w]`` (CPU) through ``timestep_pairs`` ((t, next t) per step), window by window.

    Going down this is the TCD sampler; going up (pairs ascending) the DDIM inversion. ``step`` is the update of
    one window (default: TCD / DDIM; ``SamplerStep("lcm", noise)`` for the LCM-like LoRA with
    ``schedule.lcm_pairs``). ``step_numbers`` picks the window list of each step (default 0, 1, 2, ...: list A on
    even numbers). Returns new float32 CPU latents. With ``settings.windows_per_batch`` > 1 equal-length windows
    share forwards (see the module docstring).
    """
    step = step or SamplerStep()
    # the settings object may have been changed after construction
    per_batch = check_windows_per_batch(settings.windows_per_batch)
    num = int(latents.shape[0])
    if conditioning.num_frames != num:
        raise InputError(
            f"DiffuEraser Sampler: conditioning has {conditioning.num_frames} frames but the latent has {num}"
        )
    if step_numbers is None:
        step_numbers = list(range(len(timestep_pairs)))
    schedule = [
        windows_for_step(n, num, settings.window_length, settings.window_overlap) for n in step_numbers
    ]
    total = sum(len(w) for w in schedule)
    done = 0
    text = text_embeddings.detach().to("cpu", torch.float32)
    negative = None if negative_embeddings is None else negative_embeddings.detach().to("cpu", torch.float32)
    if text.dim() == 2:
        text = text.unsqueeze(0)
    if negative is not None and negative.dim() == 2:
        negative = negative.unsqueeze(0)
    latents = latents.to(torch.float32)
    runtime.progress(stage, 0, total)  # announced before the first window: the host shows the stage at once
    try:
        for (t, s), windows in zip(timestep_pairs, schedule):
            acc = WindowAccumulator(num, overwrite_last_overlap=settings.overwrite_last_overlap, dtype=torch.float32)
            first = 0
            while first < len(windows):
                runtime.check_interrupt()
                group = windows[first : first + _equal_length_run(windows, first, per_batch)]
                first += len(group)
                moved_group = None
                out_of_memory = False
                if len(group) > 1:
                    xs = torch.stack([latents[a:b] for a, b in group])
                    try:
                        eps = _batched_guided_noise(
                            models,
                            xs,
                            t,
                            torch.stack([conditioning.window(a, b) for a, b in group]),
                            text,
                            negative,
                            settings,
                            runtime,
                        )
                        moved_group = step(xs.to(eps.device), eps, t, s).cpu()
                    except Exception as exc:  # only out-of-memory is handled; everything else propagates
                        if not runtime.is_oom(exc):
                            raise
                        out_of_memory = True
                if out_of_memory:
                    # outside the except block: the exception's traceback no longer pins the failed activations
                    runtime.empty_cache()
                    log.warning(
                        "DiffuEraser Sampler: out of memory on a batch of %d windows; running one window per "
                        "forward for the rest of this %s",
                        len(group),
                        stage,
                    )
                    per_batch = 1
                for i, (start, stop) in enumerate(group):
                    if moved_group is not None:
                        moved = moved_group[i]
                    else:
                        if i:  # the group's first window was covered by the check above
                            runtime.check_interrupt()
                        x = latents[start:stop]
                        eps = _guided_noise(
                            models, x, t, conditioning.window(start, stop), text, negative, settings, runtime
                        )
                        moved = step(x.to(eps.device), eps, t, s).cpu()
                    acc.add(start, stop, moved)
                    done += 1
                    middle = moved.shape[0] // 2
                    runtime.progress(stage, done, total, preview_latent=moved[middle : middle + 1] / VAE_SCALING)
            latents = acc.result()
    finally:
        models.brushnet.release()
        models.unet.release()
    return latents


def check_latent_frames(latent_frames: int, frames: int, where: str = "DiffuEraser Sampler") -> None:
    if latent_frames != frames:
        raise InputError(
            f"{where}: the latent has {latent_frames} frames but the video has {frames}; "
            "inject the prior of this same video"
        )
