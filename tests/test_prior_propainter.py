"""ProPainter prior stage: official-layout random weights end to end, streaming equivalence, memory, errors.

The full-size networks are slow on a CPU, so they run on the smallest clip RAFT accepts (64x64 working size).
The chunking, pre-propagation, reference selection and memory behaviour are checked with light stand-in
networks that have the same interfaces and are sensitive to the frames they are given (a wrong padding or a
wrong reference frame changes their output), against a whole-video transcription of the reference loops.
"""

import os
import pathlib
import subprocess
import sys

import pytest
import torch

from diffueraser_core.errors import InputError, Interrupted, ModelFileError
from diffueraser_core.masks import dilate_cross
from diffueraser_core.models.flow_completion import RecurrentFlowCompleteNet
from diffueraser_core.models.propainter import propagate_image
from diffueraser_core.models.raft import compute_bidirectional_flow
from diffueraser_core.prior_propainter import (
    FLOW_COMPLETION_FILE,
    GENERATOR_FILE,
    RAFT_FILE,
    ProPainterNets,
    ProPainterSettings,
    get_ref_index,
    load_propainter_nets,
    run_propainter_prior,
    working_size,
)
from diffueraser_core.random_weights.propainter import save_propainter_weights
from diffueraser_core.runtime import ModelHandle, StandaloneRuntime

REPO = pathlib.Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------------------
# Helpers


def make_clip(count, height, width, seed=0):
    """Smooth moving gradients (so flow and propagation have structure) and a moving box mask."""
    g = torch.Generator().manual_seed(seed)
    ys = torch.arange(height).view(height, 1, 1).float()
    xs = torch.arange(width).view(1, width, 1).float()
    phase = torch.rand(1, 1, 3, generator=g) * 6
    frames = torch.empty(count, height, width, 3, dtype=torch.uint8)
    masks = torch.zeros(count, height, width, dtype=torch.bool)
    for i in range(count):  # frame by frame: the memory test must not see a float copy of the clip
        frame = 127.5 + 100 * torch.sin((xs + 2 * i) / 9 + phase) * torch.cos((ys - i) / 13 + phase)
        frames[i] = (frame + torch.rand(height, width, 3, generator=g) * 20).clamp(0, 255).to(torch.uint8)
        top, left = height // 3 + i % 5, width // 3 + (2 * i) % 7
        masks[i, top : top + height // 4, left : left + width // 4] = True
    return frames, masks


class OomOnceRuntime(StandaloneRuntime):
    """Raises torch.OutOfMemoryError once per network the first time it is asked for more than ``limit`` bytes."""

    def __init__(self, limit, **kwargs):
        super().__init__(**kwargs)
        self.limit = limit
        self.raised = []

    def wrap(self, module, name):
        module.eval().requires_grad_(False)
        return _OomOnceHandle(module, self, name)


class _OomOnceHandle(ModelHandle):
    def acquire(self, memory_required=0):
        rt = self.runtime
        if memory_required > rt.limit and self.name not in rt.raised:
            rt.raised.append(self.name)
            raise torch.OutOfMemoryError(f"simulated: {self.name} asked for {memory_required} bytes")
        return super().acquire(memory_required)


class ForbiddenHandle:
    def acquire(self, memory_required=0):
        raise AssertionError("a network was acquired")

    def release(self):
        raise AssertionError("a network was released")


class FakeRaft(torch.nn.Module):
    """Same call as RAFT; flow = scaled colour difference (depends on the pair and on iters)."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(0.75))

    def forward(self, image1, image2, iters=20, flow_init=None, test_mode=True):
        flow = (image2 - image1)[:, :2] * self.scale * iters
        return flow[..., ::8, ::8], flow


class FakeFlowCompletion(torch.nn.Module):
    """Same calls as RecurrentFlowCompleteNet; the prediction accumulates over the clip (context dependent)."""

    combine_flow = staticmethod(RecurrentFlowCompleteNet.combine_flow)

    def __init__(self):
        super().__init__()
        self.gain = torch.nn.Parameter(torch.tensor(0.3))

    def forward_bidirect_flow(self, flows_bi, masks):
        forward = flows_bi[0] * (1 - masks[:, :-1])
        backward = flows_bi[1] * (1 - masks[:, 1:])
        drift_f = torch.cumsum(forward.mean(dim=(3, 4), keepdim=True), dim=1)
        drift_b = torch.cumsum(backward.flip(1).mean(dim=(3, 4), keepdim=True), dim=1).flip(1)
        return [forward + self.gain * drift_f, backward + self.gain * drift_b], [None, None]


class FakeGenerator(torch.nn.Module):
    """Real image propagation; a forward that mixes in the reference frames and the masks."""

    def __init__(self):
        super().__init__()
        self.mix = torch.nn.Parameter(torch.tensor(0.25))
        self.calls = 0

    def img_propagation(self, masked_frames, completed_flows, masks, interpolation="nearest"):
        return propagate_image(masked_frames, completed_flows[0], completed_flows[1], masks, interpolation)

    def forward(self, frames, flows, masks_in, masks_updated, local):
        self.calls += 1
        context = frames.mean(dim=1, keepdim=True)
        out = frames[:, :local] * (1 - self.mix) + context * self.mix
        out = out + 0.2 * (masks_in[:, :local] - 0.5 * masks_updated[:, :local]) + 0.05 * flows[0].mean()
        return torch.tanh(out)


def fake_nets(runtime):
    return ProPainterNets(
        raft=runtime.wrap(FakeRaft(), "raft"),
        flow_completion=runtime.wrap(FakeFlowCompletion(), "flow_completion"),
        generator=runtime.wrap(FakeGenerator(), "generator"),
    )


def whole_video_reference(frames_u8, masks, nets, s):
    """The reference's loops on whole-video tensors (working size == input size), with the stage's fp16
    storage points, to compare the streamed result with."""
    raft, fc, gen = nets.raft.module, nets.flow_completion.module, nets.generator.module
    count, h, w, _ = frames_u8.shape
    frames = (frames_u8.permute(0, 3, 1, 2).float() / 255 * 2 - 1).unsqueeze(0)
    dil = dilate_cross(masks, s.mask_dilation).float()[None, :, None]
    masks_dilated = dil.clone()
    half = lambda x: x.half().float()  # noqa: E731

    def flows_of(x):
        n, clip = x.shape[1], s.raft_clip_length(max(h, w))
        parts = [
            compute_bidirectional_flow(raft, x[:, max(0, f - 1) : min(n, f + clip)], s.raft_iter)
            for f in range(0, n, clip)
        ]
        return half(torch.cat([p[0] for p in parts], 1)), half(torch.cat([p[1] for p in parts], 1))

    def complete(gf, gb, fm):
        length, sub, pad = gf.shape[1], s.subvideo_length, s.flow_completion_padding
        out_f, out_b = [], []
        for f in range(0, length, sub):
            a, b = max(0, f - pad), min(length, f + sub + pad)
            keep = slice(f - a, f - a + min(sub, length - f))
            gt = (gf[:, a:b], gb[:, a:b])
            pred = fc.combine_flow(gt, fc.forward_bidirect_flow(gt, fm[:, a : b + 1])[0], fm[:, a : b + 1])
            out_f.append(pred[0][:, keep])
            out_b.append(pred[1][:, keep])
        return half(torch.cat(out_f, 1)), half(torch.cat(out_b, 1))

    def propagate(x, m, pf, pb):
        n, chunk, pad = x.shape[1], s.propagation_chunk, s.propagation_padding
        out_x, out_m = [], []
        for f in range(0, n, chunk):
            a, b = max(0, f - pad), min(n, f + chunk + pad)
            keep = slice(f - a, f - a + min(chunk, n - f))
            prop, pm = gen.img_propagation(x[:, a:b] * (1 - m[:, a:b]), (pf[:, a : b - 1], pb[:, a : b - 1]), m[:, a:b])
            out_x.append((x[:, a:b] * (1 - m[:, a:b]) + prop * m[:, a:b])[:, keep])
            out_m.append(pm[:, keep])
        return half(torch.cat(out_x, 1)), torch.cat(out_m, 1)

    with torch.no_grad():
        pf, pb = complete(*flows_of(frames), dil)
        chunk = s.propagation_chunk
        if count > chunk:
            index = list(range(0, count, count // (chunk // 2)))
            sf, sb = complete(*flows_of(frames[:, index]), dil[:, index])
            upd, upd_m = propagate(frames[:, index], masks_dilated[:, index], sf, sb)
            frames[:, index] = upd
            masks_dilated[:, index] = upd_m
        updated, updated_masks = propagate(frames, masks_dilated, pf, pb)

        comp = [None] * count
        stride = s.neighbor_length // 2
        ref_num = s.subvideo_length // s.ref_stride if count > s.subvideo_length else -1
        for f in range(0, count, stride):
            nb = list(range(max(0, f - stride), min(count, f + stride + 1)))
            ids = nb + get_ref_index(f, nb, count, s.ref_stride, ref_num)
            flows = (pf[:, nb[:-1]], pb[:, nb[:-1]])
            pred = gen(updated[:, ids], flows, masks_dilated[:, ids], updated_masks[:, ids], len(nb))
            pred = ((pred[0] + 1) / 2 * 255).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
            for k, i in enumerate(nb):
                img = torch.where(dil[0, i, 0, :, :, None] > 0, pred[k], frames_u8[i])
                comp[i] = img if comp[i] is None else (comp[i].float() * 0.5 + img.float() * 0.5).to(torch.uint8)
    return torch.stack(comp)


# ------------------------------------------------------------------------------------------------------------
# Official-layout random weights, full-size networks


@pytest.fixture(scope="module")
def official_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("propainter")
    save_propainter_weights(folder, seed=0)
    return folder


@pytest.fixture(scope="module")
def official_nets(official_folder):
    runtime = StandaloneRuntime(device="cpu")
    return runtime, load_propainter_nets(official_folder, runtime)


def test_random_weights_use_the_official_wrapping(official_folder):
    raft = torch.load(official_folder / RAFT_FILE, map_location="cpu", weights_only=True)
    assert all(key.startswith("module.") for key in raft) and "module.cnet.norm1.running_var" in raft
    generator = torch.load(official_folder / GENERATOR_FILE, map_location="cpu", weights_only=True)
    assert generator["transformers.transformer.0.attention.valid_ind_rolled"].dtype == torch.int64
    completion = torch.load(official_folder / FLOW_COMPLETION_FILE, map_location="cpu", weights_only=True)
    assert not any(key.startswith("module.") for key in completion)


def test_end_to_end_official_weights_deterministic_and_oom_safe(official_nets):
    runtime, nets = official_nets
    frames, masks = make_clip(3, 108, 108)  # working size int(0.6*108) = 64, RAFT's minimum
    settings = ProPainterSettings(raft_iter=2)
    events = []
    runtime.progress_callback = lambda stage, done, total, preview: events.append((stage, done, total))
    try:
        result = run_propainter_prior(frames, masks, nets, settings, runtime)
    finally:
        runtime.progress_callback = None
    assert result.frames.shape == frames.shape and result.frames.dtype == torch.uint8
    assert result.masks.shape == masks.shape and result.masks.dtype == torch.bool
    # the dilated mask covers the hole and grows it; outside it the input comes back bit for bit
    assert bool(result.masks[masks].all()) and int(result.masks.sum()) > int(masks.sum())
    outside = ~result.masks
    assert torch.equal(result.frames[outside], frames[outside])
    assert not torch.equal(result.frames[masks], frames[masks])
    assert events[-1] == ("prior", 8, 8)  # 2 flows, 2 completed flows, 3 propagated frames, 1 step

    # Every network runs out of memory once on its first big request: the chunk is halved (RAFT, completion)
    # or the step retried (transformer), and the frames are the same as the undisturbed run.
    oom_runtime = OomOnceRuntime(limit=5_000_000, device="cpu")
    handles = (nets.raft, nets.flow_completion, nets.generator)
    oom_nets = ProPainterNets(*(oom_runtime.wrap(handle.module, handle.name) for handle in handles))
    again = run_propainter_prior(frames, masks, oom_nets, settings, oom_runtime)
    assert sorted(oom_runtime.raised) == ["propainter_flow_completion", "propainter_generator", "propainter_raft"]
    assert torch.equal(again.frames, result.frames) and torch.equal(again.masks, result.masks)


def test_one_frame_video_runs_as_a_repeated_frame(official_nets):
    runtime, nets = official_nets
    frames, masks = make_clip(1, 64, 64)
    result = run_propainter_prior(frames, masks, nets, ProPainterSettings(resize_ratio=1.0, raft_iter=1), runtime)
    assert result.frames.shape == (1, 64, 64, 3)
    assert torch.equal(result.frames[~result.masks], frames[~result.masks])
    assert not torch.equal(result.frames[masks], frames[masks])


def test_missing_or_corrupt_weight_files(official_folder, tmp_path):
    runtime = StandaloneRuntime(device="cpu")
    with pytest.raises(ModelFileError, match="raft-things.pth"):
        load_propainter_nets(tmp_path, runtime)
    broken = tmp_path / "broken"
    broken.mkdir()
    data = (official_folder / RAFT_FILE).read_bytes()
    (broken / RAFT_FILE).write_bytes(data[: len(data) // 3])
    with pytest.raises(ModelFileError, match="truncated or corrupt"):
        load_propainter_nets(broken, runtime)
    (broken / RAFT_FILE).write_bytes(b"")
    with pytest.raises(ModelFileError, match="empty"):
        load_propainter_nets(broken, runtime)


# ------------------------------------------------------------------------------------------------------------
# Streaming logic with stand-in networks


def test_streaming_equals_whole_video_reference_loops():
    # 17 frames with subvideo_length 8: flow completion in 2 padded chunks, pre-propagation of every 4th frame,
    # image propagation chunks smaller than their padding, a window of reference frames, overlapping steps.
    runtime = StandaloneRuntime(device="cpu")
    nets = fake_nets(runtime)
    frames, masks = make_clip(17, 64, 64)
    settings = ProPainterSettings(resize_ratio=1.0, subvideo_length=8, ref_stride=2, neighbor_length=4, raft_iter=3)
    expected = whole_video_reference(frames, masks, nets, settings)
    events = []
    runtime.progress_callback = lambda stage, done, total, preview: events.append((done, total))
    result = run_propainter_prior(frames, masks, nets, settings, runtime)
    runtime.progress_callback = None
    assert [done for done, _ in events] == sorted(done for done, _ in events) and events[-1] == (71, 71)
    assert torch.equal(result.masks, dilate_cross(masks, settings.mask_dilation))
    assert torch.equal(result.frames, expected)


def test_compute_dtype_runs_the_networks_in_that_precision():
    runtime = StandaloneRuntime(device="cpu")
    nets = fake_nets(runtime)
    frames, masks = make_clip(6, 64, 64)
    settings = ProPainterSettings(resize_ratio=1.0, raft_iter=2)
    full = run_propainter_prior(frames, masks, nets, settings, runtime)
    bf16 = ProPainterSettings(**{**settings.__dict__, "compute_dtype": torch.bfloat16})
    half = run_propainter_prior(frames, masks, nets, bf16, runtime)
    assert nets.generator.module.mix.dtype == torch.bfloat16 and nets.raft.module.scale.dtype == torch.float32
    diff = (half.frames.float() - full.frames.float()).abs()
    assert torch.equal(half.frames[~half.masks], frames[~half.masks])
    assert 0 < diff.max() and diff.mean() < 2.0


def test_interrupt_stops_the_stage():
    calls = []
    runtime = StandaloneRuntime(device="cpu", interrupt_flag=lambda: len(calls) >= 2)
    runtime.progress_callback = lambda stage, done, total, preview: calls.append(done)
    nets = fake_nets(runtime)
    frames, masks = make_clip(12, 64, 64)
    with pytest.raises(Interrupted):
        run_propainter_prior(frames, masks, nets, ProPainterSettings(resize_ratio=1.0, raft_iter=1), runtime)
    assert nets.generator.module.calls == 0 and len(calls) == 2


def test_empty_mask_returns_input_without_networks():
    frames, masks = make_clip(3, 64, 64)
    nets = ProPainterNets(ForbiddenHandle(), ForbiddenHandle(), ForbiddenHandle())
    result = run_propainter_prior(frames, torch.zeros_like(masks), nets, ProPainterSettings(), StandaloneRuntime("cpu"))
    assert result.frames is frames
    assert result.masks.shape == masks.shape and not bool(result.masks.any())


def test_mask_that_vanishes_at_the_working_size_needs_no_network():
    frames, _ = make_clip(3, 128, 128)
    masks = torch.zeros(3, 128, 128, dtype=torch.bool)
    masks[:, 40, 41] = True  # nearest-exact at half size samples odd pixels only: this one disappears
    nets = ProPainterNets(ForbiddenHandle(), ForbiddenHandle(), ForbiddenHandle())
    result = run_propainter_prior(frames, masks, nets, ProPainterSettings(resize_ratio=0.5), StandaloneRuntime("cpu"))
    assert torch.equal(result.masks, masks)
    assert torch.equal(result.frames[~masks], frames[~masks])
    assert not torch.equal(result.frames[masks], frames[masks])  # the upscaled working frame fills the hole


def test_two_frames_and_a_single_broadcast_mask():
    runtime = StandaloneRuntime(device="cpu")
    nets = fake_nets(runtime)
    frames, masks = make_clip(2, 64, 64)
    settings = ProPainterSettings(resize_ratio=1.0, raft_iter=1)
    one = run_propainter_prior(frames, masks[:1], nets, settings, runtime)
    full = run_propainter_prior(frames, masks[:1].expand(2, 64, 64).clone(), nets, settings, runtime)
    assert one.frames.shape == frames.shape and torch.equal(one.frames, full.frames)
    assert torch.equal(one.frames[~one.masks], frames[~one.masks])


def test_bad_inputs_are_input_errors():
    runtime = StandaloneRuntime(device="cpu")
    nets = ProPainterNets(ForbiddenHandle(), ForbiddenHandle(), ForbiddenHandle())
    frames, masks = make_clip(4, 64, 64)
    with pytest.raises(InputError, match="mask has 3 frames but the video has 4"):
        run_propainter_prior(frames, masks[:3], nets, ProPainterSettings(), runtime)
    with pytest.raises(InputError, match="masks are 32x64 but the frames are 64x64"):
        run_propainter_prior(frames, masks[:, :, :32], nets, ProPainterSettings(), runtime)
    with pytest.raises(InputError, match="frames must be uint8"):
        run_propainter_prior(frames.float(), masks, nets, ProPainterSettings(), runtime)
    with pytest.raises(InputError, match="masks must be bool"):
        run_propainter_prior(frames, masks.float(), nets, ProPainterSettings(), runtime)
    with pytest.raises(InputError, match="no frames"):
        run_propainter_prior(frames[:0], masks[:0], nets, ProPainterSettings(), runtime)
    small_frames, small_masks = make_clip(2, 56, 56)
    with pytest.raises(InputError, match=r"working size 32x32 \(from 56x56.* below the 64-pixel minimum"):
        run_propainter_prior(small_frames, small_masks, nets, ProPainterSettings(), runtime)
    with pytest.raises(InputError, match="neighbor_length must be >= 2, got 1"):
        run_propainter_prior(frames, masks, nets, ProPainterSettings(neighbor_length=1), runtime)


def test_working_size_follows_the_reference():
    s = ProPainterSettings()
    assert working_size(720, 1280, s) == (320, 576)  # ratio 0.6*(960/1280) ~ 0.45 -> 323x575 -> /8
    assert working_size(240, 432, s) == (144, 256)  # 0.6 -> 144x259 -> /8
    assert working_size(480, 640, ProPainterSettings(resize_ratio=1.0)) == (480, 640)
    # documented fallback: a ratio that would fall under RAFT's 64 pixels is raised just enough
    assert working_size(64, 64, ProPainterSettings(resize_ratio=0.5)) == (64, 64)
    assert working_size(96, 160, s) == (64, 104)  # 0.6 would give 56x96
    assert s.raft_clip_length(640) == 12 and s.raft_clip_length(720) == 8
    assert s.raft_clip_length(1280) == 4 and s.raft_clip_length(1281) == 2


def _reference_working_size(height, width, resize_ratio=0.6, max_side=960):
    # DiffuEraser's propainter/inference.py, re-stated: scale = MaxSideThresh / longer_edge; resize_ratio *= scale;
    # size = int(resize_ratio * w), int(resize_ratio * h); then each side rounded down to a multiple of 8
    longer = max(height, width)
    if longer > max_side:
        scale = max_side / longer
        resize_ratio = resize_ratio * scale
    if resize_ratio != 1.0:
        height, width = int(resize_ratio * height), int(resize_ratio * width)
    return height - height % 8, width - width % 8


@pytest.mark.parametrize(
    "width, height, expected_w, expected_h",
    [
        (1280, 960, 576, 424),  # 0.6 * 960 / 1280 would give 576x432
        (1440, 1080, 576, 424),
        (1280, 800, 576, 352),  # not 360
        (1440, 900, 576, 352),
        (2704, 1520, 568, 320),  # not 576 wide
        (1920, 1080, 576, 320),
        (1280, 720, 576, 320),
    ],
)
def test_working_size_float_order_as_the_reference(width, height, expected_w, expected_h):
    s = ProPainterSettings()
    assert working_size(height, width, s) == (expected_h, expected_w)
    assert working_size(width, height, s) == (expected_w, expected_h)  # portrait


def test_working_size_sweep_matches_the_reference_formula():
    s = ProPainterSettings()
    moved = checked = 0
    for width in range(968, 4097, 8):
        for height in range(max(128, width // 3), width + 1, 24):
            got = working_size(height, width, s)
            assert got == _reference_working_size(height, width), (width, height)
            checked += 1
            h2, w2 = int(0.6 * 960 / width * height), int(0.6 * 960 / width * width)
            moved += got != (h2 - h2 % 8, w2 - w2 % 8)
    assert moved > 0.05 * checked  # the float order matters for a sizeable share of sizes above 960
    for side in range(128, 961, 8):  # at or under 960 only the 0.6 ratio applies
        assert working_size(side, 960, s) == _reference_working_size(side, 960)


def test_raft_clips_and_reference_frames():
    s = ProPainterSettings()
    # all frames every ref_stride when the video fits one sub-video; otherwise a window around the step
    assert get_ref_index(5, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 40, 10, -1) == [20, 30]
    assert get_ref_index(50, list(range(45, 56)), 200, 10, 4) == [30, 40, 60]


MEMORY_SCRIPT = r"""
import importlib.util, resource, sys, torch
torch.set_num_threads(1)
spec = importlib.util.spec_from_file_location("prior_tests", sys.argv[2])
tests = importlib.util.module_from_spec(spec); spec.loader.exec_module(tests)
from diffueraser_core.prior_propainter import ProPainterSettings, run_propainter_prior
from diffueraser_core.runtime import StandaloneRuntime
runtime = StandaloneRuntime(device="cpu")
frames, masks = tests.make_clip(int(sys.argv[1]), 128, 128)
settings = ProPainterSettings(resize_ratio=0.5, raft_iter=1, subvideo_length=20)
result = run_propainter_prior(frames, masks, tests.fake_nets(runtime), settings, runtime)
assert result.frames.shape[0] == int(sys.argv[1])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def _peak_rss(count):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, str(count), __file__], capture_output=True, text=True, env=env,
        cwd=REPO, timeout=300, check=True,
    )
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_cpu_memory_grows_only_by_frame_storage():
    # 128x128 input, 64x64 working size, subvideo_length 20 so both lengths run full-size chunks. Per frame the
    # stage keeps: input + output frames (3+3 B/px) and masks (1+1 B/px) at the input size; working frames (3),
    # three masks (3), fp16 flows both ways (8) and fp16 propagated frames (6) at the working size:
    # 8*128*128 + 20*64*64 = 213 KB (measured growth ~47 MiB for 240 frames). A float32 whole-video copy at the
    # input size (12 B/px = 196 KB/frame, +45 MiB) would break the bound below.
    per_frame = 8 * 128 * 128 + 20 * 64 * 64
    growth = _peak_rss(300) - _peak_rss(60)
    bound = 240 * per_frame * 1.25 + 16 * 2**20
    assert growth < bound, f"peak RSS grew by {growth / 2**20:.1f} MiB, bound {bound / 2**20:.1f} MiB"


def test_output_quantisation_follows_the_reference_in_fp16_and_fp32():
    import numpy as np

    from diffueraser_core.prior_propainter import quantise_output

    gen = torch.Generator().manual_seed(0)
    values = torch.rand((2, 3, 32, 48), generator=gen) * 2.2 - 1.1  # a little outside [-1, 1] too
    half = values.to(torch.float16)
    # the reference: (pred + 1) / 2 on the device in the run's dtype, then numpy's * 255 and astype(uint8)
    ref16 = (((half + 1) / 2).numpy() * 255).clip(0, 255).astype(np.uint8)
    ref32 = (((values + 1) / 2).numpy() * 255).clip(0, 255).astype(np.uint8)
    assert np.array_equal(quantise_output(half, torch.float16).numpy(), ref16)
    assert np.array_equal(quantise_output(values, torch.float32).numpy(), ref32)
    # the same fp16 values quantised in fp32 (what bf16/fp32 runs do) differ by one level on a few percent
    d = quantise_output(half, torch.float16).int() - quantise_output(half, torch.float32).int()
    assert d.abs().max() == 1 and 0.01 < float((d != 0).float().mean()) < 0.2
    assert quantise_output(half.to(torch.bfloat16), torch.bfloat16).dtype == torch.uint8
