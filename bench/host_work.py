"""Host CPU-seconds per frame of the pipeline's per-frame host work at full resolution (default 1280x720).

    python bench/host_work.py --resolution 1280x720 --frames 16

Measured with ``time.process_time`` (CPU-seconds of this process, all threads) on one chunk of synthetic frames:
the composite (blend: mask resizes and morphology, feather, bicubic resize, composite), the BrushNet conditioning's
resize and mask preparation, and the prior's resize and mask dilation. The device path runs the same functions
with the chunk on the simulated GPU (diffueraser_core/device_sim.py) or ``--device``: what stays on the host is
moving uint8/bool chunks plus, when simulated, the simulator's own Python dispatch, so those figures are an upper
bound of the host cost on a real GPU (bench/gpu_suite.sh measures it there). The prior's resizes stay on the
host.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402

from diffueraser_core.blend import DEFAULT_FEATHER, blend_video  # noqa: E402
from diffueraser_core.demo import synthetic_clip  # noqa: E402
from diffueraser_core.masks import dilate_cross, prepare_diffueraser_masks, resize_masks_nearest  # noqa: E402
from diffueraser_core.prior_propainter import ProPainterSettings  # noqa: E402
from diffueraser_core.prior_propainter import working_size as prior_working_size  # noqa: E402
from diffueraser_core.temporal_sampling import masked_frames  # noqa: E402
from diffueraser_core.video import DEFAULT_MAX_SIDE, resize_frames, working_size  # noqa: E402


def cpu_seconds(fn, repeat: int = 1) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolution", default="1280x720")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--device", default=None, help="a real device for the blend (e.g. cuda); default: simulated")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.resolution.lower().split("x"))
    n = args.frames
    frames, masks = synthetic_clip(n, (height, width))
    work = working_size(height, width, DEFAULT_MAX_SIDE)
    prior_size = prior_working_size(height, width, ProPainterSettings())
    generated = resize_frames(frames, work)
    out = torch.empty_like(frames)

    def conditioning(device=None):
        part = resize_frames(frames if device is None else frames.to(device), work)
        holes = prepare_diffueraser_masks(resize_masks_nearest(masks if device is None else masks.to(device), work), 8)
        masked_frames(part, holes)

    def prior():
        resize_frames(frames, prior_size)
        dilate_cross(resize_masks_nearest(masks, prior_size), 8)

    def blend_host():
        blend_video(frames, generated, masks, mask_dilation=8, feather=DEFAULT_FEATHER, out=out)

    if args.device:
        device = torch.device(args.device)

        def blend_device():
            blend_video(frames, generated, masks, mask_dilation=8, feather=DEFAULT_FEATHER, out=out, device=device)
            if device.type == "cuda":
                torch.cuda.synchronize()

        def conditioning_device():
            conditioning(device)
            if device.type == "cuda":
                torch.cuda.synchronize()

        blend_device()  # warm-up (kernels, allocator)
        conditioning_device()
        after_label = f"blend on {device}"
        cond_label = f"conditioning on {device}"
    else:
        from diffueraser_core.device_sim import DeviceSimulator

        def blend_device():
            with DeviceSimulator():
                blend_video(frames, generated, masks, mask_dilation=8, feather=DEFAULT_FEATHER, out=out,
                            device=torch.device("meta"))

        def conditioning_device():
            with DeviceSimulator():
                conditioning(torch.device("meta"))

        after_label = "blend on the simulated device (upper bound)"
        cond_label = "conditioning on the simulated device (upper bound)"
    per_frame = {
        "blend on the host": cpu_seconds(blend_host, 2) / n,
        "conditioning resize + mask preparation": cpu_seconds(conditioning, 2) / n,
        "prior resize + mask dilation": cpu_seconds(prior, 2) / n,
        after_label: cpu_seconds(blend_device, 2) / n,
        cond_label: cpu_seconds(conditioning_device, 2) / n,
    }
    prior_part = per_frame["prior resize + mask dilation"]
    result = {
        "resolution": f"{width}x{height}", "frames": n, "threads": torch.get_num_threads(),
        "cpu_s_per_frame": per_frame,
        "host_cpu_s_per_frame_before": (per_frame["blend on the host"] + prior_part
                                        + per_frame["conditioning resize + mask preparation"]),
        "host_cpu_s_per_frame_after": per_frame[after_label] + per_frame[cond_label] + prior_part,
    }
    for name, value in per_frame.items():
        print(f"{name:<48}{value * 1000:>9.1f} ms CPU / frame", file=sys.stderr)
    before = result["host_cpu_s_per_frame_before"]
    print(f"{'host work per frame, before':<48}{before * 1000:>9.1f} ms", file=sys.stderr)
    print(f"{'host work per frame, after (device path)':<48}"
          f"{result['host_cpu_s_per_frame_after'] * 1000:>9.1f} ms", file=sys.stderr)
    line = json.dumps(result)
    print(line)
    if args.json:
        with open(args.json, "a", encoding="utf-8") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
