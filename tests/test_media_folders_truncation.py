"""Media matrix, frame folders (VFX numbering, gaps, strays) and truncated files (warned, never silent)."""

import logging

import cv2
import numpy as np
import pytest

from diffueraser_core.errors import InputError
from diffueraser_core.media_in import read_clip
from diffueraser_core.media_out import write_clip

from media_factory import audio_packets, pattern, write_media


def write_frames(folder, names, frames=None):
    folder.mkdir()
    frames = pattern(len(names)) if frames is None else frames
    for name, frame in zip(names, frames):
        assert cv2.imwrite(str(folder / name), np.ascontiguousarray(frame[:, :, ::-1]))
    return frames


def test_vfx_numbering_gaps_and_a_stray_thumbnail(tmp_path, caplog):
    numbers = [1001, 1002, 1004, 1005, 1006]
    frames = write_frames(tmp_path / "shot", [f"shot.{n}.png" for n in numbers])
    cv2.imwrite(str(tmp_path / "shot" / "thumb.png"), frames[0])  # same size, does not belong
    (tmp_path / "shot" / "notes.txt").write_text("not an image")
    with caplog.at_level(logging.WARNING):
        clip = read_clip(tmp_path / "shot")
    assert "thumb.png" in caplog.text and "left out" in caplog.text
    assert "1 gap(s)" in caplog.text and "(1003)" in caplog.text
    assert clip.frames.shape[0] == 5 and np.array_equal(clip.frames.numpy(), frames)
    assert clip.info.frame_numbers == numbers and clip.info.pts == [0, 1, 3, 4, 5]  # the gap stays a gap in time
    out = write_clip(tmp_path / "out", clip.frames, clip.info)
    assert sorted(p.name for p in out.iterdir()) == [f"shot.{n}.png" for n in numbers]
    # into a video the gap is a held frame: timestamps 0, 1, 3, 4, 5 frames at 24 fps
    video = write_clip(tmp_path / "out.mkv", clip.frames, clip.info)
    times = read_clip(video).info.times()
    assert [round(t * 24) for t in times] == [0, 1, 3, 4, 5]


def test_padding_and_natural_order(tmp_path):
    write_frames(tmp_path / "a", ["f_7.png", "f_8.png", "f_9.png", "f_10.png"])
    clip = read_clip(tmp_path / "a")
    assert clip.info.frame_names == ["f_7.png", "f_8.png", "f_9.png", "f_10.png"]
    out = write_clip(tmp_path / "out", clip.frames, clip.info)
    assert sorted(p.name for p in out.iterdir()) == sorted(["f_7.png", "f_8.png", "f_9.png", "f_10.png"])
    write_frames(tmp_path / "b", ["0098.png", "0099.png", "0100.png"])
    out = write_clip(tmp_path / "out_b", read_clip(tmp_path / "b").frames, read_clip(tmp_path / "b").info)
    assert sorted(p.name for p in out.iterdir()) == ["0098.png", "0099.png", "0100.png"]


def test_duplicate_frame_numbers_are_an_error(tmp_path):
    write_frames(tmp_path / "d", ["s.01.png", "s.1.png", "s.2.png"])
    with pytest.raises(InputError, match="several files for frame number"):
        read_clip(tmp_path / "d")


@pytest.mark.parametrize("fraction", [0.75, 0.8, 0.9, 0.95, 0.99])
@pytest.mark.parametrize("faststart", [True, False], ids=["index-first", "index-last"])
def test_an_mp4_cut_short_is_never_silent(tmp_path, caplog, fraction, faststart):
    options = {"movflags": "+faststart"} if faststart else None
    full = write_media(tmp_path / "full.mp4", pattern(12), audio="aac", container_options=options).read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(full[: int(len(full) * fraction)])
    with caplog.at_level(logging.WARNING):
        try:
            clip = read_clip(cut)
        except InputError as exc:  # refusing is fine too: never a silent short result
            assert "cut.mp4" in str(exc)
            return
    if clip.frames.shape[0] == 12 and "truncated" not in caplog.text:
        # the index sits at the end and the cut only took bytes nothing refers to: every packet is still there
        assert not faststart
        assert audio_packets(cut) == audio_packets(tmp_path / "full.mp4")
        return
    assert "truncated" in caplog.text and "cut short" in caplog.text
