"""Property tests (hypothesis, bounded): window coverage, zero-weight pixels, mask broadcasting."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffueraser_core.blend import blend_video, blend_weights, prepare_blend_masks
from diffueraser_core.masks import broadcast_masks
from diffueraser_core.windows import WindowAccumulator, window_lists, windows_for_step

BOUNDED = settings(max_examples=25, deadline=None)


@st.composite
def schedules(draw):
    length = draw(st.integers(1, 40))
    overlap = draw(st.integers(0, length - 1))
    n = draw(st.integers(1, 300))
    return n, length, overlap


@BOUNDED
@given(schedules())
def test_windows_cover_every_frame_on_every_step(schedule):
    n, length, overlap = schedule
    for step in (0, 1):
        windows = windows_for_step(step, n, length, overlap)
        seen = torch.zeros(n, dtype=torch.bool)
        acc = WindowAccumulator(n)
        for start, stop in windows:
            assert 0 <= start < stop <= n and stop - start == min(length, n)
            covered = seen[start:stop]
            m = int(covered.sum())
            assert bool(covered[:m].all()) and m < stop - start  # a prefix, and every window adds frames
            seen[start:stop] = True
            acc.add(start, stop, torch.full((stop - start, 1), float(step)))
        assert bool(seen.all())
        assert torch.all(acc.result() == step)  # crossfades of equal values give the value back
    list_a, list_b = window_lists(n, length, overlap)
    assert list_a[-1][1] == list_b[-1][1] == n


@st.composite
def blend_cases(draw):
    t = draw(st.integers(1, 3))
    h = draw(st.integers(8, 40))
    w = draw(st.integers(8, 40))
    scale = draw(st.sampled_from([1, 2]))
    seed = draw(st.integers(0, 2**16))
    density = draw(st.floats(0.9, 0.995))
    feather = draw(st.sampled_from([1, 3, 5, 9, 21]))
    dilation = draw(st.integers(0, 3))
    return t, h, w, scale, seed, density, feather, dilation


@BOUNDED
@given(blend_cases())
def test_blend_leaves_zero_weight_pixels_bit_identical(case):
    t, h, w, scale, seed, density, feather, dilation = case
    gen = torch.Generator().manual_seed(seed)
    original = torch.randint(0, 256, (t, h * scale, w * scale, 3), dtype=torch.uint8, generator=gen)
    generated = torch.randint(0, 256, (t, h, w, 3), dtype=torch.uint8, generator=gen)
    masks = torch.rand(t, h * scale, w * scale, generator=gen) > density
    out = blend_video(original, generated, masks, mask_dilation=dilation, feather=feather, chunk=2)
    alpha = blend_weights(prepare_blend_masks(masks, (h, w), dilation), feather)
    zero = alpha == 0
    assert torch.equal(out[zero], original[zero])
    assert bool(((alpha >= 0) & (alpha <= 1)).all())


@BOUNDED
@given(
    st.integers(1, 30),
    st.booleans(),
    st.integers(2, 12),
    st.integers(2, 12),
    st.integers(1, 3),
)
def test_broadcast_masks_keeps_frame_counts(num_frames, single, h, w, scale):
    count = 1 if single else num_frames
    masks = torch.rand(count, h, w, generator=torch.Generator().manual_seed(num_frames)) > 0.5
    out = broadcast_masks(masks, num_frames, (h * scale, w * scale))
    assert out.shape == (num_frames, h * scale, w * scale) and out.dtype == torch.bool
    assert int(out.sum()) == int(masks.sum()) * scale * scale * (num_frames if single else 1)
