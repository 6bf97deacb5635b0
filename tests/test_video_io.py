"""IMAGE <-> uint8, working size, resizing, and real-codec file round trips (PyAV)."""

import os
from fractions import Fraction

import av
import cv2
import numpy as np
import pytest
import torch

from diffueraser_core import video
from diffueraser_core.errors import InputError
from diffueraser_core.media_in import read_video
from diffueraser_core.media_masks import read_masks
from diffueraser_core.media_out import write_video
from diffueraser_core.video import (
    as_fps_fraction,
    image_to_uint8,
    resize_frames,
    uint8_to_image,
    working_size,
)


def smooth_frames(t, h, w):
    """Gradients that move per frame: compress well, so lossy round trips stay close."""
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    out = torch.empty(t, h, w, 3, dtype=torch.uint8)
    for i in range(t):
        out[i, ..., 0] = ((xs * 255) // max(w - 1, 1) + i * 7) % 256
        out[i, ..., 1] = (ys * 255) // max(h - 1, 1)
        out[i, ..., 2] = 128 + i
    return out


def make_video_with_audio(path, codec="aac", fmt="fltp", layout="mono", frames=10, fps=25):
    with av.open(str(path), "w") as out:
        vstream = out.add_stream("libx264", rate=fps)
        vstream.width, vstream.height, vstream.pix_fmt = 64, 64, "yuv420p"
        astream = out.add_stream(codec, rate=16000)
        astream.layout = layout
        for i, frame in enumerate(smooth_frames(frames, 64, 64)):
            vf = av.VideoFrame.from_ndarray(frame.numpy(), format="rgb24")
            vf.pts = i
            out.mux(vstream.encode(vf))
        out.mux(vstream.encode(None))
        channels = 1 if layout == "mono" else 2
        for k in range(frames * 16000 // fps // 1024 + 1):
            wave = np.sin(np.arange(1024) * 0.05 + k) * 0.3
            if fmt == "s16":
                data = np.repeat((wave * 32767).astype(np.int16), channels)[None]
            else:
                data = np.repeat(wave.astype(np.float32)[None], channels, axis=0)
            af = av.AudioFrame.from_ndarray(data, format=fmt, layout=layout)
            af.sample_rate, af.pts = 16000, k * 1024
            out.mux(astream.encode(af))
        out.mux(astream.encode(None))
    return path


# ---------------------------------------------------------------------------------------------- conversions


def test_uint8_image_round_trip_is_exact():
    values = torch.arange(256, dtype=torch.uint8).view(1, 16, 16, 1).expand(20, 16, 16, 3).contiguous()
    image = uint8_to_image(values, chunk=7)
    assert image.dtype == torch.float32 and image.max() == 1.0 and image.min() == 0.0
    assert torch.equal(image_to_uint8(image, chunk=7), values)


def test_image_to_uint8_channels_clamping_and_rounding():
    gray = torch.tensor([0.0, 0.5, 1.0, 1.2, -0.1, 0.998]).view(1, 1, 6, 1)
    out = image_to_uint8(gray)
    assert out.shape == (1, 1, 6, 3)
    assert out[0, 0, :, 0].tolist() == [0, 128, 255, 255, 0, 254]
    assert torch.equal(out[..., 0], out[..., 2])
    rgba = torch.rand(2, 3, 4, 4)
    assert torch.equal(image_to_uint8(rgba), image_to_uint8(rgba[..., :3].contiguous()))
    with pytest.raises(InputError, match="1, 3 or 4 channels"):
        image_to_uint8(torch.rand(1, 3, 4, 2))
    with pytest.raises(InputError, match=r"\[T,H,W,C\]"):
        image_to_uint8(torch.rand(3, 4, 3))


def test_image_to_uint8_names_node_and_counts_nonfinite():
    image = torch.rand(20, 4, 4, 3)
    image[0, 0, 0, 0] = float("nan")
    image[19, 1, 1, :] = float("inf")
    with pytest.raises(InputError, match=r"^Load Video: image contains 4 NaN/inf values"):
        image_to_uint8(image, node="Load Video")


# ---------------------------------------------------------------------------------------------- sizes


@pytest.mark.parametrize(
    "hw,max_side,expected",
    [
        ((1080, 1920), 960, (536, 960)),
        ((1920, 1080), 960, (960, 536)),
        ((720, 1280), 960, (536, 960)),  # 720 / (1280 / 960) = 540 -> 536
        ((480, 854), 960, (480, 848)),
        ((2160, 3840), 1280, (720, 1280)),
        ((1000, 1000), 1920, (1000, 1000)),
        ((100, 203), 960, (96, 200)),
        ((64, 64), 256, (64, 64)),
        ((4096, 4096), 256, (256, 256)),
        ((577, 1000), 999, (576, 992)),  # 1000/999: int(577/1.001001) = 576, int(1000/1.001001) = 999 -> 992
    ],
)
def test_working_size_table(hw, max_side, expected):
    assert working_size(*hw, max_side=max_side) == expected


def test_working_size_errors():
    with pytest.raises(InputError, match=r"^Node: frames of 100x63 are too small"):
        working_size(63, 100, node="Node")
    with pytest.raises(InputError, match="too large"):
        working_size(100, 4097)
    for bad in (255, 1921, 960.5):
        with pytest.raises(InputError, match="max side"):
            working_size(720, 1280, max_side=bad)


def test_resize_frames_matches_pil_and_keeps_same_size():
    pil = pytest.importorskip("PIL.Image")
    frames = torch.randint(0, 256, (3, 50, 70, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert resize_frames(frames, (50, 70)) is frames
    for size in [(24, 40), (100, 140), (50, 35), (64, 70)]:
        ours = resize_frames(frames, size, chunk=2).numpy().astype(int)
        ref = np.stack(
            [np.asarray(pil.fromarray(f.numpy()).resize((size[1], size[0]), pil.BICUBIC)) for f in frames]
        ).astype(int)
        assert np.abs(ours - ref).max() <= 2
        assert (ours != ref).mean() < 0.02
    near = resize_frames(frames, (100, 140), mode="nearest")
    assert torch.equal(near[:, ::2, ::2], frames)


# ---------------------------------------------------------------------------------------------- files


def test_mp4_at_ntsc_rate_keeps_frame_count_and_exact_fps(tmp_path):
    frames = smooth_frames(13, 64, 96)
    out = write_video(tmp_path / "clip.mp4", frames, Fraction(24000, 1001))
    data = read_video(out)
    assert data.frames.shape == frames.shape and data.frames.dtype == torch.uint8
    assert data.fps == Fraction(24000, 1001) and data.fps_from_file and not data.has_audio
    assert (data.frames.int() - frames.int()).abs().float().mean() < 3
    assert read_video(out, max_frames=5).frames.shape[0] == 5
    with av.open(str(out)) as container:
        assert container.streams.video[0].codec_context.pix_fmt == "yuv420p"  # widely playable when even
    # a float NTSC rate is snapped to the exact fraction
    assert as_fps_fraction(29.97) == Fraction(30000, 1001) and as_fps_fraction(25.0) == 25


@pytest.mark.parametrize("h,w", [(65, 67), (64, 67), (65, 64)])
def test_odd_sizes_are_refused_by_the_default_and_kept_with_yuv444p(tmp_path, h, w):
    """4:2:0 H.264 (the default, plays everywhere) cannot hold odd sides: refused with the alternatives, never a
    silently changed size or a High 4:4:4 file the user did not ask for."""
    from diffueraser_core.media_out import OutputOptions

    frames = smooth_frames(4, h, w)
    with pytest.raises(InputError, match=r"odd side.*yuv444p.*ffv1.*PNG folder"):
        write_video(tmp_path / "odd.mp4", frames, 30)
    assert not (tmp_path / "odd.mp4").exists()
    out = write_video(tmp_path / "odd.mp4", frames, 30, options=OutputOptions(pix_fmt="yuv444p"))
    data = read_video(out)
    assert data.frames.shape == (4, h, w, 3)
    with av.open(str(out)) as container:
        assert container.streams.video[0].codec_context.pix_fmt == "yuv444p"
    assert (data.frames.int() - frames.int()).abs().float().mean() < 3


def test_audio_is_copied(tmp_path):
    source = make_video_with_audio(tmp_path / "src.mp4")
    src = read_video(source)
    assert src.has_audio and src.frames.shape[0] == 10 and src.fps == 25
    out = write_video(tmp_path / "out.mp4", src.frames, src.fps, audio_from=source)
    data = read_video(out)
    assert data.has_audio and data.frames.shape[0] == 10
    with av.open(str(out)) as container:
        audio = container.streams.audio[0]
        assert audio.codec_context.name == "aac" and audio.codec_context.sample_rate == 16000
        samples = sum(frame.samples for frame in container.decode(audio))
    assert 0.35 * 16000 <= samples <= 0.6 * 16000  # cut near the 0.4 s of video, not dropped
    # no audio requested -> none written; a source without audio -> none written
    assert not read_video(write_video(tmp_path / "mute.mp4", src.frames, 25)).has_audio
    mute2 = write_video(tmp_path / "mute2.mp4", src.frames, 25, audio_from=tmp_path / "mute.mp4")
    assert not read_video(mute2).has_audio


def test_pcm_audio_is_reencoded_for_mp4(tmp_path):
    source = make_video_with_audio(tmp_path / "src.mkv", codec="pcm_s16le", fmt="s16", layout="stereo")
    out = write_video(tmp_path / "out.mp4", read_video(source).frames, 25, audio_from=source)
    with av.open(str(out)) as container:
        audio = container.streams.audio[0]
        assert audio.codec_context.name == "aac" and audio.codec_context.channels == 2


def test_png_folder_round_trip_is_lossless(tmp_path):
    frames = torch.randint(0, 256, (12, 33, 41, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    target = tmp_path / "frames"
    write_video(target, frames)
    assert sorted(os.listdir(target))[:2] == ["00000.png", "00001.png"]
    data = read_video(target)
    assert torch.equal(data.frames, frames) and not data.fps_from_file and data.fps == video.DEFAULT_IMAGE_FPS
    write_video(target, frames[:3])  # rewriting our own frame folder replaces it
    assert len(os.listdir(target)) == 3 and torch.equal(read_video(target).frames, frames[:3])
    (target / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="holds other files"):
        write_video(target, frames)
    assert len(os.listdir(target)) == 4


def test_folder_is_read_in_natural_order_and_single_images(tmp_path):
    folder = tmp_path / "seq"
    folder.mkdir()
    for value in (1, 2, 10):
        gray = np.full((16, 20), value * 20, np.uint8)
        assert cv2.imwrite(str(folder / f"frame{value}.png"), gray)
    (folder / "readme.txt").write_text("ignored")
    data = read_video(folder)
    assert data.frames.shape == (3, 16, 20, 3)
    assert data.frames[:, 0, 0, 0].tolist() == [20, 40, 200]
    rgba = np.zeros((8, 9, 4), np.uint8)
    rgba[..., 2] = 255  # OpenCV order BGRA: red
    rgba[..., 3] = 0
    assert cv2.imwrite(str(tmp_path / "one.png"), rgba)
    single = read_video(tmp_path / "one.png")
    assert single.frames.shape == (1, 8, 9, 3) and single.frames[0, 0, 0].tolist() == [255, 0, 0]
    with pytest.raises(InputError, match="does not exist"):
        read_video(tmp_path / "missing.mp4")
    with pytest.raises(InputError, match="cannot open video"):
        read_video(folder / "readme.txt")


def test_read_masks_from_folder_video_and_image(tmp_path):
    folder = tmp_path / "masks"
    folder.mkdir()
    noise = np.random.default_rng(0).integers(0, 12, (4, 32, 48)).astype(np.uint8)
    for i in range(4):
        m = noise[i].copy()
        m[8:16, 10 + i : 20 + i] = 250  # lossy-codec-like values around 0 and 255
        cv2.imwrite(str(folder / f"{i}.png"), m)
    masks = read_masks(folder, 4, (16, 24))
    assert masks.shape == (4, 16, 24) and masks.dtype == torch.bool
    expected = torch.zeros(4, 32, 48, dtype=torch.bool)
    for i in range(4):
        expected[i, 8:16, 10 + i : 20 + i] = True
    assert torch.equal(masks, video.resize_masks(expected, (16, 24)))
    # extra masks are ignored, a single one is broadcast, too few is an error quoting both counts
    assert torch.equal(read_masks(folder, 3, (32, 48)), expected[:3])
    single = read_masks(folder / "2.png", 5, (32, 48))
    assert single.shape == (5, 32, 48) and all(torch.equal(single[i], expected[2]) for i in range(5))
    with pytest.raises(InputError, match="has 4 frames but the video has 6"):
        read_masks(folder, 6, (32, 48))
    # a lossy mask video: a white box on black survives binarisation (away from block edges)
    white = expected.unsqueeze(-1).expand(4, 32, 48, 3).to(torch.uint8) * 255
    mask_video = write_video(tmp_path / "mask.mp4", white, 25)
    decoded = read_masks(mask_video, 4, (32, 48))
    assert (decoded != expected).float().mean() < 0.02


def test_write_is_atomic_on_failure(tmp_path, monkeypatch):
    frames = smooth_frames(6, 64, 64)
    target = tmp_path / "out.mp4"
    target.write_bytes(b"previous result")
    real = av.VideoFrame.from_ndarray
    calls = {"n": 0}

    def failing(array, format):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("disk full")
        return real(array, format=format)

    monkeypatch.setattr(av.VideoFrame, "from_ndarray", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        write_video(target, frames, 25)
    assert target.read_bytes() == b"previous result"
    assert os.listdir(tmp_path) == ["out.mp4"]  # no partial file left behind

    real_encode = cv2.imencode

    def failing_encode(ext, image, *args):
        if calls["n"] >= 4:
            calls["n"] += 1
            if calls["n"] == 7:
                raise RuntimeError("encoder crashed")
        return real_encode(ext, image, *args)

    monkeypatch.setattr(cv2, "imencode", failing_encode)
    with pytest.raises(RuntimeError, match="encoder crashed"):
        write_video(tmp_path / "pngs", frames)
    assert os.listdir(tmp_path) == ["out.mp4"]


def test_write_rejects_bad_targets(tmp_path):
    frames = smooth_frames(2, 64, 64)
    with pytest.raises(InputError, match="cannot write 'x.webm'"):
        write_video(tmp_path / "x.webm", frames, 25)
    with pytest.raises(InputError, match="2 frames"):
        write_video(tmp_path / "x.png", frames)
    with pytest.raises(InputError, match="does not exist"):
        write_video(tmp_path / "nope" / "x.mp4", frames, 25)
    with pytest.raises(InputError, match="uint8"):
        write_video(tmp_path / "x.mp4", frames.float(), 25)
    one = write_video(tmp_path / "x.png", frames[:1])
    assert torch.equal(read_video(one).frames, frames[:1])
