"""The ordered clip writer (media_out.open_clip_writer): chunk by chunk it writes what write_clip writes for the
whole clip; a range out of order, overlapping or missing is an error that leaves nothing behind; an exception or an
interrupt between chunks leaves an existing output untouched and no temporary file."""

import os
from fractions import Fraction

import cv2
import numpy as np
import pytest
import torch

from diffueraser_core.errors import InputError
from diffueraser_core.media_in import read_clip
from diffueraser_core.media_out import OutputOptions, check_output_target, open_clip_writer, write_clip

from media_factory import audio_packets, pattern, stream_info, write_media

CHUNKS = (2, 3, 1, 1)  # uneven ranges over 7 frames


def write_in_chunks(path, clip, options=None, sizes=CHUNKS):
    events = []
    target = check_output_target(path, options=options or OutputOptions())
    with open_clip_writer(target, clip.info, progress=lambda *a: events.append(a)) as writer:
        start = 0
        for size in sizes:
            stop = start + size
            part = clip.original[start:stop] if clip.original is not None else None
            writer.write(start, clip.frames[start:stop], part)
            start = stop
    assert events == [("write", i, len(clip.info.pts)) for i in range(1, len(clip.info.pts) + 1)]
    return path


def folder_files(folder):
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def png_plates(folder, frames):
    folder.mkdir()
    for n, frame in enumerate(frames):
        cv2.imwrite(str(folder / f"plate.{1001 + n}.png"), np.ascontiguousarray(frame[:, :, [2, 1, 0, 3][: frame.shape[2]]]))
    return folder


@pytest.mark.parametrize("case", ["mp4-vfr-aac", "mkv-ffv1-pcm", "mkv-ffv1-16bit-alpha", "png-folder-16bit-alpha"])
def test_chunks_write_what_write_clip_writes_for_the_whole_clip(tmp_path, case):
    options = OutputOptions()
    if case == "mp4-vfr-aac":
        src = write_media(tmp_path / "in.mp4", pattern(7), pts=[0, 400, 900, 1300, 2000, 2300, 2900],
                          time_base=Fraction(1, 10000), fps=20, audio="aac")
        suffix = ".mp4"
    elif case == "mkv-ffv1-pcm":
        src = write_media(tmp_path / "in.mkv", pattern(7), codec="ffv1", pix_fmt="bgr0", audio="pcm_s16le")
        suffix, options = ".mkv", OutputOptions(codec="ffv1")
    elif case == "mkv-ffv1-16bit-alpha":
        src = png_plates(tmp_path / "in", pattern(7, depth=16, alpha=True))
        suffix, options = ".mkv", OutputOptions(codec="ffv1")
    else:
        src = png_plates(tmp_path / "in", pattern(7, depth=16, alpha=True))
        suffix = ""
    clip = read_clip(src)
    whole = write_clip(check_output_target(tmp_path / f"whole{suffix}", options=options), clip.frames, clip.info,
                       original=clip.original)
    chunked = write_in_chunks(tmp_path / f"chunked{suffix}", clip, options)
    if suffix == "":
        assert folder_files(chunked) == folder_files(whole)  # same names (plate.1001.png ...), same bytes
        return
    if suffix == ".mp4":  # the same code path, the same file byte for byte (Matroska adds a random segment UID)
        assert chunked.read_bytes() == whole.read_bytes()
    a, b = read_clip(whole), read_clip(chunked)
    assert torch.equal(a.frames, b.frames)
    if clip.original is not None:
        assert torch.equal(a.original, b.original) and torch.equal(b.original, clip.original)  # lossless, alpha kept
    assert stream_info(chunked)["pts"] == stream_info(whole)["pts"]
    if clip.info.audio:
        assert audio_packets(chunked) == audio_packets(whole) and len(audio_packets(chunked)) > 0
    assert not any(".partial" in name for name in os.listdir(tmp_path))


@pytest.fixture
def clip(tmp_path):
    return read_clip(write_media(tmp_path / "in.mkv", pattern(6), codec="ffv1", pix_fmt="bgr0"))


BAD_RANGES = {
    "a gap": ([(0, 2), (3, 5)], "frames 3..5 given to the writer after frames 0..2"),
    "an overlap": ([(0, 3), (2, 4)], "frames 2..4 given to the writer after frames 0..3"),
    "the same range twice": ([(0, 2), (0, 2)], "frames 0..2 given to the writer after frames 0..2"),
    "past the end": ([(0, 4), (4, 7)], "frames 4..7 given to the writer of a clip of 6 frames"),
    "too few (close)": ([(0, 4)], "4 of the clip's 6 frames were given to the writer"),
}


@pytest.mark.parametrize("name", BAD_RANGES)
@pytest.mark.parametrize("suffix", [".mp4", ""])
def test_ranges_out_of_order_overlapping_or_short_are_errors_that_leave_nothing(tmp_path, clip, name, suffix):
    ranges, message = BAD_RANGES[name]
    out = tmp_path / f"out{suffix}"
    if suffix:
        out.write_bytes(b"an earlier result")
    before = sorted(os.listdir(tmp_path))
    frames = torch.cat([clip.frames, clip.frames])  # more frames than the clip has, for the range past its end
    with pytest.raises(InputError, match="internal error") as raised:
        with open_clip_writer(out, clip.info) as writer:
            for start, stop in ranges:
                writer.write(start, frames[start:stop])
    assert message in str(raised.value)
    assert sorted(os.listdir(tmp_path)) == before  # no temporary file, no (new) output
    if suffix:
        assert out.read_bytes() == b"an earlier result"
    with pytest.raises(InputError, match="already aborted"):  # a failed writer takes nothing more
        writer.write(writer.written, clip.frames[writer.written:])


@pytest.mark.parametrize("failure", [RuntimeError("a chunk failed"), KeyboardInterrupt()], ids=["error", "ctrl-c"])
@pytest.mark.parametrize("suffix", [".mp4", ".png", ""])
def test_an_exception_between_chunks_keeps_the_existing_output(tmp_path, clip, failure, suffix):
    info = clip.info
    frames = clip.frames
    if suffix == ".png":  # a single image: one frame, so the failure comes before it is written
        info, frames = read_clip(write_media(tmp_path / "one.mkv", pattern(1), codec="ffv1", pix_fmt="bgr0")).info, \
            clip.frames[:1]
    out = tmp_path / f"out{suffix}"
    if suffix == "":
        write_clip(out, frames, info)
        earlier = folder_files(out)
    else:
        out.write_bytes(b"an earlier result")
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(type(failure)):
        with open_clip_writer(out, info) as writer:
            writer.write(0, frames[:1])
            raise failure
    assert sorted(os.listdir(tmp_path)) == before and not any(".partial" in n for n in before)
    if suffix == "":
        assert folder_files(out) == earlier
    else:
        assert out.read_bytes() == b"an earlier result"


def test_write_clip_keeps_its_checks_and_the_writer_checks_each_range(tmp_path, clip):
    with pytest.raises(InputError, match="6 timestamps for 5 frames"):
        write_clip(tmp_path / "out.mp4", clip.frames[:5], clip.info)
    with pytest.raises(InputError, match="image name but there are 6 frames"):
        open_clip_writer(tmp_path / "out.png", clip.info)
    with pytest.raises(InputError, match="frames of 32x48 for a clip of 64x48"):
        with open_clip_writer(tmp_path / "out.mkv", clip.info) as writer:
            writer.write(0, clip.frames[:2, :, :32].contiguous())
    assert os.listdir(tmp_path) == ["in.mkv"]
    with pytest.raises(InputError, match="original was given for some frames only"):
        with open_clip_writer(tmp_path / "out", clip.info) as writer:
            writer.write(0, clip.frames[:2], clip.frames[:2])
            writer.write(2, clip.frames[2:])
    assert os.listdir(tmp_path) == ["in.mkv"]
