"""Host RAM of the removal's data path at full resolution, on any machine (no GPU needed).

    python bench/host_memory.py --resolution 1280x720 --frames 250 --frames 500 --json bench/results/host_memory_cpu.json

What it measures: the whole-video buffers the pipeline keeps on the host (input frames, masks, the ProPainter
prior's working-size frames/flows/propagated frames, latents, conditioning, the output) while ``remove_objects``
runs, at the resolution and length users run. What it does not: speed, or the networks' own memory. The
diffusion networks are the tiny test configs and the three ProPainter networks are cheap stand-ins with the
official call signatures (real image propagation, flows from colour differences), so a 720p x 500-frame run
finishes on a laptop CPU; every buffer, chunk and stage around them is the production code.

Reported per run: private (anonymous) RSS before the run (process, networks and the input clip), its peak during
the run (sampled every few milliseconds), the difference, and that difference per frame and per input-video byte.
The host-RAM target of the speed issue is "peak at most the input video as uint8 plus 3 GB".
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import anon_rss_bytes  # noqa: E402  (bench/run.py)

GB = 1e9


def anon_rss() -> int:
    value = anon_rss_bytes()
    if value is None:
        raise RuntimeError("host_memory: /proc/self/status has no RssAnon (Linux only)")
    return value


class PeakSampler:
    """Samples private RSS on a thread; peaks of the chunked stages last far longer than the interval."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.peak = anon_rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, anon_rss())
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, anon_rss())


class StandInRaft(torch.nn.Module):
    """RAFT's call: (image1, image2, iters, test_mode) -> (low-res flow, flow)."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(0.5))

    def forward(self, image1, image2, iters=20, flow_init=None, test_mode=True):
        flow = (image2 - image1)[:, :2] * self.scale
        return flow[..., ::8, ::8], flow


class StandInFlowCompletion(torch.nn.Module):
    def __init__(self):
        super().__init__()
        from diffueraser_core.models.flow_completion import RecurrentFlowCompleteNet

        self.combine = RecurrentFlowCompleteNet.combine_flow
        self.gain = torch.nn.Parameter(torch.tensor(0.5))

    def combine_flow(self, *args):
        return self.combine(*args)

    def forward_bidirect_flow(self, flows_bi, masks):
        return [flows_bi[0] * self.gain, flows_bi[1] * self.gain], [None, None]


class StandInGenerator(torch.nn.Module):
    """The real image propagation; a transformer stand-in of the same output shape."""

    def __init__(self):
        super().__init__()
        self.mix = torch.nn.Parameter(torch.tensor(0.25))

    def img_propagation(self, masked_frames, completed_flows, masks, interpolation="nearest"):
        from diffueraser_core.models.propainter import propagate_image

        return propagate_image(masked_frames, completed_flows[0], completed_flows[1], masks, interpolation)

    def forward(self, frames, flows, masks_in, masks_updated, local):
        return torch.tanh(frames[:, :local] * (1 - self.mix) + frames.mean(dim=1, keepdim=True) * self.mix)


def measure(width: int, height: int, frames_count: int, steps: int) -> dict:
    from diffueraser_core.demo import synthetic_clip
    from diffueraser_core.pipeline import DiffuEraserModels, DiffusersVaeCodec, SamplerSettings, remove_objects
    from diffueraser_core.prior_injection import InjectionSettings
    from diffueraser_core.prior_propainter import ProPainterNets
    from diffueraser_core.random_weights.diffusion import build_brushnet, build_unet_main
    from diffueraser_core.random_weights.sd15 import build_vae
    from diffueraser_core.runtime import StandaloneRuntime

    runtime = StandaloneRuntime(device=torch.device("cpu"))
    nets = ProPainterNets(
        raft=runtime.wrap(StandInRaft(), "raft"),
        flow_completion=runtime.wrap(StandInFlowCompletion(), "flow_completion"),
        generator=runtime.wrap(StandInGenerator(), "generator"),
    )
    models = DiffuEraserModels(unet=runtime.wrap(build_unet_main(seed=1), "unet"),
                               brushnet=runtime.wrap(build_brushnet(seed=2), "brushnet"))
    codec = DiffusersVaeCodec(runtime.wrap(build_vae(seed=3), "vae"), runtime)
    text = torch.randn((1, 8, 32), generator=torch.Generator().manual_seed(0))
    frames, masks = synthetic_clip(frames_count, (height, width))
    sampler = SamplerSettings(steps=steps)
    injection = InjectionSettings(seed=0, window_length=sampler.window_length, inversion_steps=steps)
    video_bytes = frames.numel()
    before = anon_rss()
    t0 = time.perf_counter()
    with PeakSampler() as sampler_thread:
        out = remove_objects(frames, masks, propainter_nets=nets, runtime=runtime, models=models, codec=codec,
                             text_embeddings=text, sampler_settings=sampler, injection_settings=injection,
                             output=frames)
    seconds = time.perf_counter() - t0
    assert out.shape == (frames_count, height, width, 3)
    extra = sampler_thread.peak - before
    return {
        "resolution": f"{width}x{height}",
        "frames": frames_count,
        "steps": steps,
        "input_video_gb": round(video_bytes / GB, 3),
        "masks_gb": round(masks.numel() / GB, 3),
        "anon_before_run_gb": round(before / GB, 3),
        "anon_peak_gb": round(sampler_thread.peak / GB, 3),
        "run_extra_gb": round(extra / GB, 3),
        "run_extra_mb_per_frame": round(extra / frames_count / 1e6, 3),
        "run_extra_per_video_byte": round(extra / video_bytes, 3),
        "host_ram_target_gb": round((video_bytes + 3 * GB) / GB, 3),
        "seconds": round(seconds, 1),
        "torch": torch.__version__,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--resolution", default="1280x720")
    p.add_argument("--frames", type=int, action="append", help="repeat for several lengths (default 250)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--json", default=None)
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # the child process of one length
    args = p.parse_args(argv)
    width, height = (int(v) for v in args.resolution.lower().split("x"))
    if args.one:
        print(json.dumps(measure(width, height, args.frames[0], args.steps)), flush=True)
        return 0
    results = []
    for count in args.frames or [250]:
        # one process per length: memory the allocator keeps after a run would blur the next one's numbers
        child = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--one", "--resolution", args.resolution,
             "--frames", str(count), "--steps", str(args.steps)],
            check=True, stdout=subprocess.PIPE, text=True,
        )
        result = json.loads(child.stdout.strip().splitlines()[-1])
        print(json.dumps(result), flush=True)
        results.append(result)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
