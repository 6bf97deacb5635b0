#!/usr/bin/env bash
# Every GPU measurement issues 6 and 12 ask for, in phases that each fit one 10-minute device call.
#
#   bash bench/gpu_suite.sh setup        # wheels, full-size random weights, GPU-only tests (deform conv parity)
#   bash bench/gpu_suite.sh targets      # 640x360 and 1280x720 x 250 frames, end to end, default dtype
#   bash bench/gpu_suite.sh flat         # 640x360 x 50 / 250 / 1000 frames: time per frame must stay flat
#   bash bench/gpu_suite.sh techniques   # one switch at a time at 640x360 x 100 frames, against the plain run
#   bash bench/gpu_suite.sh budget       # 1280x720 x 250 inside a 10 GB and an 8 GB card (hard allocator cap)
#   bash bench/gpu_suite.sh calibrate    # issue 12: 1280x720 x 250 measured and simulated (peak per stage, time),
#                                        # host CPU-s per frame with the blend on the GPU, the attention / half-
#                                        # precision / simulation tests; writes the numbers into bench/README.md
#
# Results are appended to $OUT/gpu_<phase>.json (or bench/results/gpu_<phase>.local.json without $OUT) and the
# log goes to the same folder. A machine without diffusers/PyAV gets them from wheels carried in .whl/ (see
# bench/README.md, "GPU runs"). Each phase runs `setup` first when its marker is missing, so phases can be
# called on a fresh machine in any order.
set -uo pipefail
cd "$(dirname "$0")/.."
phase="${1:-targets}"
out="${OUT:-bench/results}"
mkdir -p "$out"
json() { echo "$out/gpu_$1$([ -n "${OUT:-}" ] || echo .local).json"; }
log="$out/gpu_${phase}.log"
exec > >(tee -a "$log") 2>&1
export PYTHONUNBUFFERED=1

setup() {
  if [ -d .whl ] && ! python3 -c "import diffusers, av" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  fi
  [ -d /tmp/site ] && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  python3 -c "import diffusers, av, torch; print('torch', torch.__version__, 'diffusers', diffusers.__version__, torch.cuda.get_device_name())" || exit 1
  if [ ! -f bench/.cache/models-full/.complete ]; then
    t0=$(date +%s)
    python3 -c "import sys; sys.argv=['x']; sys.path.insert(0,'.'); from bench.run import ensure_models; ensure_models('full', 'bench/.cache')" || exit 1
    echo "full-size random weights written in $(( $(date +%s) - t0 )) s"
  fi
}

bench() { python3 bench/run.py --size full --device cuda --machine "${MACHINE:-$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)}" "$@"; }

setup
case "$phase" in
  setup)
    python3 -m pytest -q -m gpu tests/test_deform_conv.py -p no:cacheprovider
    ;;
  targets)
    bench --resolution 640x360 --frames 250 --json "$(json targets)"
    bench --resolution 1280x720 --frames 250 --json "$(json targets)"
    ;;
  flat)
    for n in 50 250 1000; do bench --resolution 640x360 --frames "$n" --json "$(json flat)"; done
    ;;
  techniques)
    common=(--resolution 640x360 --frames 100 --json "$(json techniques)")
    bench "${common[@]}"                                   # plain (bf16 where supported)
    bench "${common[@]}" --dtype float16
    bench "${common[@]}" --channels-last
    bench "${common[@]}" --cudnn-benchmark
    bench "${common[@]}" --windows-per-batch 2
    bench "${common[@]}" --windows-per-batch 4
    bench "${common[@]}" --compile unet brushnet
    ;;
  budget)
    bench --resolution 1280x720 --frames 250 --vram-budget-gb 10 --json "$(json budget)"
    bench --resolution 1280x720 --frames 250 --vram-budget-gb 8 --json "$(json budget)"
    ;;
  calibrate)
    python3 -m pytest -q -p no:cacheprovider tests/test_attention_choice.py tests/test_half_precision.py
    python3 bench/host_work.py --resolution 1280x720 --device cuda --json "$out/host_gpu.json"
    bench --resolution 1280x720 --frames 250 --json "$out/gpu_calibrate.json"
    # the simulation of the same clip does not depend on the machine: bench/results/sim_h100_1280x720x250.json
    # (python3 bench/simulate_gpu.py --frames 250, minutes of CPU) unless $out/sim_calibrate.json exists
    python3 bench/gpu_readme.py "$out"
    ;;
  *)
    echo "gpu_suite: unknown phase $phase (setup, targets, flat, techniques, budget, calibrate)"; exit 2
    ;;
esac
