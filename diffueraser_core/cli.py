"""``python -m diffueraser_core remove VIDEO MASK OUTPUT [options]``: DiffuEraser without ComfyUI.

VIDEO is a video file or a folder of frames; MASK a mask video, a folder of mask frames or a single image (used for
every frame); OUTPUT a video file or a folder of PNG frames (what is kept: README, "Media: what goes in and what
comes out"). The output is checked before anything is read. Models come from a ComfyUI-style models folder
(``--models``, see docs/architecture.md); nothing is downloaded. Progress goes to stderr: one bar per stage on a
terminal, plain lines otherwise. Exit codes: 0 done, 1 bad input or model files, 2 bad command line, 130 cancelled.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional

from .errors import DiffuEraserError, Interrupted
from .model_loading import (  # noqa: F401  (the loaders live below the CLI; these names stay importable here)
    DIFFUSION_MODEL_KEYS,
    PROG,
    PROPAINTER_MODEL_KEYS,
    auto_device as _auto_device,
    check_models as _check_models,
    default_models_dir as _default_models_dir,
    load_diffusion as _load_diffusion,
    load_diffusion_models,
    load_propainter as _load_propainter,
    resolve_lora as _resolve_lora,
)

log = logging.getLogger(__name__)

#: run_diffueraser's ProPainter settings (the reference entry point overrides ProPainter's own defaults)
RUN_DIFFUERASER_PROPAINTER = {"ref_stride": 10, "neighbor_length": 10, "subvideo_length": 50}  # = ProPainterSettings()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Remove masked objects from a video with DiffuEraser.")
    p.add_argument("video", help="input video file or folder of frames")
    p.add_argument("mask", help="mask video, folder of mask frames, or one mask image for every frame: opaque alpha, "
                                "else any channel above 127 (white/red/...) = remove; README has the conventions")
    p.add_argument("output", help="output video file (.mp4/.m4v/.mov/.mkv) or a folder (no suffix) for PNG frames; "
                                  "never an input")
    add_run_options(p)
    return p


def add_output_options(p: argparse.ArgumentParser) -> None:
    """How the output is written and how masks are read (``remove`` and ``batch`` share them)."""
    from .media_out import DEFAULT_CODEC, DEFAULT_CRF, DEFAULT_PIX_FMT

    out = p.add_argument_group("output (checked before the input is read)")
    out.add_argument("--codec", default=None,
                     help=f"video codec (default {DEFAULT_CODEC}: plays everywhere); lossless/high depth: ffv1 "
                          "(.mkv), prores_ks (.mov/.mkv), png (.mov); also libx265, libvpx-vp9, qtrle")
    out.add_argument("--crf", type=int, default=None,
                     help=f"quality for libx264/libx265 (0..51) and libvpx-vp9 (0..63); default {DEFAULT_CRF}")
    out.add_argument("--pix-fmt", default=None,
                     help=f"pixel format (default {DEFAULT_PIX_FMT} for libx264, which needs even sides; "
                          "yuv444p keeps odd sizes; ffv1/png/prores default to the source's depth and alpha)")
    out.add_argument("--match-input", action="store_true",
                     help="use the input's codec and pixel format where the container allows (VFX intermediates)")
    p.add_argument("--invert-mask", action="store_true", help="the mask marks what to keep: invert it")
    p.add_argument("--allow-large-mask", action="store_true",
                   help="accept a mask covering more than 90%% of the frame (otherwise refused as probably inverted)")


def add_run_options(p: argparse.ArgumentParser) -> None:
    """The options of one removal (``remove`` and ``batch`` share them)."""
    add_output_options(p)
    p.add_argument("--models", default=None, help="ComfyUI models folder (default: $COMFYUI_MODELS_DIR or ./models)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0; the reference drew a random one)")
    p.add_argument("--steps", type=int, default=2, help="TCD steps, 1..50 (PCM LoRAs: 2, 4, 8, 16; default 2)")
    p.add_argument("--guidance-scale", type=float, default=0.0, help="CFG scale; only used if > 1 (reference: 0)")
    p.add_argument("--prior-only", action="store_true", help="ProPainter prior only, no diffusion")
    p.add_argument("--max-side", type=int, default=960, help="longer side of the working size, 256..1920")
    p.add_argument("--mask-dilation", type=int, default=8, help="mask dilation iterations (3x3), default 8")
    p.add_argument("--window-length", type=int, default=22, help="frames per temporal window (default 22)")
    p.add_argument("--window-overlap", type=int, default=None, help="window overlap (default window-length // 4)")
    p.add_argument("--windows-per-batch", type=int, default=1,
                   help="sampling windows per forward: same result, more GPU memory; can be faster at low resolution")
    p.add_argument("--no-pre-inference", action="store_true", help="skip the keyframe pre-inference on long videos")
    p.add_argument("--mode", choices=("forward_noise", "ddim_inversion"), default="forward_noise",
                   help="prior injection: forward noise to t=999 (reference code) or DDIM inversion (paper)")
    p.add_argument("--strength", type=float, default=1.0, help="start strength (1.0 = start at t=999)")
    p.add_argument("--brushnet-scale", type=float, default=1.0, help="BrushNet conditioning scale (default 1.0)")
    p.add_argument("--lora", default=None,
                   help="PCM LoRA file name in models/diffueraser (or a path); 'none' for no LoRA")
    p.add_argument("--lora-strength", type=float, default=1.0, help="PCM LoRA strength (default 1.0)")
    p.add_argument("--scheduler", choices=("auto", "tcd", "lcm"), default="auto",
                   help="sampler: auto = the one the LoRA needs (LCMScheduler for pcm_sd15_lcmlike_lora, as the "
                        "reference; TCD otherwise)")
    p.add_argument("--device", choices=("cpu", "cuda", "mps"), default=None, help="compute device (default: best)")
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default=None,
                   help="network precision (default: fp16 on CUDA/MPS as the reference, fp32 on the CPU; RAFT and "
                        "flow warping grids always run in fp32)")
    p.add_argument("--raft-iter", type=int, default=20, help="RAFT iterations for the prior (default 20)")
    p.add_argument("--subvideo-length", type=int, default=RUN_DIFFUERASER_PROPAINTER["subvideo_length"],
                   help="ProPainter sub-video length (run_diffueraser: 50)")
    p.add_argument("--neighbor-length", type=int, default=RUN_DIFFUERASER_PROPAINTER["neighbor_length"],
                   help="ProPainter neighbour length (default 10)")
    p.add_argument("--ref-stride", type=int, default=RUN_DIFFUERASER_PROPAINTER["ref_stride"],
                   help="ProPainter reference frame stride (default 10)")
    p.add_argument("--resize-ratio", type=float, default=0.6, help="ProPainter working-size ratio (default 0.6)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="run on a Ray cluster (pip install .[distributed]): ADDRESS of its head (e.g. ray://host:10001 "
                        "or host:6379), or nothing / 'local' for a local cluster; same result as without --ray. "
                        "Put it after the positional arguments, or write --ray=ADDRESS")
    p.add_argument("--ray-workers", type=int, default=None,
                   help="Ray workers (default: one per GPU of the cluster; without GPUs, one per --ray-cpus-per-worker CPUs)")
    p.add_argument("--ray-cpus-per-worker", type=int, default=1, help="CPUs (torch threads) per CPU-only Ray worker")


class _ProgressPrinter:
    """Progress reports (a window, a chunk, a stage step) on ``stream``: on a terminal one tqdm bar per stage with its
    rate and ETA, and the whole job's share done, elapsed time and ETA beside it (from the ``job`` count,
    ``progress.JobProgress``); otherwise one plain line per report (the job's only when its whole percent changes).

    Stages that take turns chunk by chunk (decode, blend and write as each chunk is finished and written) keep
    their own bar each, on its own line, instead of a new bar at every switch."""

    def __init__(self, stream, quiet: bool):
        import time

        self.stream = stream
        self.quiet = quiet
        self.started = time.monotonic()
        isatty = getattr(stream, "isatty", None)
        self.bars = bool(isatty and isatty())
        self.open_bars = {}  # stage -> its tqdm bar, until that stage completes
        self.job_fraction = None
        self.job_percent = None

    def _job_text(self) -> str:
        import time

        elapsed = time.monotonic() - self.started
        if not self.job_fraction:
            return f"job {elapsed:.0f}s"
        eta = elapsed * (1.0 - self.job_fraction) / self.job_fraction
        return f"job {int(100 * self.job_fraction)}% {elapsed:.0f}s, ETA {eta:.0f}s"

    def __call__(self, stage, done, total, preview=None):
        from .progress import JOB_STAGE

        if self.quiet:
            return
        if stage == JOB_STAGE:
            self.job_fraction = min(1.0, done / max(1, total))
            percent = int(100 * self.job_fraction)
            if not self.bars and percent != self.job_percent:
                self.stream.write(f"[diffueraser] {self._job_text()}\n")
                self.stream.flush()
            self.job_percent = percent
            if self.bars and self.open_bars:
                list(self.open_bars.values())[-1].set_postfix_str(self._job_text(), refresh=True)
            return
        if not self.bars:
            self.stream.write(f"[diffueraser] {stage}: {done}/{total}\n")
            self.stream.flush()
            return
        from tqdm import tqdm

        bar = self.open_bars.get(stage)
        if bar is not None and (bar.total != total or done < bar.n):
            self._close(stage)  # the stage started another pass
            bar = None
        if bar is None:
            taken = {b.pos for b in self.open_bars.values()}  # the first line no open bar is on
            line = next(k for k in range(len(self.open_bars) + 1) if k not in taken and -k not in taken)
            bar = tqdm(total=total, desc=f"[diffueraser] {stage}", file=self.stream, leave=True,
                       dynamic_ncols=True, unit="step", position=line)
            self.open_bars[stage] = bar
        bar.set_postfix_str(self._job_text(), refresh=False)
        bar.update(max(0, done - bar.n))
        if done >= total:
            self._close(stage)

    def _close(self, stage):
        bar = self.open_bars.pop(stage, None)
        if bar is not None:
            bar.close()

    def close(self):
        for stage in list(self.open_bars):
            self._close(stage)


def settings_from_args(args):
    """(SamplerSettings, InjectionSettings, ProPainterSettings) from parsed options, validated."""
    from .pipeline import SamplerSettings
    from .prior_injection import InjectionSettings
    from .prior_propainter import ProPainterSettings

    sampler = SamplerSettings(
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        window_length=args.window_length,
        window_overlap=args.window_overlap,
        windows_per_batch=args.windows_per_batch,
        brushnet_scale=args.brushnet_scale,
        pre_inference=not args.no_pre_inference,
        mask_dilation=args.mask_dilation,
        scheduler=args.scheduler,
    )
    injection = InjectionSettings(
        mode=args.mode, seed=args.seed, window_length=args.window_length, strength=args.strength,
        inversion_steps=args.steps,
    )
    propainter = ProPainterSettings(
        resize_ratio=args.resize_ratio,
        mask_dilation=args.mask_dilation,
        ref_stride=args.ref_stride,
        neighbor_length=args.neighbor_length,
        subvideo_length=args.subvideo_length,
        raft_iter=args.raft_iter,
    )
    propainter.validate()
    return sampler, injection, propainter


def check_output(args, video: str, mask: str, output: str, where: str = PROG):
    """The output target checked (suffix, codec options, never an input, writable) before any input is read."""
    from .media_out import OutputOptions, check_output_target

    options = OutputOptions(codec=args.codec, crf=args.crf, pix_fmt=args.pix_fmt, match_input=args.match_input)
    return check_output_target(output, inputs=[video, mask], options=options, node=f"{where} OUTPUT")


def run(args, stream=None, engine=None) -> None:
    """Run one removal from parsed arguments; progress lines go to ``stream`` (default: the current stderr).
    ``engine`` (``jobs.LocalEngine`` / ``jobs.RayEngine``) reuses networks already loaded (tests, batch)."""
    from .jobs import make_engine, read_shot, run_shot

    settings = settings_from_args(args)
    if getattr(args, "ray", None) is None:
        import torch

        _check_device(torch.device(args.device) if args.device else _auto_device())
    # The output first: a wrong target must not cost a read of the input, let alone a run.
    target = check_output(args, args.video, args.mask, args.output)
    models_dir = args.models or _default_models_dir()
    found = _check_models(models_dir, args.prior_only, args.lora)
    printer = _ProgressPrinter(stream or sys.stderr, args.quiet)
    shot = read_shot(args.video, args.mask, args, target, printer)
    own_engine = engine is None
    if own_engine:
        engine = make_engine(args, found, models_dir, printer)
    engine.set_printer(printer)
    try:
        run_shot(engine, shot, target, settings, args, printer)
    finally:
        if own_engine:
            engine.close()


def _check_device(device) -> None:
    import torch

    from .errors import InputError

    available = {
        "cpu": True,
        "cuda": torch.cuda.is_available(),
        "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available(),
    }
    if not available.get(device.type, False):
        usable = ", ".join(name for name, ok in available.items() if ok)
        raise InputError(f"{PROG}: --device {device.type!r} is not available here; usable: {usable}")


def main(argv: Optional[List[str]] = None, engine=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help (0) and bad arguments (2)
        return int(exc.code or 0)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        run(args, engine=engine)
    except DiffuEraserError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    except Interrupted as exc:
        sys.stderr.write(f"{exc}\n")
        return 130
    return 0
