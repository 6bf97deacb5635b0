"""What a GPU run would do, computed on any CPU: the whole removal with full-size networks on the simulated device
(diffueraser_core/device_sim.py). Prints per stage the peak device memory (allocated, as
torch.cuda.max_memory_allocated), FLOPs, kernel launches and host<->device traffic, the predicted time on an H100,
and the diffusion FLOPs split into a fixed part per clip and a part per frame.

    python bench/simulate_gpu.py                                  # 1280x720 x 250 frames, fp16
    python bench/simulate_gpu.py --frames 46 --budget-gb 10       # inside a 10 GiB card
    python bench/simulate_gpu.py --split 50 250 1000              # fixed vs per-frame diffusion FLOPs
    python bench/simulate_gpu.py --frames 46 --write-baseline tests/device_sim_baseline.json

Predicted time = FLOPs / (peak dense fp16/bf16 throughput x utilisation); the defaults are an H100 SXM's 989
TFLOP/s dense and 40% utilisation (``--peak-tflops``, ``--utilisation``). It leaves out host work, transfers and
launch overhead (the op counts are there to watch the last).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402

from diffueraser_core.device_sim import GIB  # noqa: E402
from diffueraser_core.device_sim_runs import fixed_and_per_frame, simulate_removal  # noqa: E402

#: H100 SXM dense fp16/bf16 tensor-core peak (no sparsity), TFLOP/s
H100_DENSE_TFLOPS = 989.0
DEFAULT_UTILISATION = 0.4


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolution", default="1280x720")
    parser.add_argument("--frames", type=int, default=250)
    parser.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    parser.add_argument("--budget-gb", type=float, default=None, help="device budget in GiB (default: an 80 GB card)")
    parser.add_argument("--peak-tflops", type=float, default=H100_DENSE_TFLOPS)
    parser.add_argument("--utilisation", type=float, default=DEFAULT_UTILISATION)
    parser.add_argument("--split", type=int, nargs="*", default=None,
                        help="clip lengths for the fixed vs per-frame diffusion FLOPs (e.g. 50 250 1000)")
    parser.add_argument("--no-removal", action="store_true", help="only the --split part")
    parser.add_argument("--json", default=None, help="append the result as one JSON line to this file")
    parser.add_argument("--write-baseline", default=None, help="write FLOPs/ops per stage for tests")
    return parser.parse_args(argv)


def print_report(report: dict, peak_tflops: float, utilisation: float, stream=sys.stderr) -> None:
    total = report["total_flops"]
    print(f"{report['resolution']} x {report['frames']} frames, {report['dtype']}, working size "
          f"{report['working_size']}, budget {report['budget_gib'] or 'none'} GiB", file=stream)
    print(f"{'stage':<14}{'peak GiB':>10}{'TFLOP':>12}{'share':>8}{'ops':>10}{'to dev GiB':>12}{'to host GiB':>12}",
          file=stream)
    for name, s in report["stages"].items():
        share = s["flops"] / total if total else 0.0
        print(f"{name:<14}{s['peak_gib']:>10.2f}{s['flops'] / 1e12:>12.1f}{share:>8.1%}{s['ops']:>10}"
              f"{s['to_device_gib']:>12.2f}{s['to_host_gib']:>12.2f}", file=stream)
    seconds = total / (peak_tflops * 1e12 * utilisation)
    print(f"peak {report['peak_gib']:.2f} GiB allocated; {total / 1e15:.2f} PFLOP; predicted "
          f"{seconds:.1f} s at {utilisation:.0%} of {peak_tflops:g} TFLOP/s", file=stream)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    width, height = (int(v) for v in args.resolution.lower().split("x"))
    dtype = getattr(torch, args.dtype)
    result = {"peak_tflops": args.peak_tflops, "utilisation": args.utilisation}
    if not args.no_removal:
        t0, c0 = time.perf_counter(), time.process_time()
        budget = None if args.budget_gb is None else int(args.budget_gb * GIB)
        report = simulate_removal(width, height, args.frames, budget=budget, dtype=dtype).as_dict()
        report["simulation_wall_s"] = round(time.perf_counter() - t0, 1)
        report["simulation_cpu_s"] = round(time.process_time() - c0, 1)
        report["predicted_s"] = report["total_flops"] / (args.peak_tflops * 1e12 * args.utilisation)
        print_report(report, args.peak_tflops, args.utilisation)
        result["removal"] = report
        if args.write_baseline:
            baseline = {"resolution": report["resolution"], "frames": report["frames"], "dtype": report["dtype"],
                        "stages": {k: {"flops": v["flops"], "ops": v["ops"]} for k, v in report["stages"].items()}}
            with open(args.write_baseline, "w", encoding="utf-8") as f:
                json.dump(baseline, f, indent=1, sort_keys=True)
                f.write("\n")
    if args.split:
        from diffueraser_core.video import DEFAULT_MAX_SIDE, working_size

        hw = working_size(height, width, DEFAULT_MAX_SIDE)
        split = fixed_and_per_frame(args.split, hw, dtype)
        result["diffusion_split"] = split
        print("diffusion (pre-inference + sampling, with pre-inference's VAE passes):", file=sys.stderr)
        for n, per in split["per_frame_flops_at"].items():
            print(f"  {n:>5} frames: {split['total_flops'][n] / 1e15:.2f} PFLOP, {per / 1e12:.1f} TFLOP/frame",
                  file=sys.stderr)
        for row in split["splits"]:
            print(f"  {row['from']}->{row['to']} frames: fixed {row['fixed_flops'] / 1e12:.0f} TFLOP + "
                  f"{row['per_frame_flops'] / 1e12:.2f} TFLOP/frame", file=sys.stderr)
        per = [row["per_frame_flops"] for row in split["splits"]]
        if len(per) > 1:
            spread = max(per) / min(per) - 1
            split["per_frame_spread"] = spread
            print(f"  per-frame part flat within {spread:.1%} (target 15%)", file=sys.stderr)
    line = json.dumps(result, default=str)
    print(line)
    if args.json:
        with open(args.json, "a", encoding="utf-8") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
