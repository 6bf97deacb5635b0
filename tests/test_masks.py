"""Mask conversion and morphology, checked against OpenCV / scipy (oracles only in tests)."""

import cv2
import numpy as np
import pytest
import scipy.ndimage
import torch

from diffueraser_core.errors import InputError
from diffueraser_core.masks import (
    MASK_CHUNK,
    broadcast_masks,
    dilate_cross,
    dilate_square,
    erode_square,
    mask_to_bool,
    prepare_diffueraser_masks,
    resize_masks_nearest,
)

RECT3 = cv2.getStructuringElement(cv2.MORPH_RECT, (3, 3))


def random_masks(frames=3, h=29, w=37, density=0.8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    masks = torch.rand(frames, h, w, generator=gen) > density
    masks[0, :4, :] = True  # touches the border
    masks[-1, :, -3:] = True
    return masks


@pytest.mark.parametrize("iterations", [1, 2, 5, 8])
def test_square_ops_match_opencv(iterations):
    masks = random_masks()
    dilated, eroded = dilate_square(masks, iterations), erode_square(masks, iterations)
    assert dilated.dtype == eroded.dtype == torch.bool
    for i, m in enumerate(masks.numpy().astype(np.uint8)):
        assert np.array_equal(dilated[i].numpy(), cv2.dilate(m, RECT3, iterations=iterations).astype(bool))
        assert np.array_equal(eroded[i].numpy(), cv2.erode(m, RECT3, iterations=iterations).astype(bool))


@pytest.mark.parametrize("iterations", [1, 3, 8])
def test_cross_dilation_matches_scipy(iterations):
    masks = random_masks(density=0.95)
    out = dilate_cross(masks, iterations)
    for i, m in enumerate(masks.numpy()):
        assert np.array_equal(out[i].numpy(), scipy.ndimage.binary_dilation(m, iterations=iterations))
    # diamond, not square: one pixel grows to a cross after one iteration
    dot = torch.zeros(1, 5, 5, dtype=torch.bool)
    dot[0, 2, 2] = True
    assert dilate_cross(dot, 1)[0].sum() == 5 and dilate_square(dot, 1)[0].sum() == 9


def test_prepare_diffueraser_masks_is_erode_then_dilate():
    masks = random_masks(frames=MASK_CHUNK + 3, h=24, w=30, density=0.7)  # more frames than one chunk
    out = prepare_diffueraser_masks(masks, iterations=8)
    for i, m in enumerate(masks.numpy().astype(np.uint8)):
        expected = cv2.dilate(cv2.erode(m, RECT3, iterations=1), RECT3, iterations=8)
        assert np.array_equal(out[i].numpy(), expected.astype(bool))
    # an isolated pixel disappears (eroded) instead of growing into a 17x17 square
    dot = torch.zeros(1, 20, 20, dtype=torch.bool)
    dot[0, 10, 10] = True
    assert not prepare_diffueraser_masks(dot, 8).any()


def test_erosion_does_not_eat_from_the_border_and_zero_iterations_copy():
    full = torch.ones(2, 9, 11, dtype=torch.bool)
    assert erode_square(full, 3).all()
    masks = random_masks()
    for op in (dilate_square, erode_square, dilate_cross):
        out = op(masks, 0)
        assert torch.equal(out, masks) and out.data_ptr() != masks.data_ptr()
    with pytest.raises(InputError, match="non-negative"):
        dilate_square(masks, -1)
    with pytest.raises(InputError, match="bool"):
        dilate_square(masks.float(), 1)


def test_mask_to_bool_layouts_and_threshold():
    mask = torch.tensor([[0.0, 0.5, 0.51, 1.0]])
    assert mask_to_bool(mask).tolist() == [[[False, False, True, True]]]
    assert mask_to_bool(mask, threshold=0.0).tolist() == [[[False, True, True, True]]]
    batch = torch.rand(4, 6, 7)
    assert torch.equal(mask_to_bool(batch), batch > 0.5)
    assert torch.equal(mask_to_bool(batch.unsqueeze(-1)), batch > 0.5)
    assert torch.equal(mask_to_bool(batch > 0.3), batch > 0.3)


def test_mask_to_bool_from_rgb_image_uses_luma():
    image = torch.zeros(2, 3, 4, 3)
    image[0, 0, 0] = torch.tensor([1.0, 1.0, 1.0])  # white -> hole
    image[0, 0, 1] = torch.tensor([1.0, 0.0, 0.0])  # red: luma 0.299 -> kept
    image[1, 2, 3] = torch.tensor([0.0, 1.0, 0.0])  # green: luma 0.587 -> hole
    out = mask_to_bool(image, node="Test")
    assert out.shape == (2, 3, 4)
    assert out.sum() == 2 and out[0, 0, 0] and out[1, 2, 3] and not out[0, 0, 1]


def test_mask_to_bool_rejects_bad_values_with_node_name():
    bad = torch.zeros(2, 4, 4)
    bad[0, 0, 0] = 1.5
    bad[1, 1, 1] = -0.25
    with pytest.raises(InputError, match=r"^My Node: mask has 2 values outside 0\.\.1 \(from -0\.25 to 1\.5\)"):
        mask_to_bool(bad, node="My Node")
    bad = torch.zeros(1, 4, 4)
    bad[0, :, 0] = float("nan")
    with pytest.raises(InputError, match=r"^My Node: mask contains 4 NaN/inf"):
        mask_to_bool(bad, node="My Node")
    with pytest.raises(InputError, match="shape"):
        mask_to_bool(torch.zeros(1, 2, 3, 4, 5), node="My Node")


def test_resize_nearest_matches_opencv_nearest_exact():
    masks = random_masks(frames=2, h=23, w=31, density=0.5)
    for size in [(10, 12), (46, 62), (23, 50), (64, 17)]:
        out = resize_masks_nearest(masks, size)
        for i, m in enumerate(masks.numpy().astype(np.uint8)):
            ref = cv2.resize(m, (size[1], size[0]), interpolation=cv2.INTER_NEAREST_EXACT).astype(bool)
            assert np.array_equal(out[i].numpy(), ref)


def test_broadcast_masks():
    one = random_masks(frames=1, h=8, w=10, density=0.5)
    out = broadcast_masks(one, 5, (8, 10), node="N")
    assert out.shape == (5, 8, 10) and out.is_contiguous()
    assert all(torch.equal(out[i], one[0]) for i in range(5))
    many = random_masks(frames=5, h=8, w=10, density=0.5)
    assert torch.equal(broadcast_masks(many, 5, (8, 10)), many)
    resized = broadcast_masks(many, 5, (16, 20))
    assert torch.equal(resized, resize_masks_nearest(many, (16, 20)))
    with pytest.raises(InputError, match=r"^N: mask has 3 frames but the video has 5"):
        broadcast_masks(many[:3], 5, (8, 10), node="N")
