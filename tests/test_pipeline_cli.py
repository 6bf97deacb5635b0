"""End to end through ``python -m diffueraser_core remove`` with a tiny random models folder in the official layout.

ProPainter networks only exist at their official size, so the clips are small (one RAFT iteration) and every run
uses 2 TCD steps.
"""

import fractions
import io
import re
from contextlib import redirect_stderr

import pytest
import torch

from diffueraser_core.cli import main
from diffueraser_core.random_weights import make_models_folder
from diffueraser_core.media_in import read_video
from diffueraser_core.media_out import write_video

FAST = ["--raft-iter", "1", "--steps", "2"]
# ProPainter needs 64 px after its 0.6x resize; small clips run it at full size
FULL_SIZE_PRIOR = ["--resize-ratio", "1.0"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny networks on a shared CPU: one intra-op thread is many times faster than two; restored afterwards
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    make_models_folder(str(root))
    return str(root)


def make_clip(num, height, width, seed=0):
    """Smooth moving content with a little texture (uint8 [T,H,W,3])."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.linspace(0, 1, height).view(1, height, 1, 1)
    x = torch.linspace(0, 1, width).view(1, 1, width, 1)
    t = torch.arange(num, dtype=torch.float32).view(num, 1, 1, 1) / max(num, 1)
    shape = (num, height, width, 1)
    base = torch.cat([(x + 0.3 * t).expand(shape), y.expand(shape), ((x + y) / 2).expand(shape)], dim=-1) * 200
    noise = torch.rand((num, height, width, 3), generator=gen) * 40
    return (base + noise).clamp(0, 255).to(torch.uint8)


def box_masks(num, height, width, top, left, size, move=1):
    masks = torch.zeros((num, height, width), dtype=torch.bool)
    for i in range(num):
        x0 = min(left + (i * move) % 8, width - size)
        masks[i, top : top + size, x0 : x0 + size] = True
    return masks


def far_from(masks, margin):
    """True where a pixel is more than ``margin`` pixels (per axis) from every hole pixel."""
    near = torch.nn.functional.max_pool2d(
        masks.float().unsqueeze(1), kernel_size=2 * margin + 1, stride=1, padding=margin
    )[:, 0] > 0
    return ~near


def mp4_with_tone(path, frames, fps, sample_rate=16000):
    """H.264 video with an AAC sine tone as long as the video."""
    import av
    import numpy as np

    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        audio = container.add_stream("aac", rate=sample_rate)
        audio.layout = "mono"
        for i, frame in enumerate(frames):
            packet_frame = av.VideoFrame.from_ndarray(frame.numpy(), format="rgb24")
            packet_frame.pts = i
            container.mux(video.encode(packet_frame))
        container.mux(video.encode(None))
        chunk = 1024
        total = int(len(frames) / fps * sample_rate)
        for start in range(0, total, chunk):
            tone = (0.2 * np.sin(2 * np.pi * 440 * np.arange(start, start + chunk) / sample_rate)).astype(np.float32)
            samples = av.AudioFrame.from_ndarray(tone[None], format="fltp", layout="mono")
            samples.sample_rate, samples.pts = sample_rate, start
            container.mux(audio.encode(samples))
        container.mux(audio.encode(None))


def write_masks(path, masks):
    write_video(str(path), masks.unsqueeze(-1).expand(*masks.shape, 3).to(torch.uint8) * 255)


def run_cli(args):
    err = io.StringIO()
    with redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, err.getvalue()


def test_long_clip_runs_pre_inference_and_keeps_pixels_outside_the_mask(tmp_path, models_dir):
    num, h, w = 50, 64, 96
    frames = make_clip(num, h, w)
    masks = box_masks(num, h, w, top=20, left=30, size=14)
    write_video(str(tmp_path / "video"), frames)
    write_masks(tmp_path / "mask", masks)
    common = [tmp_path / "video", tmp_path / "mask"]
    opts = ["--models", models_dir, "--mask-dilation", "2", "--device", "cpu", *FAST, *FULL_SIZE_PRIOR]
    code, log = run_cli([*common, tmp_path / "out1", *opts, "--seed", "1"])
    assert code == 0, log
    assert "pre-inference" in log and "sampling: " in log and "prior" in log
    # the whole job's share: whole percents only, never going back, reaching 100% with an ETA on every line
    job = [int(m) for m in re.findall(r"\] job (\d+)% \d+s, ETA \d+s", log)]
    assert job and job == sorted(job) and len(set(job)) == len(job) and job[-1] == 100, job
    out1 = read_video(str(tmp_path / "out1")).frames
    assert out1.shape == frames.shape
    # erode 1 / dilate 2 (+1 px of nearest resizing) and the 21 px feather (10 px) -> nothing changes beyond 14 px
    untouched = far_from(masks, 14)
    assert bool(untouched.any())
    assert torch.equal(out1[untouched], frames[untouched])
    assert (out1[masks].float() - frames[masks].float()).abs().mean() > 1.0  # the hole was repainted



def test_short_odd_sized_clip_with_a_single_mask_image(tmp_path, models_dir):
    num, h, w = 7, 141, 250  # working size 248x136: not the input size, not a multiple of 8
    frames = make_clip(num, h, w, seed=3)
    mask = box_masks(1, h, w, top=50, left=100, size=30)
    write_video(str(tmp_path / "video"), frames)
    write_video(str(tmp_path / "mask.png"), mask.unsqueeze(-1).expand(1, h, w, 3).to(torch.uint8) * 255)
    opts = ["--models", models_dir, "--mask-dilation", "2", "--device", "cpu", *FAST]
    code, log = run_cli([tmp_path / "video", tmp_path / "mask.png", tmp_path / "out", *opts, "--seed", "5"])
    assert code == 0, log
    assert "pre-inference" not in log
    out = read_video(str(tmp_path / "out")).frames
    assert out.shape == (num, h, w, 3)
    masks = mask.expand(num, h, w)
    untouched = far_from(masks, 14)
    assert torch.equal(out[untouched], frames[untouched])

    code, _ = run_cli([tmp_path / "video", tmp_path / "mask.png", tmp_path / "again", *opts, "--seed", "5", "--quiet"])
    assert code == 0
    assert torch.equal(read_video(str(tmp_path / "again")).frames, out)  # same seed, same result
    code, _ = run_cli([tmp_path / "video", tmp_path / "mask.png", tmp_path / "other", *opts, "--seed", "6", "--quiet"])
    assert code == 0
    other = read_video(str(tmp_path / "other")).frames
    assert not torch.equal(other, out)  # another seed, another result
    assert torch.equal(other[untouched], frames[untouched])


def test_video_file_keeps_frame_count_size_and_fps_ddim_inversion(tmp_path, models_dir):
    num, h, w = 7, 72, 104
    fps = fractions.Fraction(24000, 1001)
    frames = make_clip(num, h, w, seed=4)
    mp4_with_tone(tmp_path / "in.mp4", frames, fps)
    assert read_video(str(tmp_path / "in.mp4")).has_audio
    write_video(str(tmp_path / "mask.png"), box_masks(1, h, w, 20, 40, 16).unsqueeze(-1).expand(1, h, w, 3).to(torch.uint8) * 255)
    code, log = run_cli(
        [tmp_path / "in.mp4", tmp_path / "mask.png", tmp_path / "out.mp4", "--models", models_dir, "--device", "cpu",
         "--mode", "ddim_inversion", *FAST, *FULL_SIZE_PRIOR]
    )
    assert code == 0, log
    assert "inversion: " in log and "sampling: " in log
    out = read_video(str(tmp_path / "out.mp4"))
    assert out.frames.shape == (num, h, w, 3)
    assert out.fps == fps
    assert out.has_audio


def test_prior_only_skips_diffusion(tmp_path, models_dir):
    num, h, w = 5, 64, 96
    frames = make_clip(num, h, w, seed=6)
    masks = box_masks(num, h, w, top=20, left=40, size=12)
    write_video(str(tmp_path / "video"), frames)
    write_masks(tmp_path / "mask", masks)
    code, log = run_cli(
        [tmp_path / "video", tmp_path / "mask", tmp_path / "out", "--models", models_dir, "--device", "cpu",
         "--prior-only", "--mask-dilation", "3", *FAST, *FULL_SIZE_PRIOR]
    )
    assert code == 0, log
    assert "prior: " in log and "sampling" not in log and "encode" not in log
    out = read_video(str(tmp_path / "out")).frames
    assert out.shape == frames.shape
    # ProPainter composites inside its cross-dilated mask only (3 iterations)
    untouched = far_from(masks, 3)
    assert torch.equal(out[untouched], frames[untouched])
    assert not torch.equal(out[masks], frames[masks])


def test_bad_inputs_give_one_line_errors(tmp_path, models_dir):
    num, h, w = 7, 64, 96
    write_video(str(tmp_path / "video"), make_clip(num, h, w))
    write_masks(tmp_path / "masks3", box_masks(3, h, w, 10, 10, 8))
    opts = ["--models", models_dir, "--device", "cpu", *FAST]

    code, log = run_cli([tmp_path / "video", tmp_path / "nope.png", tmp_path / "o", *opts])
    assert code == 1 and "nope.png" in log and len(log.strip().splitlines()) == 1

    code, log = run_cli([tmp_path / "video", tmp_path / "masks3", tmp_path / "o", *opts])
    assert code == 1 and "3" in log and "7" in log, log

    code, log = run_cli([tmp_path / "video", tmp_path / "masks3", tmp_path / "o", *opts, "--steps", "0"])
    assert code == 1 and "steps" in log and "0" in log

    empty = tmp_path / "empty_models"
    empty.mkdir()
    code, log = run_cli([tmp_path / "video", tmp_path / "masks3", tmp_path / "o", "--models", empty])
    assert code == 1
    for key in ("unet_main", "brushnet", "raft", "propainter", "vae", "text_encoder"):
        assert f"{key} (" in log
    assert "huggingface.co/lixiaowen/diffuEraser" in log and "github.com/sczhou/ProPainter" in log
    assert not (tmp_path / "o").exists()


def test_the_prior_that_feeds_diffueraser_uses_subvideo_length_50(monkeypatch):
    # run_diffueraser passes subvideo_length=50 (and its mask dilation 8) to the prior; ProPainter alone uses 80
    from diffueraser_core import pipeline, prior_propainter
    from diffueraser_core.cli import build_parser
    from diffueraser_core.runtime import StandaloneRuntime
    from nodes.nodes_prior import PROPAINTER_DEFAULTS

    class Reached(Exception):
        pass

    seen = []

    def record_settings(frames, masks, nets, settings, runtime, sink=None):
        seen.append(settings)
        raise Reached

    monkeypatch.setattr(prior_propainter, "run_propainter_prior", record_settings)
    frames, masks = make_clip(3, 64, 64), box_masks(3, 64, 64, 8, 8, 10)
    for prior_only in (False, True):
        with pytest.raises(Reached):
            pipeline.remove_objects(
                frames, masks, propainter_nets=None, runtime=StandaloneRuntime(device="cpu"), models=object(),
                codec=object(), text_embeddings=torch.zeros(1, 8, 32), prior_only=prior_only,
            )
    assert [(s.subvideo_length, s.mask_dilation) for s in seen] == [(50, 8), (50, 8)]
    assert build_parser().parse_args(["v", "m", "o"]).subvideo_length == 50
    assert PROPAINTER_DEFAULTS["subvideo_length"] == prior_propainter.ProPainterSettings().subvideo_length == 50
    assert prior_propainter.PROPAINTER_ALONE_SUBVIDEO_LENGTH == 80


def test_dtype_option_reaches_the_runtime_and_defaults(tmp_path, models_dir, monkeypatch):
    from diffueraser_core import runtime as runtime_module
    from diffueraser_core.cli import build_parser

    assert runtime_module.default_dtype(torch.device("cuda")) == torch.float16  # not bf16, whatever the card
    assert runtime_module.default_dtype(torch.device("cpu")) == torch.float32
    assert build_parser().parse_args(["v", "m", "o"]).dtype is None
    code, log = run_cli(["v", "m", "o", "--dtype", "int8"])
    assert code == 2
    made = []

    class Recording(runtime_module.StandaloneRuntime):
        def __post_init__(self):
            super().__post_init__()
            made.append(self)

    monkeypatch.setattr(runtime_module, "StandaloneRuntime", Recording)
    num, h, w = 3, 64, 96
    frames = make_clip(num, h, w, seed=2)
    masks = box_masks(num, h, w, top=20, left=40, size=12)
    write_video(str(tmp_path / "video"), frames)
    write_masks(tmp_path / "mask", masks)
    opts = ["--models", models_dir, "--device", "cpu", "--mask-dilation", "2", *FAST, *FULL_SIZE_PRIOR]
    # half precision on the CPU end to end: the diffusion networks and ProPainter's in bf16 (RAFT stays fp32, flow
    # warping samples on fp32 grids). bf16 here because fp16 convolutions on the CPU take ~10x longer; the
    # warping tests cover fp16.
    code, log = run_cli([tmp_path / "video", tmp_path / "mask", tmp_path / "out16", *opts, "--dtype", "bf16"])
    assert code == 0, log
    assert [r.dtype for r in made] == [torch.bfloat16]
    out = read_video(str(tmp_path / "out16")).frames
    untouched = far_from(masks, 14)
    assert torch.equal(out[untouched], frames[untouched])
    assert (out[masks].float() - frames[masks].float()).abs().mean() > 1.0  # the hole was repainted


def test_lcm_like_lora_is_sampled_with_lcm(tmp_path, models_dir, monkeypatch):
    import shutil

    from diffueraser_core import pipeline
    from diffueraser_core.errors import InputError

    lcm_lora = tmp_path / "pcm_sd15_lcmlike_lora_converted.safetensors"
    shutil.copy(f"{models_dir}/diffueraser/pcm_sd15_smallcfg_2step_converted.safetensors", lcm_lora)
    seen = []

    def record(start, frames, masks, text, negative, models, codec, settings, runtime, conditioning=None):
        seen.append((models.scheduler, settings.scheduler))
        raise InputError("recorded")

    monkeypatch.setattr(pipeline, "sample_video", record)
    num, h, w = 2, 64, 64
    write_video(str(tmp_path / "video"), make_clip(num, h, w))
    write_masks(tmp_path / "mask", box_masks(num, h, w, 20, 20, 10))
    opts = ["--models", models_dir, "--device", "cpu", *FAST, *FULL_SIZE_PRIOR, "--quiet"]
    for extra in (["--lora", lcm_lora], [], ["--lora", lcm_lora, "--scheduler", "tcd"]):
        code, log = run_cli([tmp_path / "video", tmp_path / "mask", tmp_path / "o", *opts, *extra])
        assert code == 1 and "recorded" in log, log
    assert seen == [("lcm", "auto"), ("tcd", "auto"), ("lcm", "tcd")]
