"""Benchmark runner: time per stage and peak memory of the full removal pipeline, as users run it.

    python bench/run.py --size tiny --resolution 64x64 --frames 50 --json bench/results/cpu-tiny-50.json
    python bench/run.py --size full --resolution 1280x720 --frames 250 --device cuda      (GPU machine)
    python bench/run.py ... --check bench/results/baseline.json --tolerance 0.25          (regression check)

Models are random weights in the official layouts (``make_models_folder``), cached under bench/.cache/. The clip
is synthetic (a moving square over a texture). Stages are timed from the pipeline's own progress events (prior,
encode, pre-inference, sampling, decode, blend); memory is CUDA max allocated / reserved per stage and for the
run, and the process peak RSS. Output: JSON plus a table on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from typing import Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402

from diffueraser_core.runtime import StandaloneRuntime  # noqa: E402

GIB = 1024 ** 3


def peak_rss_bytes() -> int:
    # ru_maxrss is KiB on Linux, bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def anon_rss_bytes() -> Optional[int]:
    """Private (anonymous) resident memory now, Linux only. Unlike the peak RSS it leaves out file pages mapped
    while reading weights (reclaimable page cache), so it is what the host-RAM target is about."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class TimingRuntime(StandaloneRuntime):
    """Records when each stage reports progress; a stage lasts from the previous stage's last event to its own."""

    def __post_init__(self):
        super().__post_init__()
        self.events: List[tuple] = []
        self.stage_peaks: Dict[str, Dict[str, int]] = {}
        self.t0 = time.perf_counter()
        self._current: Optional[str] = None
        self.work_stage: Optional[str] = None
        self.peak_anon = anon_rss_bytes() or 0

    def progress(self, stage, done, total, preview=None, preview_latent=None):
        now = time.perf_counter()
        self.peak_anon = max(self.peak_anon, anon_rss_bytes() or 0)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            peaks = self.stage_peaks.setdefault(stage, {"cuda_max_allocated": 0, "cuda_max_reserved": 0})
            peaks["cuda_max_allocated"] = max(peaks["cuda_max_allocated"], torch.cuda.max_memory_allocated())
            peaks["cuda_max_reserved"] = max(peaks["cuda_max_reserved"], torch.cuda.max_memory_reserved())
            if stage != self._current:
                torch.cuda.reset_peak_memory_stats()
        self._current = stage
        if stage != "encode":
            self.work_stage = stage
        self.events.append((stage, done, total, now))
        super().progress(stage, done, total, preview, preview_latent)

    def mark(self, stage: str) -> None:
        """Close the running span and book it to ``stage`` (for work that reports no progress of its own)."""
        self.events.append((stage, 0, 0, time.perf_counter()))

    def stage_seconds(self) -> Dict[str, float]:
        seconds: Dict[str, float] = {}
        last = self.t0
        for stage, _, _, when in self.events:
            seconds[stage] = seconds.get(stage, 0.0) + (when - last)
            last = when
        return seconds


def time_vae_encodes(codec, runtime: TimingRuntime) -> None:
    """Book every VAE encode to the "encode" stage. Encodes happen inside other stages (the prior hands its
    frames to the encoder as they are finished; the BrushNet conditioning is encoded before sampling), so
    progress events alone would book them to whichever stage reports next."""
    encode = codec.encode

    def timed(frames):
        if runtime.device.type == "cuda":
            torch.cuda.synchronize()
        # the span so far belongs to the stage that is running (encode progress events do not start one)
        runtime.mark(runtime.work_stage or "prior")
        out = encode(frames)
        if runtime.device.type == "cuda":
            torch.cuda.synchronize()
        runtime.mark("encode")
        return out

    codec.encode = timed


def parse_resolution(text: str):
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"bench: --resolution must look like 1280x720, got {text!r}") from None
    return w, h


def ensure_models(size: str, cache: str) -> str:
    from diffueraser_core.random_weights import make_models_folder

    folder = os.path.join(cache, f"models-{size}")
    marker = os.path.join(folder, ".complete")
    if not os.path.isfile(marker):
        print(f"bench: writing {size} random weights to {folder}", file=sys.stderr)
        make_models_folder(folder, size=size, dtype=torch.float16 if size == "full" else torch.float32)
        open(marker, "w").close()
    return folder


#: --compile names -> the runtime handle names of those networks
COMPILE_NAMES = {"unet": "diffueraser_unet_main", "brushnet": "diffueraser_brushnet", "vae": "sd15_vae"}


def apply_techniques(args, runtime) -> None:
    """The speed/memory switches measured one by one (README: technique study)."""
    if args.vram_budget_gb is not None:
        budget = int(args.vram_budget_gb * GIB)
        runtime.vram_budget = budget
        if runtime.device.type == "cuda":
            # a hard cap as well, so a run that does not fit fails here as it would on the smaller card
            total = torch.cuda.get_device_properties(runtime.device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total), runtime.device)
    if args.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    runtime.channels_last = bool(args.channels_last)
    runtime.compile_networks = tuple(COMPILE_NAMES[n] for n in (args.compile or ()))


def techniques_of(args) -> dict:
    return {
        "windows_per_batch": args.windows_per_batch,
        "channels_last": bool(args.channels_last),
        "compile": list(args.compile or ()),
        "cudnn_benchmark": bool(args.cudnn_benchmark),
        "vram_budget_gb": args.vram_budget_gb,
    }


def run_once(args) -> dict:
    from diffueraser_core import cli
    from diffueraser_core.demo import synthetic_clip
    from diffueraser_core.pipeline import SamplerSettings, remove_objects
    from diffueraser_core.prior_injection import InjectionSettings

    width, height = parse_resolution(args.resolution)
    device = torch.device(args.device) if args.device else None
    runtime = TimingRuntime(device=device) if device else TimingRuntime()
    if args.dtype:
        runtime.dtype = getattr(torch, args.dtype)
    apply_techniques(args, runtime)
    models_dir = args.models or ensure_models(args.size, args.cache)

    frames, masks = synthetic_clip(args.frames, (height, width))
    video_bytes = frames.numel()
    load_t0 = time.perf_counter()
    found = cli._check_models(models_dir, args.prior_only, None)
    namespace = argparse.Namespace(prompt="", lora=None, lora_strength=1.0, tokenizer=None)
    propainter = cli._load_propainter(found, runtime)
    models = codec = text = None
    if not args.prior_only:
        models, codec, text = cli._load_diffusion(found, models_dir, namespace, runtime)
    load_seconds = time.perf_counter() - load_t0

    sampler = SamplerSettings(steps=args.steps, pre_inference=not args.no_pre_inference,
                              windows_per_batch=args.windows_per_batch)
    if codec is not None:
        time_vae_encodes(codec, runtime)
    injection = InjectionSettings(seed=0, window_length=sampler.window_length, inversion_steps=sampler.steps)
    if runtime.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    runtime.t0 = time.perf_counter()
    out = remove_objects(
        frames, masks, propainter_nets=propainter, runtime=runtime, models=models, codec=codec,
        text_embeddings=text, sampler_settings=sampler, injection_settings=injection, prior_only=args.prior_only,
        output=frames,  # as the CLI does: blend into the input buffer
    )
    if runtime.device.type == "cuda":
        torch.cuda.synchronize()
    total = time.perf_counter() - runtime.t0
    assert out.shape == (args.frames, height, width, 3), out.shape

    result = {
        "machine": args.machine or f"{platform.node()} {platform.processor() or platform.machine()}",
        "device": str(runtime.device) + (f" ({torch.cuda.get_device_name()})" if runtime.device.type == "cuda" else ""),
        "dtype": str(runtime.dtype).replace("torch.", ""),
        "size": args.size,
        "resolution": f"{width}x{height}",
        "frames": args.frames,
        "steps": args.steps,
        "prior_only": args.prior_only,
        "pre_inference": not args.no_pre_inference,
        "load_seconds": round(load_seconds, 3),
        "total_seconds": round(total, 3),
        "seconds_per_frame": round(total / args.frames, 5),
        "stage_seconds": {k: round(v, 3) for k, v in runtime.stage_seconds().items()},
        "peak_rss_gib": round(peak_rss_bytes() / GIB, 3),
        "peak_anon_rss_gib": round(runtime.peak_anon / GIB, 3),
        "input_video_gib": round(video_bytes / GIB, 4),
        # target: host RAM at most the input video (uint8) plus 3 GB
        "host_ram_target_gib": round(video_bytes / GIB + 3 * 1e9 / GIB, 3),
        "techniques": techniques_of(args),
        "torch": torch.__version__,
    }
    if runtime.device.type == "cuda":
        result["cuda_max_allocated_gib"] = round(max(
            [p["cuda_max_allocated"] for p in runtime.stage_peaks.values()] + [torch.cuda.max_memory_allocated()]) / GIB, 3)
        result["cuda_max_reserved_gib"] = round(max(
            [p["cuda_max_reserved"] for p in runtime.stage_peaks.values()] + [torch.cuda.max_memory_reserved()]) / GIB, 3)
        result["stage_cuda_max_allocated_gib"] = {
            k: round(v["cuda_max_allocated"] / GIB, 3) for k, v in runtime.stage_peaks.items()}
    return result


def format_table(results: List[dict]) -> str:
    stages = ["prior", "encode", "pre-inference", "sampling", "decode", "blend"]
    head = ["resolution", "frames", "device", "total s", "s/frame"] + [f"{s} s" for s in stages] + ["RSS GiB", "VRAM GiB"]
    rows = [head]
    for r in results:
        rows.append([r["resolution"], str(r["frames"]), r["device"], f"{r['total_seconds']:.2f}",
                     f"{r['seconds_per_frame']:.4f}"]
                    + [f"{r['stage_seconds'].get(s, 0.0):.2f}" for s in stages]
                    + [f"{r['peak_rss_gib']:.2f}", f"{r.get('cuda_max_allocated_gib', float('nan')):.2f}"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def check_against(result: dict, baseline_path: str, tolerance: float) -> List[str]:
    """Regressions: time per frame or peak memory above the baseline by more than ``tolerance`` (a fraction)."""
    with open(baseline_path, encoding="utf-8") as f:
        baseline = json.load(f)
    if isinstance(baseline, list):
        matches = [b for b in baseline if b.get("resolution") == result["resolution"]
                   and b.get("frames") == result["frames"] and b.get("size") == result["size"]]
        if not matches:
            return [f"no baseline entry for {result['resolution']} x {result['frames']} ({result['size']})"]
        baseline = matches[0]
    problems = []
    for key in ("seconds_per_frame", "peak_rss_gib", "cuda_max_allocated_gib"):
        if key in baseline and key in result and result[key] > baseline[key] * (1 + tolerance):
            problems.append(f"{key}: {result[key]} > baseline {baseline[key]} (+{tolerance:.0%})")
    return problems


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=("tiny", "full"), default="tiny", help="random weights: tiny configs or official sizes")
    p.add_argument("--resolution", default="64x64", help="WxH of the synthetic clip")
    p.add_argument("--frames", type=int, default=50)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--device", default=None, help="cpu, cuda, mps (default: best available)")
    p.add_argument("--dtype", default=None, choices=(None, "float32", "float16", "bfloat16"))
    p.add_argument("--models", default=None, help="use this models folder instead of generated random weights")
    p.add_argument("--cache", default=os.path.join(REPO, "bench", ".cache"))
    p.add_argument("--prior-only", action="store_true")
    p.add_argument("--no-pre-inference", action="store_true")
    p.add_argument("--machine", default=None, help="machine name recorded in the JSON")
    p.add_argument("--windows-per-batch", type=int, default=1, help="sampling windows per forward (technique)")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format (technique)")
    p.add_argument("--compile", nargs="*", default=None, metavar="NETWORK", choices=sorted(COMPILE_NAMES),
                   help="torch.compile these networks (unet, brushnet, vae; none named: unet and brushnet)")
    p.add_argument("--cudnn-benchmark", action="store_true", help="cudnn autotuning (technique)")
    p.add_argument("--vram-budget-gb", type=float, default=None,
                   help="behave like a card of this many GB (offload policy plus a hard allocator cap)")
    p.add_argument("--json", default=None, help="write the result here (appends to a list if the file exists)")
    p.add_argument("--check", default=None, help="baseline JSON to compare against")
    p.add_argument("--tolerance", type=float, default=0.25)
    args = p.parse_args(argv)
    if args.compile is not None and not args.compile:
        args.compile = ["unet", "brushnet"]

    result = run_once(args)
    print(json.dumps(result, indent=1))
    print(format_table([result]), file=sys.stderr)
    if args.json:
        existing = []
        if os.path.isfile(args.json):
            with open(args.json, encoding="utf-8") as f:
                existing = json.load(f)
            existing = existing if isinstance(existing, list) else [existing]
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(existing + [result], f, indent=1)
    if args.check:
        problems = check_against(result, args.check, args.tolerance)
        for line in problems:
            print(f"REGRESSION {line}", file=sys.stderr)
        return 1 if problems else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
