"""Benchmark the ProPainter prior stage: seconds and peak memory per frame.

    python bench/bench_prior.py --size 432x240 --frames 6 --device cpu
    python bench/bench_prior.py --size 1280x720 --frames 120 --device cuda --weights models/propainter

Without ``--weights`` random weights in the official layout are written to a temporary folder (the networks are
full size, so the timings are those of the real models; the content is meaningless). Prints one JSON object.
Peak CPU memory is the process's ru_maxrss (includes torch and the weights); peak device memory is
``torch.cuda.max_memory_allocated`` on CUDA.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import resource
import sys
import tempfile
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from diffueraser_core.prior_propainter import (  # noqa: E402
    ProPainterSettings,
    load_propainter_nets,
    run_propainter_prior,
    working_size,
)
from diffueraser_core.runtime import StandaloneRuntime  # noqa: E402

log = logging.getLogger("bench_prior")

SIZES = {"432x240": (240, 432), "1280x720": (720, 1280)}
# The moving box covers about this fraction of each side, like a typical object mask.
MASK_FRACTION = 0.25


def _parse_size(text: str):
    if text in SIZES:
        return SIZES[text]
    width, height = (int(v) for v in text.lower().split("x"))
    return height, width


def synthetic_clip(count: int, height: int, width: int, seed: int = 0):
    """uint8 frames with texture and motion, and a moving box mask, built frame by frame."""
    g = torch.Generator().manual_seed(seed)
    ys = torch.arange(height).view(height, 1, 1).float()
    xs = torch.arange(width).view(1, width, 1).float()
    phase = torch.rand(1, 1, 3, generator=g) * 6
    frames = torch.empty(count, height, width, 3, dtype=torch.uint8)
    masks = torch.zeros(count, height, width, dtype=torch.bool)
    box_h, box_w = int(height * MASK_FRACTION), int(width * MASK_FRACTION)
    for i in range(count):
        frame = 127.5 + 100 * torch.sin((xs + 3 * i) / 17 + phase) * torch.cos((ys - i) / 23 + phase)
        frames[i] = (frame + torch.rand(height, width, 3, generator=g) * 16).clamp(0, 255).to(torch.uint8)
        top = (height - box_h) // 2 + (i % 9) - 4
        left = (width - box_w) // 3 + 2 * i % (width - box_w - (width - box_w) // 3)
        masks[i, top : top + box_h, left : left + box_w] = True
    return frames, masks


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="432x240", help="WxH, e.g. 432x240 or 1280x720")
    parser.add_argument("--frames", type=int, default=6)
    parser.add_argument("--device", default=None, help="cpu / cuda / mps (default: best available)")
    parser.add_argument("--weights", default=None, help="folder with the three official .pth files")
    parser.add_argument("--raft-iter", type=int, default=ProPainterSettings.raft_iter)
    parser.add_argument("--subvideo-length", type=int, default=ProPainterSettings.subvideo_length)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)

    height, width = _parse_size(args.size)
    runtime = StandaloneRuntime(device=args.device) if args.device else StandaloneRuntime()
    settings = ProPainterSettings(raft_iter=args.raft_iter, subvideo_length=args.subvideo_length)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.weights
        if folder is None:
            from diffueraser_core.random_weights.propainter import save_propainter_weights

            folder = save_propainter_weights(os.path.join(tmp, "propainter"), seed=0)
            folder = os.path.dirname(next(iter(folder.values())))
        nets = load_propainter_nets(folder, runtime)
        frames, masks = synthetic_clip(args.frames, height, width)
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if runtime.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = run_propainter_prior(frames, masks, nets, settings, runtime)
        if runtime.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    work_h, work_w = working_size(height, width, settings)
    report = {
        "stage": "propainter_prior",
        "size": f"{width}x{height}",
        "working_size": f"{work_w}x{work_h}",
        "frames": args.frames,
        "device": str(runtime.device),
        "dtype": str(settings.compute_dtype or runtime.dtype),
        "torch_threads": torch.get_num_threads(),
        "raft_iter": settings.raft_iter,
        "subvideo_length": settings.subvideo_length,
        "weights": "given" if args.weights else "random (official layout)",
        "seconds": round(seconds, 3),
        "seconds_per_frame": round(seconds / args.frames, 3),
        "peak_cpu_rss_mib": round(rss_after / 2**20, 1),
        "peak_cpu_rss_before_run_mib": round(rss_before / 2**20, 1),
        "peak_device_mib": (
            round(torch.cuda.max_memory_allocated() / 2**20, 1) if runtime.device.type == "cuda" else None
        ),
        "output_shape": list(result.frames.shape),
    }
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
