"""Media matrix, depth / alpha / audio / output options: 10-bit video and 16-bit PNGs keep their depth, alpha is
passed through, audio is stream-copied where the container allows, and the default output plays everywhere."""

import logging

import av
import cv2
import numpy as np
import pytest
import torch

from diffueraser_core.blend import blend_video
from diffueraser_core.media_in import read_clip
from diffueraser_core.media_out import OutputOptions, check_output_target, write_clip

from media_factory import H, W, audio_packets, pattern, stream_info, write_media


def target(path, **options):
    return check_output_target(path, options=OutputOptions(**options))


def write_png_folder(folder, frames, names):
    folder.mkdir()
    for array, name in zip(frames, names):
        order = [2, 1, 0, 3][: array.shape[2]]
        assert cv2.imwrite(str(folder / name), np.ascontiguousarray(array[:, :, order]))
    return folder


def test_default_output_is_h264_yuv420p_high_crf18(tmp_path):
    clip = read_clip(write_media(tmp_path / "in.mkv", pattern(4), codec="ffv1", pix_fmt="yuv444p"))
    out = write_clip(target(tmp_path / "out.mp4"), clip.frames, clip.info)
    info = stream_info(out)
    assert (info["codec"], info["pix_fmt"], info["profile"]) == ("h264", "yuv420p", "High")
    with open(out, "rb") as f:  # faststart: the index (moov) before the media data (mdat)
        head = f.read(4096)
    assert head.find(b"moov") != -1 and (head.find(b"mdat") == -1 or head.find(b"moov") < head.find(b"mdat"))


def test_ffv1_default_is_bit_exact_rgb(tmp_path):
    frames = pattern(5)
    clip = read_clip(write_media(tmp_path / "in.mkv", frames, codec="ffv1", pix_fmt="bgr0"))
    assert np.array_equal(clip.frames.numpy(), frames)
    out = write_clip(target(tmp_path / "out.mkv", codec="ffv1"), clip.frames, clip.info)
    assert torch.equal(read_clip(out).frames, clip.frames)


def test_ten_bit_video_keeps_its_depth(tmp_path, caplog):
    frames = pattern(5, depth=16)
    clip = read_clip(write_media(tmp_path / "in.mkv", frames, codec="ffv1", pix_fmt="yuv420p10le"))
    assert clip.info.bit_depth == 10 and clip.original.dtype == torch.uint16
    assert clip.frames.dtype == torch.uint8
    # --match-input: FFV1 yuv420p10le again; values within a 10-bit level of the source through RGB
    out = write_clip(target(tmp_path / "match.mkv", match_input=True), clip.frames, clip.info, original=clip.original)
    assert stream_info(out)["pix_fmt"] == "yuv420p10le"
    back = read_clip(out).original.numpy().astype(np.int64)
    assert np.abs(back - clip.original.numpy()).mean() < 64  # 64/65535 = a quarter of a 10-bit level
    # the lossless default of ffv1 (RGB 16-bit) keeps the decoded 16-bit values bit for bit
    out = write_clip(target(tmp_path / "rgb.mkv", codec="ffv1"), clip.frames, clip.info, original=clip.original)
    assert stream_info(out)["pix_fmt"] in ("rgb48le", "gbrp16le")  # the decoder hands planar RGB back
    assert torch.equal(read_clip(out).original, clip.original)
    # an 8-bit output of a 10-bit source says so
    with caplog.at_level(logging.WARNING):
        write_clip(target(tmp_path / "eight.mp4"), clip.frames, clip.info, original=clip.original)
    assert "10 bits per sample" in caplog.text


def test_sixteen_bit_rgba_png_folder_comes_back_bit_identical_outside_the_hole(tmp_path):
    frames = pattern(4, depth=16, alpha=True)
    folder = write_png_folder(tmp_path / "plates", frames, [f"plate.{n:04d}.png" for n in (1001, 1002, 1003, 1004)])
    clip = read_clip(folder)
    assert clip.info.bit_depth == 16 and clip.info.has_alpha
    assert clip.original.dtype == torch.uint16 and np.array_equal(clip.original.numpy(), frames)
    masks = torch.zeros(4, H, W, dtype=torch.bool)
    masks[:, 10:20, 20:30] = True
    generated = torch.zeros(4, H, W, 3, dtype=torch.uint8)
    original = clip.original.clone()
    out = blend_video(original, generated, masks, mask_dilation=1, feather=5, out=original)
    far = torch.ones(H, W, dtype=torch.bool)
    far[5:25, 15:35] = False
    assert torch.equal(out[:, far], torch.from_numpy(frames)[:, far])  # every bit, alpha included
    assert torch.equal(out[..., 3], torch.from_numpy(frames)[..., 3])  # alpha untouched everywhere
    assert int(out[:, 14, 25, :3].to(torch.int32).max()) == 0  # the hole holds the generated pixels
    written = write_clip(target(tmp_path / "out"), clip.frames, clip.info, original=out)
    names = sorted(p.name for p in written.iterdir())
    assert names == [f"plate.{n}.png" for n in (1001, 1002, 1003, 1004)]
    back = cv2.imread(str(written / names[0]), cv2.IMREAD_UNCHANGED)
    assert back.dtype == np.uint16 and back.shape == (H, W, 4)
    assert np.array_equal(back[:, :, [2, 1, 0, 3]], out[0].numpy())


def test_prores_4444_alpha_is_passed_through(tmp_path):
    frames = pattern(4, depth=16, alpha=True)
    clip = read_clip(write_media(tmp_path / "in.mov", frames, codec="prores_ks", pix_fmt="yuva444p10le"))
    assert clip.info.has_alpha and clip.original.shape == (4, H, W, 4)
    out = write_clip(target(tmp_path / "out.mov", match_input=True), clip.frames, clip.info, original=clip.original)
    back = read_clip(out)
    assert back.info.has_alpha and stream_info(out)["codec"] == "prores"
    alpha_error = np.abs(back.original[..., 3].numpy().astype(np.int64) - clip.original[..., 3].numpy()).max()
    assert alpha_error <= 256  # within one 8-bit level of the source alpha


def test_png_in_mov_and_rgba_png_alpha_are_kept_exactly(tmp_path, caplog):
    frames = pattern(4, alpha=True)
    clip = read_clip(write_media(tmp_path / "in.mov", frames, codec="png", pix_fmt="rgba"))
    assert clip.info.has_alpha and np.array_equal(clip.original.numpy(), frames)
    out = write_clip(target(tmp_path / "out.mov", match_input=True), clip.frames, clip.info, original=clip.original)
    assert np.array_equal(read_clip(out).original.numpy(), frames)
    folder = write_png_folder(tmp_path / "rgba", frames, [f"{i:03d}.png" for i in range(4)])
    clip = read_clip(folder)
    out = write_clip(target(tmp_path / "rgba_out"), clip.frames, clip.info, original=clip.original)
    assert np.array_equal(read_clip(out).original.numpy(), frames)
    with caplog.at_level(logging.WARNING):  # H.264 cannot hold alpha: said, not silent
        write_clip(target(tmp_path / "flat.mp4"), clip.frames, clip.info, original=clip.original)
    assert "alpha channel" in caplog.text and "dropped" in caplog.text


def test_pcm_audio_is_copied_into_mov_and_reencoded_with_a_warning_for_mp4(tmp_path, caplog):
    src = write_media(tmp_path / "in.mov", pattern(6), audio="pcm_s16le")
    clip = read_clip(src)
    assert [a.codec for a in clip.info.audio] == ["pcm_s16le"]
    out = write_clip(target(tmp_path / "out.mov"), clip.frames, clip.info)
    assert stream_info(out)["audio"] == ["pcm_s16le"]
    assert [d for d, _ in audio_packets(out)] == [d for d, _ in audio_packets(src)]  # the same bytes
    with caplog.at_level(logging.WARNING):
        out = write_clip(target(tmp_path / "out.mp4"), clip.frames, clip.info)
    assert stream_info(out)["audio"] == ["aac"] and "re-encoding it to AAC" in caplog.text
    out = write_clip(target(tmp_path / "out.mkv"), clip.frames, clip.info)
    assert stream_info(out)["audio"] == ["pcm_s16le"]
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # a frame folder cannot hold audio: said, not silent
        write_clip(target(tmp_path / "frames"), clip.frames, clip.info)
    assert "audio stream(s) are not written" in caplog.text


def test_aac_audio_is_stream_copied_into_mp4(tmp_path):
    src = write_media(tmp_path / "in.mp4", pattern(6), audio="aac")
    clip = read_clip(src)
    out = write_clip(target(tmp_path / "out.mp4"), clip.frames, clip.info)
    assert [d for d, _ in audio_packets(out)] == [d for d, _ in audio_packets(src)]


@pytest.mark.parametrize("codec,suffix,pix_fmt", [("prores_ks", ".mov", "yuv422p10le"), ("png", ".mov", "rgb24"),
                                                  ("libx265", ".mp4", "yuv420p")])
def test_other_codecs_write_their_default_formats(tmp_path, codec, suffix, pix_fmt):
    clip = read_clip(write_media(tmp_path / "in.mkv", pattern(3), codec="ffv1", pix_fmt="bgr0"))
    out = write_clip(target(tmp_path / f"out{suffix}", codec=codec), clip.frames, clip.info)
    back = read_clip(out)
    assert back.frames.shape == clip.frames.shape
    with av.open(str(out)) as container:
        assert container.streams.video[0].codec_context.pix_fmt == pix_fmt


@pytest.mark.parametrize("codec,pix_fmt,suffix,depth,alpha", [
    ("libx264", "yuv420p", ".mp4", 8, False),
    ("libx265", "yuv420p10le", ".mp4", 10, False),
    ("libvpx-vp9", "yuv420p", ".mkv", 8, False),
    ("libvpx-vp9", "yuva420p", ".mkv", 8, True),
    ("gif", "rgb8", ".gif", 8, False),
    ("prores_ks", "yuv422p10le", ".mov", 10, False),
])
def test_every_source_codec_reads_every_frame_with_its_depth_and_alpha(tmp_path, codec, pix_fmt, suffix, depth, alpha):
    frames = pattern(6, depth=16 if depth > 8 else 8, alpha=alpha)
    options = {"x265-params": "log-level=error"} if codec == "libx265" else None
    clip = read_clip(write_media(tmp_path / f"in{suffix}", frames, codec=codec, pix_fmt=pix_fmt, fps=10,
                                 options=options))
    assert clip.frames.shape == (6, H, W, 3) and clip.info.has_alpha == alpha
    assert clip.info.bit_depth >= depth
    assert (clip.original is not None) == (depth > 8 or alpha)
    eight = frames if frames.dtype == np.uint8 else (frames.astype(np.uint32) * 255 + 32767) // 65535
    tolerance = 40 if codec == "gif" else 8  # GIF: a 256-colour palette
    assert np.abs(clip.frames.numpy().astype(int) - eight[..., :3].astype(int)).mean() < tolerance
