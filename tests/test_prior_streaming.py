"""The ProPainter prior handed over chunk by chunk (``run_propainter_prior(..., sink=...)``) and ``remove_objects``
encoding it on the fly instead of holding the input-size prior video.

Checked: the sink gets consecutive ranges covering every frame once, bit for bit the frames of the whole-result
call (long clip with pre-propagation, short, 1-frame, empty mask, mask that vanishes at the working size); no
input-size tensor is allocated with a sink (an op-level allocation watch that does see the whole-result call's
copies); the streamed prior latent batches the VAE exactly as ``encode_prior`` does; and ``remove_objects`` gives
the same frames as the former prior-then-encode order.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from diffueraser_core import pipeline
from diffueraser_core.pipeline import encode_prior
from diffueraser_core.prior_propainter import (
    OUTPUT_FLUSH_FRAMES,
    ProPainterNets,
    ProPainterSettings,
    _OutputWriter,
    run_propainter_prior,
)
from diffueraser_core.runtime import StandaloneRuntime
from diffueraser_core.video import FRAME_CHUNK
from test_faults import TrackingRuntime, build_tiny_nets, run_pipeline, stand_in_propainter
from test_prior_propainter import ForbiddenHandle, fake_nets, make_clip


class RecordingSink:
    def __init__(self):
        self.ranges = []
        self.parts = []

    def __call__(self, start, stop, frames):
        assert frames.dtype == torch.uint8 and frames.dim() == 4 and frames.shape[0] == stop - start
        self.ranges.append((start, stop))
        self.parts.append(frames.clone())

    def frames(self):
        return torch.cat(self.parts)


def assert_contiguous_cover(ranges, count):
    assert ranges, "the sink got nothing"
    assert ranges[0][0] == 0 and ranges[-1][1] == count
    for (_, stop), (start, _) in zip(ranges, ranges[1:]):
        assert start == stop, f"ranges {ranges} are not consecutive"
    assert all(0 < stop - start <= OUTPUT_FLUSH_FRAMES for start, stop in ranges), ranges


def no_nets():
    return ProPainterNets(ForbiddenHandle(), ForbiddenHandle(), ForbiddenHandle())


def vanishing_mask_clip(count):
    frames, _ = make_clip(count, 128, 128)
    masks = torch.zeros(count, 128, 128, dtype=torch.bool)
    masks[:, 40, 41] = True  # nearest-exact at half size samples odd pixels only: this one disappears
    return frames, masks


# name -> (frames, masks, settings, networks needed)
CASES = {
    # 37 frames > propagation chunk 8: pre-propagation, several flow-completion / propagation chunks, reference
    # windows, and flushes of 16 + a remainder at offsets that are not multiples of 16; 128 -> 64 working size
    "long with pre-propagation": (
        lambda: make_clip(37, 128, 128),
        ProPainterSettings(resize_ratio=0.5, subvideo_length=8, ref_stride=2, neighbor_length=6, raft_iter=1),
        True,
    ),
    "short": (lambda: make_clip(5, 64, 64), ProPainterSettings(resize_ratio=1.0, raft_iter=1), True),
    "one frame": (lambda: make_clip(1, 64, 64), ProPainterSettings(resize_ratio=1.0, raft_iter=1), True),
    "empty mask": (
        lambda: (make_clip(35, 64, 64)[0], torch.zeros(35, 64, 64, dtype=torch.bool)),
        ProPainterSettings(),
        False,
    ),
    "mask vanishing at the working size": (lambda: vanishing_mask_clip(20), ProPainterSettings(resize_ratio=0.5), False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sink_gets_every_frame_once_in_order_bit_for_bit(case):
    make, settings, needs_nets = CASES[case]
    frames, masks = make()
    runtime = StandaloneRuntime(device="cpu")
    nets = fake_nets(runtime) if needs_nets else no_nets()
    whole = run_propainter_prior(frames, masks, nets, settings, runtime)
    sink = RecordingSink()
    streamed = run_propainter_prior(frames, masks, nets, settings, runtime, sink=sink)
    assert streamed.frames is None and streamed.masks is None
    assert_contiguous_cover(sink.ranges, frames.shape[0])
    assert torch.equal(sink.frames(), whole.frames)
    if case == "empty mask":
        # handed over as slices of the input, not copies
        assert sink.ranges == [(0, 16), (16, 32), (32, 35)]
    if case == "long with pre-propagation":
        assert any(start % FRAME_CHUNK for start, _ in sink.ranges), "expected ranges off the 16-frame grid"


def test_empty_mask_hands_over_views_of_the_input():
    frames = make_clip(20, 64, 64)[0]
    seen = []
    run_propainter_prior(frames, torch.zeros(20, 64, 64, dtype=torch.bool), no_nets(), ProPainterSettings(),
                         StandaloneRuntime(device="cpu"), sink=lambda a, b, part: seen.append(part))
    base = frames.untyped_storage().data_ptr()
    assert [part.untyped_storage().data_ptr() for part in seen] == [base, base]


def test_out_of_order_frames_are_an_internal_error():
    frames, masks = make_clip(4, 64, 64)
    writer = _OutputWriter(frames, masks, masks.clone(), sink=lambda *a: None)
    writer.add(0, frames[0])
    writer.flush(1, force=True)
    writer.add(2, frames[2])  # frame 1 skipped
    with pytest.raises(RuntimeError, match="internal error.*out of order"):
        writer.flush(3, force=True)
    writer = _OutputWriter(frames, masks, masks.clone())
    writer.write_range(0, 2, frames)
    with pytest.raises(RuntimeError, match="internal error, 2 of 4 frames written"):
        writer.finish()


def test_an_exception_in_the_sink_stops_the_stage_and_releases_the_networks():
    runtime = TrackingRuntime()
    frames, masks = make_clip(12, 64, 64)

    def sink(start, stop, part):
        raise KeyError("sink failed")

    with pytest.raises(KeyError, match="sink failed"):
        run_propainter_prior(frames, masks, fake_nets(runtime), ProPainterSettings(resize_ratio=1.0, raft_iter=1),
                             runtime, sink=sink)
    assert runtime.held() == []


class LargeAllocations(TorchDispatchMode):
    """Records every op result with at least ``limit`` elements that does not share the given tensors' storage
    (views of the input are not copies)."""

    def __init__(self, limit, *inputs):
        super().__init__()
        self.limit = limit
        self.inputs = {t.untyped_storage().data_ptr() for t in inputs}
        self.found = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.numel() >= self.limit:
                if t.untyped_storage().data_ptr() not in self.inputs:
                    self.found.append((str(func), tuple(t.shape), t.dtype))
        return out


def test_with_a_sink_no_input_size_video_is_allocated():
    # 60 frames at 128x128, working size 64x64: any tensor with 60*128*128 elements (one bool mask or more of the
    # whole video at the input size) is an input-size copy; working-size storage is at most 3/4 of that, a
    # 16-frame output chunk 48/60.
    count, height, width = 60, 128, 128
    frames, masks = make_clip(count, height, width)
    # subvideo_length 40 < 60 frames: pre-propagation and two propagation chunks run too
    settings = ProPainterSettings(resize_ratio=0.5, subvideo_length=40, neighbor_length=6, raft_iter=1)
    limit = count * height * width

    runtime = StandaloneRuntime(device="cpu")
    with LargeAllocations(limit, frames, masks) as watch:
        whole = run_propainter_prior(frames, masks, fake_nets(runtime), settings, runtime)
    # the watch does see the whole-result call's output frames and mask
    shapes = {(shape, dtype) for _, shape, dtype in watch.found}
    assert ((count, height, width, 3), torch.uint8) in shapes and ((count, height, width), torch.bool) in shapes

    sink = RecordingSink()
    runtime = StandaloneRuntime(device="cpu")
    with LargeAllocations(limit, frames, masks) as watch:
        run_propainter_prior(frames, masks, fake_nets(runtime), settings, runtime, sink=sink)
    assert watch.found == []
    assert torch.equal(sink.frames(), whole.frames)


# ------------------------------------------------------------------------------------------------------------
# remove_objects


class BatchSensitiveCodec:
    """encode: a latent that depends on the whole batch (as a batch-size dependent kernel could); records batches."""

    def __init__(self):
        self.batches = []

    def encode(self, frames):
        self.batches.append(int(frames.shape[0]))
        n, h, w, _ = frames.shape
        x = frames.permute(0, 3, 1, 2).float()
        pooled = torch.nn.functional.avg_pool2d(x, 8)
        return torch.cat([pooled, pooled.mean(dim=1, keepdim=True)], 1) + x.mean() * 1e-3


@pytest.mark.parametrize("pieces", [[16, 16, 5], [16, 5, 16, 3, 16, 2], [1] * 21, [7]])
def test_prior_latent_sink_batches_the_vae_like_encode_prior(pieces):
    count = sum(pieces)
    frames = make_clip(count, 80, 96)[0]
    expected_codec, codec = BatchSensitiveCodec(), BatchSensitiveCodec()
    events, expected_events = [], []

    class Runtime:
        def __init__(self, events):
            self.progress = lambda stage, done, total: events.append((stage, done, total))

    expected = encode_prior(frames, (64, 72), expected_codec, Runtime(expected_events))
    sink = pipeline._PriorLatentSink(count, (64, 72), codec, Runtime(events))
    start = 0
    for size in pieces:
        sink(start, start + size, frames[start : start + size])
        start += size
    assert torch.equal(sink.result(), expected)
    # encode_prior announces its stage at 0 (a node of its own); the sink streams inside the prior's stage
    assert codec.batches == expected_codec.batches and events == expected_events[1:]
    assert expected_events[0] == ("encode", 0, count)
    with pytest.raises(RuntimeError, match="internal error"):
        sink(0, 1, frames[:1])


@pytest.fixture(scope="module")
def tiny_nets():
    return build_tiny_nets()


def test_remove_objects_streams_the_prior_and_gives_the_same_frames(tiny_nets, monkeypatch):
    # 20 frames, stride 3: the prior hands over [0,16) [16,18) [18,20), the VAE gets [0,16) [16,20)
    import diffueraser_core.prior_propainter as prior_module

    frames, masks = make_clip(20, 64, 64)
    prior_calls, latents = [], []
    original_prior, original_inject = prior_module.run_propainter_prior, pipeline.inject_forward_noise

    def spy_prior(*args, **kwargs):
        result = original_prior(*args, **kwargs)
        prior_calls.append((args, kwargs, result))
        return result

    def spy_inject(prior_latent, settings):
        latents.append(prior_latent.clone())
        return original_inject(prior_latent, settings)

    class FormerWay(pipeline._PriorLatentSink):
        """The order before streaming: the whole input-size prior first (same arguments, no sink), then
        encode_prior on it."""

        def __call__(self, start, stop, part):
            pass

        def result(self):
            args, _, _ = prior_calls[-1]
            whole = original_prior(*args)
            assert whole.frames.shape == frames.shape
            return encode_prior(whole.frames, self.size, self.codec, self.runtime)

    monkeypatch.setattr(prior_module, "run_propainter_prior", spy_prior)
    monkeypatch.setattr(pipeline, "inject_forward_noise", spy_inject)
    runtime = TrackingRuntime()
    streamed = run_pipeline(tiny_nets, frames, masks, runtime, prior=dict(neighbor_length=6))
    assert len(prior_calls) == 1
    _, kwargs, result = prior_calls[0]
    assert isinstance(kwargs.get("sink"), pipeline._PriorLatentSink) and result.frames is None
    encode_events = [e for e in runtime.events if e[0] == "encode"]
    assert encode_events[:2] == [("encode", 16, 20), ("encode", 20, 20)]
    assert runtime.held() == []

    monkeypatch.setattr(pipeline, "_PriorLatentSink", FormerWay)
    former = run_pipeline(tiny_nets, frames, masks, TrackingRuntime(), prior=dict(neighbor_length=6))
    assert len(latents) == 2 and torch.equal(latents[0], latents[1])
    assert torch.equal(streamed, former)


# ------------------------------------------------------------------------------------------------------------
# The working-size stages pulled on demand: same frames as the whole-video loops, memory bounded by the windows


def _resident_peak(monkeypatch, count, settings):
    """Most working-size frames/pairs held at once by any per-frame store during one prior run."""
    from diffueraser_core import prior_propainter

    peak = {"items": 0}
    put = prior_propainter._PerFrame.put

    def tracking_put(self, start, values):
        put(self, start, values)
        peak["items"] = max(peak["items"], sum(chunk.shape[0] for chunk in self.chunks))

    monkeypatch.setattr(prior_propainter._PerFrame, "put", tracking_put)
    frames, masks = make_clip(count, 64, 64)
    runtime = StandaloneRuntime(device="cpu")
    run_propainter_prior(frames, masks, fake_nets(runtime), settings, runtime, sink=lambda *a: None)
    monkeypatch.setattr(prior_propainter._PerFrame, "put", put)
    return peak["items"]


def test_long_clip_pulled_stage_by_stage_equals_the_whole_video_loops():
    from test_prior_propainter import whole_video_reference

    # 61 frames, subvideo_length 8: many completion/propagation chunks, pre-propagation of every 15th frame,
    # reference frames within 8 of each step, so frames are dropped all along the run
    runtime = StandaloneRuntime(device="cpu")
    nets = fake_nets(runtime)
    frames, masks = make_clip(61, 64, 64, seed=3)
    settings = ProPainterSettings(resize_ratio=1.0, subvideo_length=8, ref_stride=2, neighbor_length=4, raft_iter=3)
    expected = whole_video_reference(frames, masks, nets, settings)
    assert torch.equal(run_propainter_prior(frames, masks, nets, settings, runtime).frames, expected)


def test_frames_held_at_the_working_size_do_not_grow_with_the_video(monkeypatch):
    settings = ProPainterSettings(resize_ratio=1.0, subvideo_length=8, ref_stride=2, neighbor_length=4, raft_iter=1)
    short, long = _resident_peak(monkeypatch, 90, settings), _resident_peak(monkeypatch, 270, settings)
    # what is held: from the earliest frame a later step reads to what the chunked stages ran ahead
    assert short == long < 90, (short, long)
    # a clip no longer than subvideo_length refers to all its frames at every step: everything stays
    assert _resident_peak(monkeypatch, 8, settings) == 8
