"""Media matrix through the whole CLI (tiny random models): a 16-bit RGBA VFX plate folder and a rotated,
variable-frame-rate phone clip with audio come out with everything outside the hole kept."""

import io
from contextlib import redirect_stderr
from fractions import Fraction

import cv2
import numpy as np
import pytest
import torch

from diffueraser_core.cli import main
from diffueraser_core.media_in import read_clip
from diffueraser_core.random_weights import make_models_folder

from media_factory import audio_packets, pattern, stream_info, write_media

OPTS = ["--raft-iter", "1", "--steps", "2", "--resize-ratio", "1.0", "--mask-dilation", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    make_models_folder(str(root))
    return str(root)


def run_cli(args):
    err = io.StringIO()
    with redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, err.getvalue()


def far_from_box(h, w, top, left, size, margin):
    keep = torch.ones(h, w, dtype=torch.bool)
    keep[max(0, top - margin) : top + size + margin, max(0, left - margin) : left + size + margin] = False
    return keep


def test_sixteen_bit_rgba_plates_keep_every_bit_outside_the_hole(tmp_path, models_dir, caplog):
    h, w = 64, 96
    plates = pattern(5, h, w, depth=16, alpha=True)
    folder = tmp_path / "plates"
    folder.mkdir()
    names = [f"plate.{n}.png" for n in (1001, 1002, 1003, 1005, 1006)]  # a gap at 1004
    for name, plate in zip(names, plates):
        cv2.imwrite(str(folder / name), np.ascontiguousarray(plate[:, :, [2, 1, 0, 3]]))
    mask = np.zeros((h, w, 4), np.uint8)  # alpha-only mask
    mask[20:36, 40:56, 3] = 255
    cv2.imwrite(str(tmp_path / "mask.png"), mask)
    code, log = run_cli([folder, tmp_path / "mask.png", tmp_path / "out", "--models", models_dir, *OPTS])
    assert code == 0, log
    assert "1 gap(s)" in caplog.text  # reported (a warning on stderr outside pytest)
    out = read_clip(tmp_path / "out")
    assert out.info.frame_names == names and out.info.bit_depth == 16 and out.info.has_alpha
    result = out.original
    keep = far_from_box(h, w, 20, 40, 16, 14)
    assert torch.equal(result[:, keep], torch.from_numpy(plates)[:, keep])  # every bit of RGB and alpha
    assert torch.equal(result[..., 3], torch.from_numpy(plates)[..., 3])  # alpha untouched everywhere
    diff = (result[:, 22:34, 42:54, :3].to(torch.int32) - torch.from_numpy(plates)[:, 22:34, 42:54, :3].to(torch.int32))
    assert float(diff.abs().float().mean()) > 256  # the hole was repainted


def test_rotated_vfr_phone_clip_with_audio(tmp_path, models_dir):
    stored = pattern(6, 64, 96)
    pts = [0, 400, 900, 1300, 2000, 2300]  # 1/10000 s
    src = write_media(tmp_path / "phone.mp4", stored, pts=pts, time_base=Fraction(1, 10000), fps=20, rotation=270,
                      audio="aac", options={"crf": "10"})
    mask = np.zeros((96, 64), np.uint8)  # drawn on the upright (portrait) frame
    mask[30:50, 20:40] = 255
    cv2.imwrite(str(tmp_path / "mask.png"), mask)
    code, log = run_cli([src, tmp_path / "mask.png", tmp_path / "out.mp4", "--models", models_dir, *OPTS])
    assert code == 0, log
    source, out = read_clip(src), read_clip(tmp_path / "out.mp4")
    assert out.frames.shape == (6, 96, 64, 3) and out.info.rotation == 0
    src_pts, out_pts = stream_info(src)["pts"], stream_info(tmp_path / "out.mp4")["pts"]
    assert [p - out_pts[0] for p in out_pts] == [p - src_pts[0] for p in src_pts]
    assert [d for d, _ in audio_packets(tmp_path / "out.mp4")] == [d for d, _ in audio_packets(src)]
    keep = far_from_box(96, 64, 30, 20, 20, 14)
    err = (out.frames[:, keep].float() - source.frames[:, keep].float()).abs().mean()
    assert float(err) < 3  # generation loss only, in the right orientation
