"""Feathered composite (reference section 8), with OpenCV as the oracle for the kernel, border and math."""

import cv2
import numpy as np
import pytest
import torch

from diffueraser_core.blend import (
    blend_frames,
    blend_video,
    blend_weights,
    gaussian_blur,
    gaussian_kernel_1d,
    prepare_blend_masks,
)
from diffueraser_core.errors import InputError
from diffueraser_core.masks import prepare_diffueraser_masks, resize_masks_nearest
from diffueraser_core.video import resize_frames


def frames(t, h, w, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (t, h, w, 3), dtype=torch.uint8, generator=gen)


def box_masks(t, h, w, box):
    masks = torch.zeros(t, h, w, dtype=torch.bool)
    y0, y1, x0, x1 = box
    masks[:, y0:y1, x0:x1] = True
    return masks


@pytest.mark.parametrize("size", [1, 3, 5, 7, 9, 11, 21, 41])
def test_kernel_matches_opencv(size):
    np.testing.assert_allclose(gaussian_kernel_1d(size).numpy(), cv2.getGaussianKernel(size, 0)[:, 0], atol=1e-15)


@pytest.mark.parametrize("size,shape", [(21, (40, 67)), (5, (9, 12)), (21, (6, 15)), (9, (30, 30))])
def test_blur_matches_opencv_including_border(size, shape):
    gen = torch.Generator().manual_seed(size)
    x = (torch.rand(2, *shape, generator=gen) > 0.8).float()
    ours = gaussian_blur(x, size).numpy()
    for i in range(2):
        np.testing.assert_allclose(ours[i], cv2.GaussianBlur(x[i].numpy(), (size, size), 0), atol=1e-6)


def test_weights_are_one_in_the_hole_and_zero_beyond_the_feather():
    masks = box_masks(1, 64, 80, (20, 30, 30, 45))
    alpha = blend_weights(masks, feather=21)[0]
    assert alpha.dtype == torch.float32
    assert torch.all(alpha[masks[0]] == 1)
    # exactly zero farther than feather // 2 = 10 pixels (per axis) from the hole, positive up to it
    ys, xs = torch.meshgrid(torch.arange(64), torch.arange(80), indexing="ij")
    dist = torch.maximum((ys - ys.clamp(20, 29)).abs(), (xs - xs.clamp(30, 44)).abs())
    assert torch.all(alpha[dist > 10] == 0)
    ring = (dist >= 1) & (dist <= 10)
    assert torch.all((alpha[ring] > 0) & (alpha[ring] < 1))
    assert alpha[20 + 5, 29].item() > alpha[25, 25].item() > alpha[25, 21].item()  # fades with distance
    hard = blend_weights(masks, feather=1)[0]
    assert torch.equal(hard, masks[0].float())


def test_composite_matches_reference_math_at_equal_size():
    original, generated = frames(2, 64, 72, 1), frames(2, 64, 72, 2)
    raw = box_masks(2, 64, 72, (10, 30, 20, 40))
    raw[1, 40:50, 50:60] = True
    out = blend_video(original, generated, raw, mask_dilation=4, feather=21)
    prepared = prepare_diffueraser_masks(raw, 4)
    for i in range(2):
        m = prepared[i].numpy().astype(np.uint8) * 255
        blurred = cv2.GaussianBlur(m, (21, 21), 0) / 255.0
        alpha = 1 - (1 - m / 255.0) * (1 - blurred)
        alpha = (alpha * 255).astype(np.uint8)[:, :, None].astype(np.float32) / 255.0
        ref = (generated[i].numpy() * alpha + original[i].numpy() * (1 - alpha)).astype(np.uint8)
        diff = np.abs(out[i].numpy().astype(int) - ref.astype(int))
        assert diff.max() <= 3  # uint8 intermediates and truncation in the reference; float + rounding here
        inside = prepared[i].numpy()
        assert np.array_equal(out[i].numpy()[inside], generated[i].numpy()[inside])


def test_zero_weight_pixels_are_bit_identical_and_generated_is_resized():
    original = frames(3, 96, 128, 3)
    generated = frames(3, 48, 64, 4)  # working size = half
    raw = box_masks(3, 96, 128, (30, 50, 40, 70))
    out = blend_video(original, generated, raw, mask_dilation=2, feather=11, chunk=2)
    assert out.shape == original.shape and out.dtype == torch.uint8
    prepared = prepare_blend_masks(raw, (48, 64), 2)
    at_work_size = prepare_diffueraser_masks(resize_masks_nearest(raw, (48, 64)), 2)
    expected_prepared = resize_masks_nearest(at_work_size, (96, 128))
    assert torch.equal(prepared, expected_prepared)
    alpha = blend_weights(prepared, 11)
    zero = alpha == 0
    assert zero.any() and torch.equal(out[zero], original[zero])
    hole = alpha == 1
    assert torch.equal(out[hole], resize_frames(generated, (96, 128))[hole])
    # the same result as blend_frames with the prepared masks
    assert torch.equal(out, blend_frames(original, generated, prepared, feather=11))


def test_input_errors():
    original, generated = frames(2, 64, 64, 0), frames(2, 64, 64, 1)
    masks = box_masks(2, 64, 64, (0, 5, 0, 5))
    for feather in (0, 20, -3, 2.5):
        with pytest.raises(InputError, match="feather must be an odd integer"):
            blend_video(original, generated, masks, feather=feather)
    with pytest.raises(InputError, match="original 2, generated 1, masks 2"):
        blend_video(original, generated[:1], masks)
    with pytest.raises(InputError, match=r"masks are \(32, 64\)"):
        blend_video(original, generated, masks[:, :32])
    with pytest.raises(InputError, match="mask dilation"):
        blend_video(original, generated, masks, mask_dilation=-1)


def test_blend_video_into_the_original_buffer_equals_a_separate_output():
    # The CLI blends into its input buffer to avoid a second full-size copy of the video.
    g = torch.Generator().manual_seed(7)
    original = torch.randint(0, 256, (5, 40, 48, 3), dtype=torch.uint8, generator=g)
    generated = torch.randint(0, 256, (5, 32, 40, 3), dtype=torch.uint8, generator=g)
    masks = torch.zeros(5, 40, 48, dtype=torch.bool)
    masks[:, 10:20, 12:30] = True
    expected = blend_video(original, generated, masks, mask_dilation=2, feather=5, chunk=2)
    buffer = original.clone()
    result = blend_video(buffer, generated, masks, mask_dilation=2, feather=5, chunk=2, out=buffer)
    assert result.data_ptr() == buffer.data_ptr() and torch.equal(result, expected)


def test_blend_video_out_of_another_shape_is_a_clear_error():
    original = torch.zeros(2, 16, 16, 3, dtype=torch.uint8)
    masks = torch.zeros(2, 16, 16, dtype=torch.bool)
    with pytest.raises(InputError, match=r"DiffuEraser Blend: out must be uint8 \(2, 16, 16, 3\)"):
        blend_video(original, original, masks, out=torch.zeros(2, 16, 16, 3))
