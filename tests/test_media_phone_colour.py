"""Media matrix, phone footage and colour: display-matrix rotation, variable frame rate with audio, colour tags."""

from fractions import Fraction

import av
import numpy as np
import pytest
import torch

from diffueraser_core.media_in import read_clip
from diffueraser_core.media_masks import read_masks_for
from diffueraser_core.media_out import write_clip

from media_factory import H, W, audio_packets, pattern, stream_info, write_media

BT709 = dict(color_range=1, colorspace=1, color_primaries=1, color_trc=1)


def mean_abs(a, b):
    return float(np.abs(np.asarray(a, dtype=np.int64) - np.asarray(b, dtype=np.int64)).mean())


@pytest.mark.parametrize("rotation", [90, 180, 270])
def test_rotated_phone_video_is_read_upright_and_written_upright(tmp_path, rotation):
    stored = pattern(6)
    src = write_media(tmp_path / "phone.mp4", stored, rotation=rotation, options={"crf": "8"})
    clip = read_clip(src)
    upright = np.rot90(stored, rotation // 90, axes=(1, 2))
    assert clip.info.rotation == rotation
    assert tuple(clip.frames.shape[1:3]) == upright.shape[1:3]
    assert mean_abs(clip.frames, upright) < 3 < mean_abs(np.rot90(clip.frames.numpy(), 2, axes=(1, 2)), upright)
    out = write_clip(tmp_path / "out.mp4", clip.frames, clip.info)
    info = stream_info(out)
    assert info["rotation"] == 0  # upright pixels, no tag: every player shows it the same way
    back = read_clip(out).frames
    assert back.shape == clip.frames.shape and mean_abs(back, upright) < 6  # generation loss of crf 18 only


def test_a_mask_drawn_on_the_upright_frame_fits_the_upright_frames(tmp_path):
    stored = pattern(4)
    src = write_media(tmp_path / "phone.mp4", stored, rotation=90)
    clip = read_clip(src)
    h, w = clip.info.height, clip.info.width
    assert (h, w) == (W, H)  # portrait
    mask = np.zeros((h, w), np.uint8)
    mask[5:20, 30:40] = 255
    import cv2

    cv2.imwrite(str(tmp_path / "mask.png"), mask)
    masks = read_masks_for(tmp_path / "mask.png", clip.info)
    assert masks.shape == (4, h, w) and torch.equal(masks[0], torch.from_numpy(mask > 127))
    # a landscape mask (the stored orientation) is another aspect ratio: refused, not stretched
    cv2.imwrite(str(tmp_path / "landscape.png"), np.zeros((H, W), np.uint8))
    from diffueraser_core.errors import InputError

    with pytest.raises(InputError, match="another aspect ratio"):
        read_masks_for(tmp_path / "landscape.png", clip.info)


def test_variable_frame_rate_keeps_every_timestamp_and_the_audio_in_sync(tmp_path):
    pts = [0, 1000, 1500, 3500, 4000, 7000, 7400, 9000]  # 1/10000 s: gaps from 40 ms to 300 ms
    src = write_media(tmp_path / "vfr.mp4", pattern(len(pts)), pts=pts, time_base=Fraction(1, 10000), fps=10,
                      audio="aac")
    clip = read_clip(src)
    assert [Fraction(p) * clip.info.time_base for p in clip.info.pts] == [Fraction(p, 10000) for p in pts]
    src_pts = stream_info(src)["pts"]
    src_audio = audio_packets(src)
    for suffix in (".mp4", ".mkv", ".mov"):
        out = write_clip(tmp_path / f"out{suffix}", clip.frames, clip.info)
        out_pts = stream_info(out)["pts"]
        # Matroska shifts every stream by the encoder delay (no negative times): compare from the first frame
        assert [p - out_pts[0] for p in out_pts] == [p - src_pts[0] for p in src_pts], suffix
        # the audio is the source's, packet for packet, at the same times relative to the video
        assert [(d, t - out_pts[0]) for d, t in audio_packets(out)] == [(d, t - src_pts[0]) for d, t in src_audio]


def test_bt709_input_is_converted_and_tagged_bt709(tmp_path):
    frames = pattern(4)
    frames[:, :, :16] = [230, 20, 20]  # saturated colours: where BT.601 and BT.709 differ most
    frames[:, :, 16:32] = [20, 200, 40]
    src = write_media(tmp_path / "hd.mp4", frames, colour=BT709, options={"crf": "4"})
    clip = read_clip(src)
    assert (clip.info.colour.range, clip.info.colour.matrix) == (1, 1)
    assert mean_abs(clip.frames, frames) < 3  # read with the BT.709 matrix
    out = write_clip(tmp_path / "out.mp4", clip.frames, clip.info)
    assert stream_info(out)["tags"] == BT709
    assert mean_abs(read_clip(out).frames, clip.frames) < 2.5
    with av.open(str(out)) as container:  # read the output with the wrong (BT.601) matrix: visibly off
        frame = next(container.decode(video=0))
        wrong = frame.to_ndarray(format="rgb24", src_colorspace="ITU601")
    assert mean_abs(wrong, clip.frames[0]) > 4


def test_untagged_input_stays_untagged_and_round_trips(tmp_path):
    src = write_media(tmp_path / "plain.mp4", pattern(4), options={"crf": "4"})
    clip = read_clip(src)
    assert not clip.info.colour.tagged
    out = write_clip(tmp_path / "out.mp4", clip.frames, clip.info)
    assert stream_info(out)["tags"] == dict(color_range=0, colorspace=2, color_primaries=2, color_trc=2)
    assert mean_abs(read_clip(out).frames, clip.frames) < 2.5
