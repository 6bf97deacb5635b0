"""Write the issue-12 GPU measurements into bench/README.md (between the gpu12 markers), next to the simulation.

    python bench/gpu_readme.py OUT_DIR    # OUT_DIR/gpu_calibrate.json, host_gpu.json, sim_calibrate.json (else the
                                          # committed bench/results/sim_h100_1280x720x250.json)

Compares the measured CUDA max allocated per stage (bench/run.py) with the simulated peak per stage
(bench/simulate_gpu.py) for the same clip, so the simulation can be calibrated, and records the measured time
against the predicted one and the host CPU-seconds per frame with the blend on the GPU.
"""

from __future__ import annotations

import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "bench", "README.md")
BEGIN, END = "<!-- gpu12:begin -->", "<!-- gpu12:end -->"


def _last_json(path):
    if not os.path.isfile(path):
        return None
    lines = [line for line in open(path, encoding="utf-8").read().splitlines() if line.strip().startswith("{")]
    return json.loads(lines[-1]) if lines else None


def render(out_dir: str) -> str:
    measured = _last_json(os.path.join(out_dir, "gpu_calibrate.json"))
    simulated = (_last_json(os.path.join(out_dir, "sim_calibrate.json"))
                 or json.load(open(os.path.join(REPO, "bench", "results", "sim_h100_1280x720x250.json"))))
    host = _last_json(os.path.join(out_dir, "host_gpu.json"))
    lines = [BEGIN, "### GPU measured against the simulation (`bash bench/gpu_suite.sh calibrate`)", ""]
    if measured and simulated:
        sim = simulated["removal"]
        lines.append(f"{measured['resolution']} x {measured['frames']} frames, {measured['device']}, "
                     f"{measured['dtype']}: {measured['total_seconds']:.1f} s measured, "
                     f"{sim['predicted_s']:.1f} s predicted at {simulated['utilisation']:.0%} of "
                     f"{simulated['peak_tflops']:g} TFLOP/s ({sim['total_flops'] / 1e15:.2f} PFLOP).")
        lines += ["", "| stage | measured max allocated GiB | simulated peak GiB | measured / simulated | seconds |",
                  "|---|---|---|---|---|"]
        stage_peaks = measured.get("stage_cuda_max_allocated_gib", {})
        for stage, s in sim["stages"].items():
            got = stage_peaks.get(stage)
            ratio = f"{got / s['peak_gib']:.2f}" if got and s["peak_gib"] else "-"
            secs = measured.get("stage_seconds", {}).get(stage)
            lines.append(f"| {stage} | {got if got is not None else '-'} | {s['peak_gib']:.2f} | {ratio} | "
                         f"{secs if secs is not None else '-'} |")
        lines.append(f"| all | {measured.get('cuda_max_allocated_gib')} | {sim['peak_gib']:.2f} | "
                     f"{measured.get('cuda_max_allocated_gib', 0) / sim['peak_gib']:.2f} | "
                     f"{measured['total_seconds']} |")
    else:
        lines.append("Not measured yet (no GPU lent).")
    if host:
        lines += ["", f"Host work per frame ({host['resolution']}, blend on the GPU): "
                      f"{host['host_cpu_s_per_frame_before'] * 1000:.0f} ms CPU before, "
                      f"{host['host_cpu_s_per_frame_after'] * 1000:.0f} ms after."]
    lines.append(END)
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out_dir = argv[0] if argv else os.path.join(REPO, "bench", "results")
    text = open(README, encoding="utf-8").read()
    block = render(out_dir)
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    with open(README, "w", encoding="utf-8") as f:
        f.write(text)
    print(block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
