"""The GPU stand-in (diffueraser_core/device_sim.py, device_sim_runs.py): the real stages with full-size
networks on ``meta``.

At 1280x720 with the default settings: no op mixes device and host tensors anywhere in the pipeline (also when a
10 GiB or 8 GiB budget makes the runtime offload networks, and when an 8 GB budget drives the sampler into
its out-of-memory retry); the modelled peak stays under 8.5 GiB; FLOPs per stage equal the stored baseline exactly;
op counts per stage stay within a tolerance. The memory hints the stages give the host are checked against the
simulated peaks. Regenerate the baseline after an intended change with
``python bench/simulate_gpu.py --frames 46 --write-baseline tests/device_sim_baseline.json``.
"""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch

from diffueraser_core import device_sim_runs
from diffueraser_core.device_sim import GIB, DeviceMixingError, DeviceSimulator
from diffueraser_core.device_sim_runs import simulate_removal

BASELINE = os.path.join(os.path.dirname(__file__), "device_sim_baseline.json")
#: 46 frames: pre-inference runs (more than two 22-frame windows) and sampling has three windows per step
CLIP_FRAMES = 46
#: two windows per step, no pre-inference: enough for the offload and out-of-memory paths
SHORT_CLIP_FRAMES = 24
WIDTH, HEIGHT = 1280, 720
PEAK_LIMIT_GIB = 8.5
#: kernel launches per stage may drift this much before the test asks for a look (launch-bound regressions)
OPS_TOLERANCE = 0.10


@pytest.fixture(autouse=True)
def _quiet_diffusers():
    level = logging.getLogger("diffusers").level
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    yield
    logging.getLogger("diffusers").setLevel(level)


@pytest.fixture(scope="module")
def default_run():
    level = logging.getLogger("diffusers").level
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    try:
        yield simulate_removal(WIDTH, HEIGHT, CLIP_FRAMES)
    finally:
        logging.getLogger("diffusers").setLevel(level)


def test_default_run_fits_and_never_mixes_devices(default_run):
    # simulate_removal would have raised DeviceMixingError; every stage ran on the simulated device
    assert default_run.working_size == (536, 960)
    for stage in ("prior", "encode", "pre-inference", "sampling", "decode"):
        assert default_run.stages[stage].flops > 0, stage
    assert default_run.peak_bytes <= PEAK_LIMIT_GIB * GIB, default_run.peak_bytes / GIB
    # the window (UNet + BrushNet, 22 frames at 960x536) is the peak
    sampling = default_run.stages["sampling"].peak_bytes
    assert sampling == default_run.peak_bytes
    assert 7.5 * GIB < sampling
    # attention ran as fused kernels only
    assert set(default_run.attention_calls) <= {"flash", "efficient"}


def test_flops_per_stage_equal_the_baseline(default_run):
    with open(BASELINE, encoding="utf-8") as f:
        baseline = json.load(f)
    assert baseline["frames"] == CLIP_FRAMES and baseline["resolution"] == f"{WIDTH}x{HEIGHT}"
    flops = {k: v.flops for k, v in default_run.stages.items()}
    assert flops == {k: v["flops"] for k, v in baseline["stages"].items()}


def test_op_counts_per_stage_within_tolerance(default_run):
    with open(BASELINE, encoding="utf-8") as f:
        baseline = json.load(f)["stages"]
    for stage, expected in baseline.items():
        ops = default_run.stages[stage].ops
        assert abs(ops - expected["ops"]) <= OPS_TOLERANCE * expected["ops"], (stage, ops, expected["ops"])


def test_ten_gib_budget_offloads_without_mixing_and_keeps_the_unet_for_decode():
    report = simulate_removal(WIDTH, HEIGHT, SHORT_CLIP_FRAMES, budget=10 * GIB)
    assert report.peak_bytes <= 10 * GIB
    assert report.oom_raised == 0
    # the VAE's memory hints fit next to UNet + BrushNet (4.3 GiB): no weights go back to the host to decode
    assert report.stages["decode"].to_host_bytes < 0.5 * GIB, report.stages["decode"].to_host_bytes / GIB


def test_eight_gib_budget_offloads_everything_else_and_fits():
    # UNet + BrushNet (4.3 GiB) + one 22-frame window (3.6 GiB with the VAE and ProPainter offloaded)
    report = simulate_removal(WIDTH, HEIGHT, SHORT_CLIP_FRAMES, budget=8 * GIB)
    assert report.peak_bytes <= 8 * GIB
    assert report.stages["sampling"].peak_bytes > 7.5 * GIB


def test_eight_gb_budget_runs_the_retry_path_and_ends_with_a_clear_error(caplog):
    # 8 GB = 7.45 GiB: the window cannot fit. The sampler retries it asking the host for more memory, then
    # stops with its own message (never a device mix-up). The diffusion stages alone show it at a fraction of
    # the cost of the whole pipeline.
    with caplog.at_level(logging.WARNING), pytest.raises(torch.OutOfMemoryError, match="cannot be split further"):
        device_sim_runs.simulate_diffusion(SHORT_CLIP_FRAMES, (536, 960), budget=8 * 10 ** 9)
    assert any("retrying with more memory" in r.getMessage() for r in caplog.records)


def test_vae_memory_hints_match_the_simulation():
    from diffueraser_core.pipeline import VAE_DECODE_BYTES_PER_PIXEL, VAE_ENCODE_BYTES_PER_PIXEL

    for num, height, width in ((4, 536, 960), (1, 320, 576)):
        encode = device_sim_runs.vae_activation_peak("encode", num, height, width)
        decode = device_sim_runs.vae_activation_peak("decode", num, height, width)
        pixels_bytes = num * height * width * 2  # fp16
        assert 1.0 <= VAE_ENCODE_BYTES_PER_PIXEL * pixels_bytes / encode <= 1.3
        assert 1.0 <= VAE_DECODE_BYTES_PER_PIXEL * pixels_bytes / decode <= 1.3


def test_window_memory_hint_matches_the_simulation():
    from diffueraser_core.temporal_sampling import _memory_hint

    simulated = device_sim_runs.window_activation_peak(22, (67, 120))
    assert 3.5 * GIB < simulated < 4.3 * GIB  # 3.9 GiB: flash / memory-efficient attention
    assert 1.0 <= _memory_hint(22, (67, 120), 1, torch.float16) / simulated <= 1.3


def test_a_host_tensor_in_a_device_op_is_caught():
    # torch's own meta kernels let a CPU weight through a meta convolution; a GPU would not
    x = torch.empty((1, 3, 8, 8), device="meta")
    with DeviceSimulator(), pytest.raises(DeviceMixingError, match="cpu"):
        torch.nn.functional.conv2d(x, torch.ones(4, 3, 3, 3))
    # host scalars and CPU index tensors are fine, as on CUDA
    with DeviceSimulator():
        y = x * torch.tensor(2.0)
        y[:, torch.tensor([0, 1])]


def test_the_shim_answers_what_meta_cannot():
    sim = DeviceSimulator()
    with sim:
        x = torch.ones((2, 3), device="meta")
        back = x.to("cpu")
        assert back.device.type == "cpu" and back.shape == (2, 3) and not back.any()
        assert bool(x.sum() > 0) and float(x.sum()) == 1.0
        counts = torch.ones(5, device="meta")
        assert counts.nonzero().shape == (5, 1)
        assert (counts == 0).nonzero().shape == (0, 1)
    sim.book("all")
    assert sim.stages["all"].to_host_bytes == 6 * 4


def test_live_bytes_follow_allocations_and_frees():
    sim = DeviceSimulator()
    with sim:
        a = torch.empty((1024, 1024), device="meta")  # 4 MiB
        b = a + 1
        del b
        c = torch.empty((512, 1024), device="meta")
        del a, c
    assert sim.peak == 8 * 1024 ** 2
    assert sim.live == 0


def test_budget_raises_out_of_memory():
    sim = DeviceSimulator(budget=6 * 1024 ** 2)
    with sim, pytest.raises(torch.OutOfMemoryError, match="simulated device"):
        a = torch.empty((1024, 1024), device="meta")
        b = a * 2  # noqa: F841
