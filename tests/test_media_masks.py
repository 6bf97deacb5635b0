"""Media matrix, masks: alpha and colour conventions, coverage warnings, timestamps, aspect ratio, resize once."""

import logging

import cv2
import numpy as np
import pytest
import torch

from diffueraser_core.errors import InputError
from diffueraser_core.masks import resize_masks_nearest
from diffueraser_core.media_in import read_clip
from diffueraser_core.media_masks import check_mask_coverage, mask_from_array, read_masks_for

from media_factory import H, W, pattern, write_media

BOX = (slice(10, 30), slice(20, 44))


def expected_box(h=H, w=W):
    m = torch.zeros(h, w, dtype=torch.bool)
    m[BOX] = True
    return m


def png(path, array):
    if array.ndim == 3:
        array = np.ascontiguousarray(array[:, :, [2, 1, 0, 3][: array.shape[2]]])
    assert cv2.imwrite(str(path), array)
    return path


@pytest.fixture()
def video(tmp_path):
    return read_clip(write_media(tmp_path / "in.mp4", pattern(6))).info


@pytest.mark.parametrize("colour", [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)],
                         ids=["red", "green", "blue", "white"])
def test_colour_masks_on_black_are_read_whatever_the_channel(tmp_path, video, colour):
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[BOX] = colour
    masks = read_masks_for(png(tmp_path / "m.png", rgb), video)
    assert masks.shape == (6, H, W) and all(torch.equal(m, expected_box()) for m in masks)


def test_alpha_only_mask_and_rgba_on_white_transparent_background(tmp_path, video, caplog):
    alpha_only = np.zeros((H, W, 4), np.uint8)  # black everywhere, the shape only in alpha
    alpha_only[..., 3][BOX] = 255
    assert torch.equal(read_masks_for(png(tmp_path / "a.png", alpha_only), video)[0], expected_box())
    on_white = np.full((H, W, 4), 255, np.uint8)  # white everywhere, transparent background
    on_white[..., 3] = 0
    on_white[..., 3][BOX] = 255
    masks = read_masks_for(png(tmp_path / "w.png", on_white), video)
    assert torch.equal(masks[0], expected_box())  # not 100 %
    assert "alpha is used" not in caplog.text  # nothing to guess: the colour draws no other shape
    black_shape = on_white.copy()
    black_shape[..., :3][BOX] = 0  # a black opaque shape: alpha still decides, and says it had to choose
    with caplog.at_level(logging.WARNING):
        assert torch.equal(read_masks_for(png(tmp_path / "b.png", black_shape), video)[0], expected_box())
    assert "alpha is used" in caplog.text
    opaque = np.zeros((H, W, 4), np.uint8)  # fully opaque RGBA: the colour decides
    opaque[..., 3] = 255
    opaque[..., 0][BOX] = 255
    assert torch.equal(mask_from_array(opaque), expected_box())


def test_sixteen_bit_gray_mask(tmp_path, video):
    gray = np.zeros((H, W), np.uint16)
    gray[BOX] = 65535
    gray[0, 0] = 30000  # below the middle: kept
    assert torch.equal(read_masks_for(png(tmp_path / "g.png", gray), video)[0], expected_box())


def test_empty_mask_is_said_and_an_inverted_one_refused(caplog):
    empty = torch.zeros(3, H, W, dtype=torch.bool)
    with caplog.at_level(logging.WARNING):
        assert check_mask_coverage(empty, "MASK") == 0.0
    assert "the mask is empty" in caplog.text and "output is the input" in caplog.text
    inverted = ~torch.zeros(3, H, W, dtype=torch.bool)
    inverted[:, :5, :5] = False
    with pytest.raises(InputError, match=r"covers 99% .*inverted.*--invert-mask.*--allow-large-mask"):
        check_mask_coverage(inverted, "MASK")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        check_mask_coverage(inverted, "MASK", allow_large=True)
    assert "may be inverted" in caplog.text
    assert check_mask_coverage(expected_box().expand(3, H, W), "MASK") == pytest.approx(480 / (H * W))


def test_mask_video_at_twice_the_frame_rate_is_matched_by_time(tmp_path):
    video = read_clip(write_media(tmp_path / "in.mp4", pattern(6), fps=12)).info
    # 12 mask frames at 24 fps; frame k has a bar at column 4k: the video's frame i must get mask frame 2i
    frames = np.zeros((12, H, W, 3), np.uint8)
    for k in range(12):
        frames[k, :, 4 * k : 4 * k + 4] = 255
    mask_file = write_media(tmp_path / "mask.mkv", frames, codec="ffv1", pix_fmt="bgr0", fps=24)
    masks = read_masks_for(mask_file, video)
    for i in range(6):
        cols = torch.nonzero(masks[i].any(0)).flatten().tolist()
        assert cols == list(range(8 * i, 8 * i + 4)), i
    # a mask video shorter than the video is an error, not a silent repeat
    short = write_media(tmp_path / "short.mkv", frames[:5], codec="ffv1", pix_fmt="bgr0", fps=24)
    with pytest.raises(InputError, match="lasts"):
        read_masks_for(short, video)


def test_mask_folder_count_mismatch_is_an_error(tmp_path, video):
    folder = tmp_path / "masks"
    folder.mkdir()
    for i in range(3):
        png(folder / f"{i:04d}.png", np.zeros((H, W), np.uint8))
    with pytest.raises(InputError, match="has 3 frames but the video has 6"):
        read_masks_for(folder, video)


def test_mask_of_another_aspect_ratio_is_refused_and_another_resolution_kept_at_its_size(tmp_path, video):
    with pytest.raises(InputError, match="another aspect ratio.*not stretched"):
        read_masks_for(png(tmp_path / "wide.png", np.zeros((H, 2 * W), np.uint8)), video)
    big = np.zeros((3 * H, 3 * W), np.uint8)
    big[30:90, 60:132] = 255
    masks = read_masks_for(png(tmp_path / "big.png", big), video)
    assert masks.shape == (6, 3 * H, 3 * W)  # the file's own size: each stage resizes it once


def test_masks_are_resized_once_straight_to_the_working_size():
    """Issue 15 item 7: the sampler's mask comes from the file's resolution in one nearest resize, not through the
    video size first (which moves edges by a pixel)."""
    from diffueraser_core.blend import prepare_blend_masks
    from diffueraser_core.pipeline import prepare_sampling_inputs
    from diffueraser_core.temporal_sampling import build_conditioning
    from diffueraser_core.video import working_size

    class BlockMeanCodec:
        """Each 8x8 block's mean as the 'latent': sees where the hole blacked the frame out."""

        def encode(self, frames):
            x = frames.permute(0, 3, 1, 2)[:, :1].to(torch.float32)
            return torch.nn.functional.avg_pool2d(x, 8).repeat(1, 4, 1, 1)

    video_hw = (100, 150)
    work = working_size(*video_hw)
    assert work == (96, 144)
    native = torch.zeros(2, 300, 450, dtype=torch.bool)  # boxes with edges at every native pixel position
    rng = np.random.default_rng(0)
    for t in range(2):
        for _ in range(25):
            y, x, h, w = rng.integers(0, 260), rng.integers(0, 410), rng.integers(12, 40), rng.integers(12, 40)
            native[t, y : y + h, x : x + w] = True
    frames = torch.full((2, *video_hw, 3), 200, dtype=torch.uint8)
    kept = prepare_sampling_inputs(frames, native)
    assert kept.shape == native.shape  # not resized to the video size on the way in
    once = resize_masks_nearest(native, work)
    twice = resize_masks_nearest(resize_masks_nearest(native, video_hw), work)
    assert not torch.equal(once, twice)  # the two routes do differ on this mask
    latent_hw = (work[0] // 8, work[1] // 8)
    cond = build_conditioning(frames, kept, latent_hw, BlockMeanCodec(), mask_dilation=0)
    ref_once = build_conditioning(frames, once, latent_hw, BlockMeanCodec(), mask_dilation=0)
    ref_twice = build_conditioning(frames, twice, latent_hw, BlockMeanCodec(), mask_dilation=0)
    assert torch.equal(cond.masked_latents, ref_once.masked_latents)
    assert not torch.equal(cond.masked_latents, ref_twice.masked_latents)
    blend_mask = prepare_blend_masks(native, work, 0, video_hw)
    assert torch.equal(blend_mask, prepare_blend_masks(once, work, 0, video_hw))


def test_the_prior_resizes_a_mask_once_from_its_own_size():
    """Issue 15 item 7 for the ProPainter stage: a 3x mask goes straight to the prior's working size. With one
    resize this mask's only pixel vanishes there (no network runs); through the video size first it would not."""
    from diffueraser_core.prior_propainter import ProPainterNets, ProPainterSettings, run_propainter_prior
    from diffueraser_core.runtime import StandaloneRuntime

    class Forbidden:
        def acquire(self, *args, **kwargs):
            raise AssertionError("a network was used")

        def release(self):
            pass

    frames = torch.from_numpy(pattern(3, 128, 128))
    native = torch.zeros(3, 384, 384, dtype=torch.bool)
    native[:, 100, 100] = True  # sampled by nearest 384 -> 128 -> 64 (rows 6i+4), not by 384 -> 64 (rows 6i+3)
    settings = ProPainterSettings(resize_ratio=0.5)
    nets = ProPainterNets(Forbidden(), Forbidden(), Forbidden())
    result = run_propainter_prior(frames, native, nets, settings, StandaloneRuntime("cpu"))
    assert torch.equal(result.masks, resize_masks_nearest(native, (128, 128)))
    assert bool(result.masks.any())
    with pytest.raises(AssertionError, match="a network was used"):
        run_propainter_prior(frames, resize_masks_nearest(native, (128, 128)), nets, settings, StandaloneRuntime("cpu"))
