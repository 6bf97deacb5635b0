"""Scaling of the Ray executor: one video on 1, 2, ... workers against the single-process run (same result).

    python bench/ray_scaling.py --frames 46 --resolution 96x64 --workers 1 2 --json bench/results/ray_scaling_cpu.json

Each worker count gets a fresh local Ray cluster with ``workers x threads`` CPUs and that many CPU workers of
``--threads`` torch threads; the single-process run uses the same thread count, so every output must equal it bit
for bit (checked). Times per phase come from the progress events: ``prior`` = until the prior latent (and, on Ray,
the conditioning built meanwhile) is done; ``pre-inference`` (the single process builds its conditioning here);
``sampling``; ``decode`` (decode + blend). Worker start-up (Ray, imports, network loading) is reported apart.
Also printed: the bytes that cross between the driver and the workers per denoising step, for this clip and for
250 frames at the 960x536 working size, and the bytes the split prior moves (its real chunk schedule, counted by
``prior_transfer_bytes``). Models: tiny random diffusion networks, full-size ProPainter networks
(cached in bench/.cache/), so on a CPU the prior dominates, as in bench/run.py.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402

from bench.run import ensure_models, parse_resolution  # noqa: E402

PHASES = ("prior", "pre-inference", "sampling", "decode")
PHASE_OF = {"prior": "prior", "encode": "prior", "conditioning": "prior", "pre-inference": "pre-inference",
            "sampling": "sampling", "decode": "decode", "blend": "decode"}


class Timeline:
    def __init__(self):
        self.start = time.perf_counter()
        self.last = {}

    def __call__(self, stage, done, total, preview=None):
        phase = PHASE_OF.get(stage)
        if phase is not None:
            self.last[phase] = time.perf_counter() - self.start

    def phases(self, total: float) -> dict:
        out, previous = {}, 0.0
        for phase in PHASES:
            end = self.last.get(phase, previous)
            out[phase] = round(end - previous, 2)
            previous = end
        out["total"] = round(total, 2)
        return out


def transfer_bytes(num: int, latent_hw, window: int = 22, overlap=None) -> dict:
    """Driver <-> worker bytes of one denoising step (float32 latents): window latents out and back (every frame
    of every window, overlaps included); the conditioning (4 latent channels + 1 bool) goes once per window."""
    from diffueraser_core.windows import window_lists

    frame_latent = 4 * latent_hw[0] * latent_hw[1] * 4
    frame_cond = frame_latent + latent_hw[0] * latent_hw[1]
    list_a, list_b = window_lists(num, window, overlap)
    frames_a = sum(b - a for a, b in list_a)
    frames_b = sum(b - a for a, b in list_b)
    return {
        "frames": num,
        "latent_hw": list(latent_hw),
        "latent_bytes_per_frame": frame_latent,
        "windows_per_step": [len(list_a), len(list_b)],
        "window_frames_per_step": [frames_a, frames_b],
        "bytes_per_step_each_way": [frames_a * frame_latent, frames_b * frame_latent],
        "conditioning_bytes_once": (frames_a + frames_b) * frame_cond,
        "merged_latents_bytes": num * frame_latent,
    }


class _DryRef:
    """A dry-run object reference: the bytes of one task output."""

    def __init__(self, nbytes: int):
        self.nbytes = int(nbytes)


class _DryScheduler:
    """Stands in for ``prior_distributed._Scheduler``: records each task's inputs (object references from other
    tasks, arrays from the driver) and outputs instead of running it, so the real chunk schedule is counted."""

    def __init__(self, size):
        self.h, self.w = size
        self.tasks = {}
        self.bytes = {"driver_to_workers": 0, "worker_to_worker": 0, "workers_to_driver": 0, "outputs": 0}

    @staticmethod
    def _driver_bytes(value) -> int:
        import numpy as np

        if isinstance(value, (torch.Tensor, np.ndarray)):
            return int(value.nbytes)
        if isinstance(value, dict):
            return sum(_DryScheduler._driver_bytes(v) for v in value.values())
        return 0

    def submit(self, method, returns, units, *args):
        hw = self.h * self.w
        self.tasks[method] = self.tasks.get(method, 0) + 1
        self.bytes["worker_to_worker"] += sum(a.nbytes for a in args if isinstance(a, _DryRef))
        self.bytes["driver_to_workers"] += sum(self._driver_bytes(a) for a in args if not isinstance(a, _DryRef))
        meta = args[0] if args and isinstance(args[0], dict) else {}
        if method == "prior_raft":
            count = int(args[0].shape[0]) - 1
            sizes = [(count + 1) * hw * 3, count * 2 * hw * 2, count * 2 * hw * 2]
        elif method == "prior_sample":
            k = int(args[0].shape[0])
            sizes = [k * 3 * hw * 2, k * hw]
            self.bytes["workers_to_driver"] += k * hw  # the sample's masks
        elif method == "prior_complete":
            sizes = [meta["count"] * 2 * hw * 2] * 2
        elif method == "prior_propagate":
            sizes = [meta["count"] * 3 * hw * 2, meta["count"] * hw]
        else:  # prior_transformer: the composite goes back to the driver
            sizes = [len(meta["step"].neighbor_ids) * hw * 3]
            self.bytes["workers_to_driver"] += sizes[0]
        self.bytes["outputs"] += sum(sizes)
        return tuple(_DryRef(n) for n in sizes)


def prior_transfer_bytes(num: int, input_size, size, settings, encode_size=None) -> dict:
    """Bytes moved by the split prior of ``num`` frames of ``input_size`` (H, W) at the prior's working size
    ``size`` (h, w), counted by running the driver's real chunk schedule (``prior_distributed._ClusterPrior``)
    against a recording scheduler: what the driver sends (input-size frames, masks), what tasks read from other
    tasks' outputs (``worker_to_worker``: on one machine shared memory, read in place; a machine pulls each
    output at most once, so ``outputs`` bounds what crosses the network to any one machine) and what comes back
    to the driver (the transformer's composites, the sample's masks, and the input-size composites, or with
    ``encode_size`` (the diffusion run) their VAE latents at that size)."""
    from diffueraser_core.prior_distributed import _ClusterPrior
    from diffueraser_core.prior_propainter import pre_propagation_index, transformer_reach, transformer_steps

    h, w = size
    scheduler = _DryScheduler(size)
    frames = torch.zeros((1, *input_size, 3), dtype=torch.uint8).expand(num, *input_size, 3)  # slices materialise
    work_masks = torch.zeros((num, h, w), dtype=torch.bool)
    index = pre_propagation_index(num, settings)
    sample = None
    if index:
        sample = (index, scheduler.submit("prior_sample", 2, 0, frames[index].numpy(), work_masks[index], size,
                                          settings)[0])
    video = _ClusterPrior(scheduler, frames, work_masks, lambda a, b: work_masks[a:b], sample, size, settings)
    reach = transformer_reach(num, settings)
    for step in transformer_steps(num, settings):
        video.submit_step(step)
        video.drop_read(first_frame=0 if reach is None else step.next_frame - reach, first_pair=step.frame)
    # the input-size composites of the finished frames: one task per flushed range (at most OUTPUT_FLUSH_FRAMES
    # frames; counted here as full ranges): generated frames, input frames and both masks out, composites back
    from diffueraser_core.prior_settings import OUTPUT_FLUSH_FRAMES

    big = input_size[0] * input_size[1]
    back = big * 3 if encode_size is None else 4 * (encode_size[0] // 8) * (encode_size[1] // 8) * 4
    scheduler.tasks["prior_composite" if encode_size is None else "prior_encode"] = -(-num // OUTPUT_FLUSH_FRAMES)
    scheduler.bytes["driver_to_workers"] += num * (h * w * 3 + big * 3 + big + h * w)
    scheduler.bytes["workers_to_driver"] += num * back
    scheduler.bytes["outputs"] += num * back
    out = {"frames": num, "size": [h, w], "tasks": scheduler.tasks}
    out.update({k: v for k, v in scheduler.bytes.items()})
    out["per_frame"] = {k: round(v / num) for k, v in scheduler.bytes.items()}
    return out


class SamplingOnly:
    """The sampling stage alone at a larger working size (``--sampling-size``): random start latents and
    conditioning, ``denoise_windows`` in this process against ``RayRemover.denoise`` on the workers. Shows the
    part of the run that the workers share window by window, with the real latent transfer sizes."""

    def __init__(self, frames: int, latent_hw, steps: int, window):
        from diffueraser_core.prior_injection import VAE_SCALING, tcd_timesteps
        from diffueraser_core.temporal_sampling import Conditioning, pairs_down
        from diffueraser_core.windows import window_lists

        gen = torch.Generator().manual_seed(0)
        self.frames, self.window = frames, window
        self.latent_hw = tuple(latent_hw)
        self.latents = torch.randn((frames, 4, *latent_hw), generator=gen) * VAE_SCALING
        self.cond = Conditioning(torch.randn((frames, 4, *latent_hw), generator=gen) * VAE_SCALING,
                                 torch.rand((frames, *latent_hw), generator=gen) > 0.3)
        self.pairs = pairs_down(tcd_timesteps(steps, 1.0))
        self.windows = len(window_lists(frames, window.window_length, window.window_overlap)[0])
        self.runs = []
        self.reference = None

    def run_single(self, models, text, runtime):
        from diffueraser_core.temporal_sampling import denoise_windows

        started = time.perf_counter()
        self.reference = denoise_windows(self.latents, self.pairs, self.cond, text, None, models, self.window,
                                         runtime)
        self.runs.append({"mode": "single process", "workers": 0,
                          "sampling_s": round(time.perf_counter() - started, 2)})

    def run_ray(self, remover, count):
        started = time.perf_counter()
        out = remover.denoise(self.latents, self.pairs, self.cond, self.window, lambda *a: None)
        self.runs.append({"mode": "ray", "workers": count, "sampling_s": round(time.perf_counter() - started, 2),
                          "bit_identical": bool(torch.equal(out, self.reference))})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=46)
    p.add_argument("--resolution", default="96x64", help="WxH of the synthetic clip")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker (and for the single process)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--raft-iter", type=int, default=1)
    p.add_argument("--subvideo-length", type=int, default=50,
                   help="ProPainter chunk length (run_diffueraser's 50; shorter splits a short clip's prior more)")
    p.add_argument("--cache", default=os.path.join(REPO, "bench", ".cache"))
    p.add_argument("--sampling-frames", type=int, default=40,
                   help="frames of the sampling-only comparison (0: skip it)")
    p.add_argument("--sampling-size", default="480x272", help="WxH working size of the sampling-only comparison")
    p.add_argument("--json", default=None, help="append the result (one JSON object) to this file")
    args = p.parse_args(argv)

    from diffueraser_core import cli, distributed
    from diffueraser_core.demo import synthetic_clip
    from diffueraser_core.model_files import find_model_files
    from diffueraser_core.pipeline import SamplerSettings, remove_objects
    from diffueraser_core.prior_injection import InjectionSettings
    from diffueraser_core.prior_propainter import ProPainterSettings, working_size
    from diffueraser_core.runtime import StandaloneRuntime

    width, height = parse_resolution(args.resolution)
    frames, masks = synthetic_clip(args.frames, (height, width))
    models_dir = ensure_models("tiny", args.cache)
    found = find_model_files(models_dir)
    sampler = SamplerSettings(steps=args.steps, mask_dilation=2)
    injection = InjectionSettings(seed=0, window_length=sampler.window_length, inversion_steps=args.steps)
    prior = ProPainterSettings(resize_ratio=1.0 if min(height, width) < 110 else 0.6, mask_dilation=2,
                               raft_iter=args.raft_iter, subvideo_length=args.subvideo_length, neighbor_length=10,
                               ref_stride=10)
    kwargs = dict(sampler_settings=sampler, injection_settings=injection, propainter_settings=prior)

    torch.set_num_threads(args.threads)
    timeline = Timeline()
    runtime = StandaloneRuntime(device=torch.device("cpu"), progress_callback=timeline)
    nets = cli._load_propainter(found, runtime)
    models, codec, text = cli.load_diffusion_models(found, found.get("pcm_lora"), 1.0, runtime)
    timeline.start = time.perf_counter()
    reference = remove_objects(frames.clone(), masks, propainter_nets=nets, runtime=runtime, models=models,
                               codec=codec, text_embeddings=text, **kwargs)
    runs = [{"mode": "single process", "workers": 0, **timeline.phases(time.perf_counter() - timeline.start)}]
    print(f"single process: {runs[-1]}", file=sys.stderr)
    sampling = None
    if args.sampling_frames:
        sw, sh = parse_resolution(args.sampling_size)
        sampling = SamplingOnly(args.sampling_frames, (sh // 8, sw // 8), args.steps, sampler.window_settings())
        sampling.run_single(models, text, runtime)
    del nets, models, codec, text, runtime

    for count in args.workers:
        ray = distributed.init_cluster(num_cpus=count * args.threads)
        started = time.perf_counter()
        spec = distributed.WorkerSpec(dict(found), lora_path=found.get("pcm_lora"), device="cpu",
                                      threads=args.threads)
        remover = distributed.RayRemover(spec, num_workers=count, cpus_per_worker=args.threads)
        startup = time.perf_counter() - started
        timeline = Timeline()
        out = remover.remove(frames.clone(), masks, progress=timeline, **kwargs)
        total = time.perf_counter() - timeline.start
        runs.append({"mode": "ray", "workers": count, "startup_s": round(startup, 1), **timeline.phases(total),
                     "bit_identical": bool(torch.equal(out, reference))})
        print(f"ray {count} worker(s): {runs[-1]}", file=sys.stderr)
        if sampling is not None:
            sampling.run_ray(remover, count)
        remover.shutdown()
        ray.shutdown()

    result = {
        "bench": "ray_scaling",
        "machine": f"{platform.node()} {os.cpu_count()} CPUs",
        "torch": torch.__version__,
        "frames": args.frames,
        "resolution": f"{width}x{height}",
        "steps": args.steps,
        "threads_per_worker": args.threads,
        "runs": runs,
        "sampling_only": None if sampling is None else {"frames": sampling.frames, "size": args.sampling_size,
                                                        "windows_per_step": sampling.windows, "runs": sampling.runs},
        "transfer_this_clip": transfer_bytes(args.frames, (height // 8, width // 8)),
        "transfer_250_frames_960x536": transfer_bytes(250, (536 // 8, 960 // 8)),
        "prior_transfer_this_clip": prior_transfer_bytes(args.frames, (height, width),
                                                        working_size(height, width, prior), prior),
        # a 1280x720 clip: the prior works at 768x432 (ratio 0.6), with run_diffueraser's chunk settings
        "prior_transfer_250_frames_768x432": prior_transfer_bytes(250, (720, 1280), (432, 768), ProPainterSettings(),
                                                                  encode_size=(536, 960)),
    }
    print("| run | workers | start-up s | prior s | pre-inference s | sampling s | decode s | total s | same result |",
          file=sys.stderr)
    print("|---|---|---|---|---|---|---|---|---|", file=sys.stderr)
    for r in runs:
        print(f"| {r['mode']} | {r['workers']} | {r.get('startup_s', '-')} | {r['prior']} | {r['pre-inference']} | "
              f"{r['sampling']} | {r['decode']} | {r['total']} | {r.get('bit_identical', 'reference')} |",
              file=sys.stderr)
    if sampling is not None:
        print(f"sampling only, {sampling.frames} frames at latent {sampling.latent_hw} ({sampling.windows} windows "
              "per step):",
              file=sys.stderr)
        for r in sampling.runs:
            print(f"  {r}", file=sys.stderr)
    print(json.dumps(result))
    if args.json:
        with open(args.json, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(result) + "\n")
    everything = runs + ([] if sampling is None else sampling.runs)
    return 0 if all(r.get("bit_identical", True) for r in everything) else 1


if __name__ == "__main__":
    sys.exit(main())
