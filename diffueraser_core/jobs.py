"""Engines that run one shot, shared by ``remove`` and ``batch``: networks loaded once, many shots.

``LocalEngine`` runs ``pipeline.remove_objects`` in this process; ``RayEngine`` runs ``distributed.RayRemover``
on a Ray cluster (imported only when ``--ray`` is given). A shot is read (and checked) before any network runs.
Its output frames are written in order as they complete: the engine hands each finished chunk to a
``media_out.open_clip_writer`` while it computes the next, so the result is never held a second time. The writer
works under a temporary name and renames it when the last frame is in, so an interrupted or failed run never
leaves a partial output under the final name (nor a temporary file).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

import torch

from .model_loading import PROG

log = logging.getLogger(__name__)


@dataclass
class Shot:
    video_path: str
    mask_path: str
    clip: object  # media_in.Clip: 8-bit RGB frames, the full-depth/alpha original when there is one, ClipInfo
    masks: torch.Tensor

    @property
    def num_frames(self) -> int:
        return int(self.clip.frames.shape[0])


def read_shot(video_path: str, mask_path: str, args, target, printer=None) -> Shot:
    """Read a video and its masks, checking the working size, the encoding the output needs and the mask coverage:
    every bad-input error before any long work. ``target``: the checked output (``cli.check_output``)."""
    from .media_in import read_clip
    from .media_masks import check_mask_coverage, read_masks_for
    from .media_out import choose_encoding
    from .video import working_size

    clip = read_clip(video_path, node=f"{PROG} VIDEO")
    frames = clip.frames
    num, height, width = int(frames.shape[0]), int(frames.shape[1]), int(frames.shape[2])
    working_size(height, width, args.max_side, node=f"{PROG} {video_path!r}")
    if target.kind == "video":
        choose_encoding(target, clip.info, node=f"{PROG} OUTPUT")
    masks = read_masks_for(mask_path, clip.info, node=f"{PROG} MASK")
    if getattr(args, "invert_mask", False):
        masks = ~masks
    check_mask_coverage(masks, f"{PROG} MASK {mask_path!r}", allow_large=getattr(args, "allow_large_mask", False))
    if printer is not None:
        printer(f"read {num} frames {width}x{height} at {float(clip.fps):g} fps", 1, 1)
    return Shot(video_path, mask_path, clip, masks)


def removal_options(settings, max_side, prior_only, output, original, on_frames) -> dict:
    """The keyword arguments both engines pass on: ``remove_objects`` and ``RayRemover.remove`` take the same ones.
    ``settings``: (SamplerSettings, InjectionSettings, ProPainterSettings)."""
    sampler, injection, propainter = settings
    return dict(sampler_settings=sampler, injection_settings=injection, propainter_settings=propainter,
                max_side=max_side, prior_only=prior_only, output=output, original=original, on_frames=on_frames)


class LocalEngine:
    """The networks in this process (the single-process path)."""

    def __init__(self, args, found: dict, models_dir: str, printer):
        from .model_loading import auto_device, load_diffusion, load_propainter
        from .runtime import StandaloneRuntime, dtype_from_name

        device = torch.device(args.device) if args.device else auto_device()
        self.runtime = StandaloneRuntime(device=device, dtype=dtype_from_name(args.dtype, device),
                                         progress_callback=printer)
        self.nets = load_propainter(found, self.runtime)
        self.models = self.codec = self.text = None
        if not args.prior_only:
            self.models, self.codec, self.text = load_diffusion(found, models_dir, args, self.runtime)

    def remove(self, frames, masks, *, settings, max_side, prior_only, output, original=None, on_frames=None):
        """``pipeline.remove_objects``; ``on_frames(start, stop, chunk)`` gets the finished chunks in order."""
        from .pipeline import remove_objects

        printer = self.runtime.progress_callback
        self.runtime.progress_callback = local_job_progress(printer, int(frames.shape[0]), settings[0], prior_only)
        try:
            return remove_objects(
                frames,
                masks,
                propainter_nets=self.nets,
                runtime=self.runtime,
                models=self.models,
                codec=self.codec,
                text_embeddings=self.text,
                **removal_options(settings, max_side, prior_only, output, original, on_frames),
            )
        finally:
            self.runtime.progress_callback = printer

    def set_printer(self, printer) -> None:
        self.runtime.progress_callback = printer

    def close(self) -> None:
        pass


def local_job_progress(printer, num: int, sampler, prior_only: bool):
    """The whole-job count for one single-process removal: the stages ``remove_objects`` reports, weighted by the
    frames each pass touches (the VAE encodes twice: the prior's frames, then the conditioning). Blending and
    writing the output (``run_shot``) have no weight of their own: they run chunk by chunk between the decode's
    reports, so the decode's share of the time includes them (a prior-only run writes once the prior is done)."""
    from .pre_inference import MIN_WINDOWS_FOR_PRE_INFERENCE
    from .progress import JobProgress
    from .windows import window_lists

    if prior_only:
        return JobProgress(printer, {"prior": num})
    window = sampler.window_settings()
    list_a, list_b = window_lists(num, window.window_length, window.window_overlap)
    window_frames = sum(
        sum(stop - start for start, stop in (list_a if n % 2 == 0 else list_b)) for n in range(sampler.steps)
    )
    long_enough = num > MIN_WINDOWS_FOR_PRE_INFERENCE * window.window_length
    pre = window.window_length if sampler.pre_inference and long_enough else 0
    weights = {"prior": num, "encode": num, "pre-inference": pre * sampler.steps, "sampling": window_frames,
               "decode": num}
    return JobProgress(printer, weights, passes={"encode": 2})


class RayEngine:
    """The networks in Ray workers across a cluster (``distributed.RayRemover``)."""

    def __init__(self, remover, printer, owns_workers: bool = True):
        self.remover = remover
        self.printer = printer
        self.owns_workers = owns_workers

    @classmethod
    def start(cls, args, found: dict, models_dir: str, printer) -> "RayEngine":
        from .distributed import RayRemover, WorkerSpec, init_cluster
        from .model_loading import resolve_lora

        # the scheduler (--scheduler; auto: the one this LoRA needs) comes with each shot's sampler settings
        lora = None if args.prior_only else resolve_lora(found, models_dir, args.lora)
        address = None if args.ray in ("", "local") else args.ray
        init_cluster(address)
        spec = WorkerSpec(
            model_paths={k: v for k, v in found.items() if v},
            prior_only=bool(args.prior_only),
            lora_path=lora,
            lora_strength=args.lora_strength,
            device=args.device,
        )
        started = time.monotonic()
        remover = RayRemover(spec, num_workers=args.ray_workers, cpus_per_worker=args.ray_cpus_per_worker,
                             gpus_per_worker=0.0 if args.device == "cpu" else None)
        printer(f"{len(remover.workers)} Ray workers ready in {time.monotonic() - started:.1f} s", 1, 1)
        return cls(remover, printer)

    def remove(self, frames, masks, *, settings, max_side, prior_only, output, original=None, on_frames=None):
        """``distributed.RayRemover.remove``; ``on_frames(start, stop, chunk)`` gets the finished chunks in order."""
        return self.remover.remove(frames, masks, progress=self.printer,
                                   **removal_options(settings, max_side, prior_only, output, original, on_frames))

    def set_printer(self, printer) -> None:
        self.printer = printer

    def close(self) -> None:
        if self.owns_workers:
            self.remover.shutdown()


def make_engine(args, found: dict, models_dir: str, printer):
    if getattr(args, "ray", None) is not None:
        return RayEngine.start(args, found, models_dir, printer)
    return LocalEngine(args, found, models_dir, printer)


def run_shot(engine, shot: Shot, target, settings, args, printer) -> None:
    """Remove the masked objects of one shot and write ``target`` (``cli.check_output``): each finished chunk is
    written as the engine hands it over; the file appears under its name only once complete."""
    from .media_in import original_to_uint8
    from .media_out import open_clip_writer

    clip = shot.clip
    num, height, width = int(clip.frames.shape[0]), int(clip.frames.shape[1]), int(clip.frames.shape[2])
    info = replace(clip.info, height=height, width=width)

    def write(start: int, stop: int, chunk) -> None:
        if clip.original is None:
            writer.write(start, chunk)
        else:
            # the chunk is the composited original; its 8-bit RGB goes where its input frames were, which no stage
            # reads once the chunk is blended (no second full-size buffer)
            writer.write(start, original_to_uint8(chunk, out=clip.frames[start:stop]), chunk)

    with open_clip_writer(target, info, node=f"{PROG} OUTPUT", progress=printer) as writer:
        out = engine.remove(
            clip.frames,
            shot.masks,
            settings=settings,
            max_side=args.max_side,
            prior_only=args.prior_only,
            # The input is not needed afterwards: blending into it keeps a single full-size copy of the video.
            output=clip.frames,
            original=clip.original,
            on_frames=write,
        )
        if writer.written < num:  # an empty mask: the input comes back as it is, without chunks handed over
            write(writer.written, num, out[writer.written:])
    printer(f"wrote {target.path}", 1, 1)
