"""Nothing lost (property tests, hypothesis, bounded): over random sizes, lengths, masks and settings

* the whole pipeline returns as many frames as it was given, at the same size, and every pixel where the final
  blend weight is zero is bit-identical to the input (tiny random diffusion networks, stand-in prior networks);
* the ProPainter prior returns every frame at the input size, the input's pixels outside its dilated mask;
* the sampler's staggered windows give every frame to the networks on every denoising step, and a window schedule
  never mixes one frame's latent into another's.

Example counts are bounded so the file stays within a few tens of seconds on a CPU (``deadline=None``: the tiny
networks' speed depends on the machine's load).
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffueraser_core.blend import blend_weights, prepare_blend_masks
from diffueraser_core.masks import broadcast_masks
from diffueraser_core.prior_injection import tcd_timesteps
from diffueraser_core.prior_propainter import ProPainterSettings, run_propainter_prior
from diffueraser_core.runtime import StandaloneRuntime
from diffueraser_core.temporal_sampling import Conditioning, WindowSettings, denoise_windows, pairs_down
from diffueraser_core.video import working_size
from diffueraser_core.windows import windows_for_step
from test_faults import TrackingRuntime, build_tiny_nets, run_pipeline, stand_in_propainter

PIPELINE_EXAMPLES = settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FAST_EXAMPLES = settings(max_examples=15, deadline=None)

_NETS = {}


def tiny_nets():
    # built once per process (hypothesis does not mix with function-scoped fixtures)
    if "nets" not in _NETS:
        _NETS["nets"] = build_tiny_nets()
    return _NETS["nets"]


@st.composite
def videos_and_masks(draw, max_frames=6, sizes=(64, 80)):
    count = draw(st.integers(1, max_frames))
    height = draw(st.integers(*sizes))
    width = draw(st.integers(*sizes))
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    frames = torch.randint(0, 256, (count, height, width, 3), generator=gen, dtype=torch.uint8)
    kind = draw(st.sampled_from(["boxes", "single box", "noise", "empty", "full", "other size"]))
    mask_count = 1 if kind == "single box" else count
    mh, mw = (height // 2, width // 2) if kind == "other size" else (height, width)
    masks = torch.zeros((mask_count, mh, mw), dtype=torch.bool)
    if kind == "noise":
        masks = torch.rand((mask_count, mh, mw), generator=gen) > draw(st.floats(0.9, 0.999))
    elif kind == "full":
        masks[:] = True
    elif kind != "empty":
        for i in range(mask_count):
            top = int(torch.randint(0, mh - 4, (1,), generator=gen))
            left = int(torch.randint(0, mw - 4, (1,), generator=gen))
            masks[i, top : top + draw(st.integers(1, mh // 2)), left : left + draw(st.integers(1, mw // 2))] = True
    return frames, masks, kind


@PIPELINE_EXAMPLES
@given(
    videos_and_masks(),
    st.integers(1, 2),  # steps
    st.integers(2, 3),  # window length (short videos still get several windows and the pre-inference)
    st.sampled_from([1, 3, 5]),  # feather
    st.integers(0, 2),  # mask dilation
)
def test_the_pipeline_keeps_every_frame_and_every_pixel_it_was_not_asked_to_touch(case, steps, length, feather,
                                                                                   dilation):
    frames, masks, kind = case
    count, height, width = frames.shape[:3]
    out = run_pipeline(tiny_nets(), frames, masks, TrackingRuntime(), feather=feather,
                       sampler={"steps": steps, "window_length": length, "mask_dilation": dilation})
    assert out.shape == frames.shape and out.dtype == torch.uint8
    # a mask of another size is resized once, straight from its own size to the working size (as the reference),
    # then the prepared mask is brought to the frames' size: the blend's own weights
    native = broadcast_masks(masks, count, (height, width), resize=False)
    prepared = prepare_blend_masks(native, working_size(height, width), dilation, (height, width))
    alpha = blend_weights(prepared, feather)
    untouched = alpha == 0
    assert torch.equal(out[untouched], frames[untouched]), f"{kind}: pixels with blend weight 0 changed"
    if kind == "empty":
        assert torch.equal(out, frames)


@FAST_EXAMPLES
@given(
    videos_and_masks(max_frames=12, sizes=(64, 96)),
    st.integers(2, 8),  # subvideo_length: flow completion / propagation chunks and pre-propagation
    st.integers(2, 6),  # neighbor_length
    st.integers(1, 4),  # ref_stride
    st.integers(0, 3),  # mask dilation
)
def test_the_prior_keeps_every_frame_and_every_pixel_outside_its_mask(case, subvideo, neighbors, ref_stride,
                                                                      dilation):
    frames, masks, kind = case
    count, height, width = frames.shape[:3]
    masks = broadcast_masks(masks, count, (height, width))  # the nodes do this before the stage
    runtime = TrackingRuntime()
    settings_ = ProPainterSettings(resize_ratio=1.0, raft_iter=1, subvideo_length=subvideo, neighbor_length=neighbors,
                                   ref_stride=ref_stride, mask_dilation=dilation)
    result = run_propainter_prior(frames, masks, stand_in_propainter(runtime), settings_, runtime)
    assert result.frames.shape == frames.shape and result.frames.dtype == torch.uint8
    assert result.masks.shape == masks.shape and bool(result.masks[masks].all())
    outside = ~result.masks
    assert torch.equal(result.frames[outside], frames[outside])
    assert runtime.held() == []


class _FrameRecordingUNet(torch.nn.Module):
    """Predicts zero noise and records which frames each call received.

    Frame ``f`` enters with channel 1 / channel 0 = f + 1; a zero-noise TCD step scales both channels alike and a
    crossfade of one frame's two window results keeps the ratio, so the ratio names the frame on every step.
    """

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, video, timestep, encoder_hidden_states=None, **residuals):
        ratio = video[0, 1, :, 0, 0] / video[0, 0, :, 0, 0]
        self.calls.append((int(timestep), [round(float(r)) - 1 for r in ratio]))
        return torch.zeros_like(video)


class _NoResiduals(torch.nn.Module):
    def forward(self, sample, timestep, encoder_hidden_states=None, brushnet_cond=None, conditioning_scale=1.0):
        return [], torch.zeros(1), []


@FAST_EXAMPLES
@given(st.integers(1, 70), st.integers(1, 32), st.data(), st.integers(1, 4))
def test_every_frame_is_denoised_on_every_step(num, length, data, steps):
    overlap = data.draw(st.integers(0, length - 1))
    from diffueraser_core.pipeline import DiffuEraserModels

    runtime = StandaloneRuntime(device="cpu")
    unet = _FrameRecordingUNet()
    models = DiffuEraserModels(unet=runtime.wrap(unet, "unet"), brushnet=runtime.wrap(_NoResiduals(), "brushnet"))
    latents = torch.ones((num, 4, 2, 2))
    latents[:, 1] = torch.arange(1, num + 1, dtype=torch.float32).view(num, 1, 1)
    conditioning = Conditioning(torch.zeros((num, 4, 2, 2)), torch.ones((num, 2, 2), dtype=torch.bool))
    pairs = pairs_down(tcd_timesteps(steps))
    out = denoise_windows(latents, pairs, conditioning, torch.zeros(1, 8, 32), None, models,
                          WindowSettings(window_length=length, window_overlap=overlap), runtime)
    assert out.shape == latents.shape
    for step, (t, _) in enumerate(pairs):
        windows = [frames for timestep, frames in unet.calls if timestep == t]
        expected = windows_for_step(step, num, length, overlap)
        assert [(w[0], w[-1] + 1) for w in windows] == expected  # the schedule, in order, each window contiguous
        assert all(w == list(range(w[0], w[-1] + 1)) for w in windows)
        assert sorted(set(f for w in windows for f in w)) == list(range(num)), f"step {step}: a frame was skipped"
    ratio = out[:, 1, 0, 0] / out[:, 0, 0, 0]
    torch.testing.assert_close(ratio, latents[:, 1, 0, 0], rtol=1e-5, atol=0)  # no frame mixed into another
