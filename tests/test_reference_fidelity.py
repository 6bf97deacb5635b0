"""Our stages against tensors recorded from the official DiffuEraser code (tests/reference_run/README.md).

The recorder ran the official code (CPU, fp32, VAE posterior mean, noise recorded) on a synthetic 60-frame clip
with tiny random weights from our own generator. Here the same weights are rebuilt, the same noise is fed, and
every stage is checked on the reference's own inputs, so a divergence shows up at the stage that causes it:

prior (ProPainter) -> prior latents (VAE encode) -> pre-inference start latents (keyframes + forward noise)
-> pre-inference (one window sampled) -> main start latents (keyframes written back, re-noised) -> sampling
(windows, both lists) -> decode -> blend; then the whole chain on our own intermediate results.

Latents must agree to ``LATENT_RTOL`` (max abs error over max abs value, fp32 CPU); frames to ``FRAME_ATOL``
levels inside the hole. Every wider tolerance is named in ``DOCUMENTED_DIVERGENCES`` with its reason.
Per-stage errors are logged (``-o log_cli=true --log-cli-level=INFO`` shows them; a failure report shows its
stage's line) and collected in ``ERRORS``.

Reference behaviour expected on purpose although our code still differs (issue 15, fixed in parallel):
item 1, pre-inference keyframes ``int(i * (N / 22))`` (N = 60: keyframe 11 is frame 29, not 30) in
``test_pre_inference_keyframes_and_start_latents``, ``test_main_start_latents_after_pre_inference`` and
``test_whole_chain_on_our_own_results``.
"""

from __future__ import annotations

import logging
import pathlib

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.reference_run import inputs as spec

log = logging.getLogger(__name__)

DATA = pathlib.Path(__file__).resolve().parent / "reference_run" / "reference.safetensors"
PRIOR_DATA = pathlib.Path(__file__).resolve().parent / "reference_run" / "reference_prior.safetensors"
LATENT_RTOL = 1e-4
FRAME_ATOL = 1

#: stage -> (tolerance, why); each one is a documented, deliberate divergence (the module named says so)
DOCUMENTED_DIVERGENCES = {
    # measured on the recorded clip: 75919 values +1, 510 values +2, 1360 values -1, the rest equal
    "composed frames (feather band)": (2, "blend.py: alpha stays float32 and the result is rounded; the reference "
                                          "stores the blurred mask and alpha as uint8 and truncates the result"),
}

ERRORS = {}


def _record(stage, ours, ref, region=None):
    ours, ref = ours.to(torch.float64), ref.to(torch.float64)
    diff = (ours - ref).abs()
    if region is not None:
        diff = diff[region]
    scale = float(ref.abs().max())
    row = {
        "max": float(diff.max()) if diff.numel() else 0.0,
        "mean": float(diff.mean()) if diff.numel() else 0.0,
        "rel": (float(diff.max()) / scale) if diff.numel() and scale else 0.0,
        "over_1": int((diff > 1).sum()) if region is not None else None,
        "n": int(diff.numel()),
    }
    ERRORS[stage] = row
    log.info("reference fidelity %-26s max %.3g mean %.3g rel %.3g (%s values)", stage, row["max"], row["mean"],
             row["rel"], row["n"])
    return row


def _dense(ref, name, base):
    """uint8 frames stored sparsely (flat pixel indices + RGB values) laid over ``base``."""
    out = base.clone()
    flat = out.view(-1, 3)
    flat[ref[name + ".index"].long()] = ref[name + ".values"]
    return out


def _region(ref, name, shape):
    region = torch.zeros(shape[0] * shape[1] * shape[2], dtype=torch.bool)
    region[ref[name + ".index"].long()] = True
    return region.view(shape[:3])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from diffueraser_core.models.checkpoints import load_brushnet, load_unet_main
    from diffueraser_core.models.lora import apply_lora, read_lora
    from diffueraser_core.models.sd15_components import encode_prompt, load_text_encoder, load_vae
    from diffueraser_core.pipeline import DiffuEraserModels, DiffusersVaeCodec
    from diffueraser_core.prior_propainter import load_propainter_nets
    from diffueraser_core.runtime import StandaloneRuntime

    with safe_open(str(DATA), "pt") as f:
        meta = f.metadata()
    assert meta["shape"] == f"[{spec.NUM_FRAMES}, {spec.HEIGHT}, {spec.WIDTH}]"
    ref = load_file(str(DATA))
    root = tmp_path_factory.mktemp("reference_models")
    paths = spec.write_weights(str(root))
    runtime = StandaloneRuntime(device=torch.device("cpu"), dtype=torch.float32)
    unet = load_unet_main(paths["unet_main"], dtype=torch.float32)
    apply_lora(unet, read_lora(paths["pcm_lora"]), 1.0)
    brushnet = load_brushnet(paths["brushnet"], dtype=torch.float32)
    text = encode_prompt(load_text_encoder(paths["text_encoder"]).to(torch.float32), "", runtime.device)
    models = DiffuEraserModels(unet=runtime.wrap(unet, "unet"), brushnet=runtime.wrap(brushnet, "brushnet"))
    codec = DiffusersVaeCodec(runtime.wrap(load_vae(paths["vae"]).to(torch.float32), "vae"), runtime)
    nets = load_propainter_nets(paths["propainter_dir"], runtime)
    frames, masks = spec.synthetic_clip()
    return dict(ref=ref, runtime=runtime, models=models, codec=codec, text=text, nets=nets, frames=frames,
                masks=masks, cache={})


def _propainter_settings():
    from diffueraser_core.prior_propainter import ProPainterSettings

    return ProPainterSettings(resize_ratio=spec.RESIZE_RATIO, mask_dilation=spec.MASK_DILATION,
                              ref_stride=spec.PRIOR_REF_STRIDE, neighbor_length=spec.PRIOR_NEIGHBOR_LENGTH,
                              subvideo_length=spec.PRIOR_SUBVIDEO_LENGTH, raft_iter=spec.RAFT_ITER)


def _conditioning(run):
    from diffueraser_core.temporal_sampling import build_conditioning

    if "conditioning" not in run["cache"]:
        latent_hw = (spec.HEIGHT // 8, spec.WIDTH // 8)
        run["cache"]["conditioning"] = build_conditioning(run["frames"], run["masks"], latent_hw, run["codec"],
                                                          spec.MASK_DILATION)
    return run["cache"]["conditioning"]


def _window_settings():
    from diffueraser_core.temporal_sampling import WindowSettings

    return WindowSettings(window_length=spec.WINDOW_LENGTH)


def _pairs():
    from diffueraser_core.prior_injection import tcd_timesteps
    from diffueraser_core.temporal_sampling import pairs_down

    return pairs_down(tcd_timesteps(spec.STEPS))


def _assert_latents(stage, ours, ref):
    row = _record(stage, ours, ref)
    tol = DOCUMENTED_DIVERGENCES.get(stage, (LATENT_RTOL, ""))[0]
    assert row["rel"] <= tol, f"{stage}: relative error {row['rel']:.3g} > {tol:g} ({row})"


def _assert_frames(stage, ours, ref, region):
    row = _record(stage, ours, ref, region)
    tol = DOCUMENTED_DIVERGENCES.get(stage, (FRAME_ATOL, ""))[0]
    assert row["max"] <= tol, f"{stage}: {row['over_1']} values differ by more than 1 level, max {row['max']:g}"


def test_prior_frames(run):
    """ProPainter on its own clip (prior_clip: 16 frames 128x128, chunked completion, pre-propagation, chunked
    propagation, limited reference frames)."""
    from diffueraser_core.prior_propainter import run_propainter_prior

    ref = load_file(str(PRIOR_DATA))
    frames, masks = spec.prior_clip()
    expected = _dense(ref, "prior_frames", frames)
    ours = run_propainter_prior(frames, masks, run["nets"], _propainter_settings(), run["runtime"]).frames
    hole = (expected != frames).any(-1) | (ours != frames).any(-1)
    _assert_frames("prior frames", ours, expected, hole)
    # outside what either side filled, both are the input bit for bit
    assert torch.equal(ours[~hole], frames[~hole])


def test_prior_latents(run):
    from diffueraser_core.pipeline import encode_prior
    from diffueraser_core.prior_injection import VAE_SCALING

    ref_prior = _dense(run["ref"], "prior_frames", run["frames"])
    ours = encode_prior(ref_prior, (spec.HEIGHT, spec.WIDTH), run["codec"]) * VAE_SCALING
    _assert_latents("prior latents", ours, run["ref"]["prior_latents"])


def test_pre_inference_keyframes_and_start_latents(run):
    from diffueraser_core.pre_inference import keyframe_indices
    from diffueraser_core.prior_injection import VAE_SCALING, forward_noise_latents

    ref = run["ref"]
    keyframes = ref["keyframes"].long()
    prior = ref["prior_latents"] / VAE_SCALING
    ours = forward_noise_latents(prior[keyframes], ref["noise_pre"], 999, torch.arange(spec.WINDOW_LENGTH))
    _assert_latents("pre-inference start", ours * VAE_SCALING, ref["pre_start_latents"])
    # issue 15 item 1: the reference computes int(i * (N / 22)); at N = 60 keyframe 11 is frame 29, not 30
    assert keyframe_indices(spec.NUM_FRAMES, spec.WINDOW_LENGTH).tolist() == keyframes.tolist()


def test_pre_inference_window(run):
    from diffueraser_core.temporal_sampling import denoise_windows

    ref = run["ref"]
    keyframes = ref["keyframes"].long()
    clean = denoise_windows(ref["pre_start_latents"].clone(), _pairs(), _conditioning(run).select(keyframes),
                            run["text"], None, run["models"], _window_settings(), run["runtime"],
                            stage="pre-inference")
    _assert_latents("pre-inference latents", clean, ref["pre_latents"])


def test_main_start_latents_after_pre_inference(run):
    from diffueraser_core.pre_inference import run_pre_inference
    from diffueraser_core.prior_injection import VAE_SCALING, StartLatents, forward_noise_latents
    from diffueraser_core.prior_injection import tcd_timesteps

    ref = run["ref"]
    prior = ref["prior_latents"] / VAE_SCALING
    start = StartLatents(latent=forward_noise_latents(prior, ref["noise_pre"], 999), prior_latent=prior,
                         noise=ref["noise_pre"].clone(), window_length=spec.WINDOW_LENGTH)
    # the start latents the main pass would have without pre-inference (every frame's own prior + periodic noise)
    untouched = torch.ones(spec.NUM_FRAMES, dtype=torch.bool)
    untouched[ref["keyframes"].long()] = False
    _assert_latents("main start (not keyframes)", start.latent[untouched] * VAE_SCALING,
                    ref["start_latents"][untouched])
    pre = run_pre_inference(start, _conditioning(run), tcd_timesteps(spec.STEPS), run["text"], None, run["models"],
                            run["codec"], _window_settings(), run["runtime"])
    run["cache"]["pre"] = pre
    _assert_latents("main start latents", pre.start_latent * VAE_SCALING, ref["start_latents"])


def _reference_main_conditioning(run):
    """The conditioning of the main pass as the reference builds it: the recorded keyframe latents decoded,
    re-encoded and marked fully known (the reference's write-back, from its own recorded latents)."""
    from diffueraser_core.prior_injection import VAE_SCALING
    from diffueraser_core.temporal_sampling import Conditioning

    ref, codec = run["ref"], run["codec"]
    keyframes = ref["keyframes"].long()
    base = _conditioning(run)
    cond = Conditioning(base.masked_latents.clone(), base.known.clone())
    decoded = codec.decode(ref["pre_latents"] / VAE_SCALING)
    cond.masked_latents[keyframes] = codec.encode(decoded) * VAE_SCALING
    cond.known[keyframes] = True
    return cond


def test_sampling_windows(run):
    from diffueraser_core.temporal_sampling import denoise_windows

    ref = run["ref"]
    final = denoise_windows(ref["start_latents"].clone(), _pairs(), _reference_main_conditioning(run), run["text"],
                            None, run["models"], _window_settings(), run["runtime"], stage="sampling")
    _assert_latents("final latents", final, ref["final_latents"])


def test_decode(run):
    from diffueraser_core.prior_injection import VAE_SCALING

    ref = run["ref"]
    ours = run["codec"].decode(ref["final_latents"] / VAE_SCALING)
    region = _region(ref, "decoded_frames", ours.shape)
    _assert_frames("decoded frames", ours, _dense(ref, "decoded_frames", ours), region)


def test_blend(run):
    from diffueraser_core.blend import blend_video, blend_weights, prepare_blend_masks

    ref, frames = run["ref"], run["frames"]
    decoded = _dense(ref, "decoded_frames", frames)  # outside the stored region the blend weight is 0
    ours = blend_video(frames, decoded, run["masks"], mask_dilation=spec.MASK_DILATION)
    expected = _dense(ref, "composed_frames", frames)
    hole = prepare_blend_masks(run["masks"], (spec.HEIGHT, spec.WIDTH), spec.MASK_DILATION)
    alpha = blend_weights(hole)
    _assert_frames("composed frames (hole)", ours, expected, hole)
    _assert_frames("composed frames (feather band)", ours, expected, (alpha > 0) & ~hole)
    assert torch.equal(ours[alpha == 0], frames[alpha == 0])
    assert torch.equal(expected[alpha == 0], frames[alpha == 0])


def test_whole_chain_on_our_own_results(run):
    """Our stages chained from the reference's prior frames (encode, injection with the recorded noise,
    pre-inference, sampling, decode, blend), against the reference's output."""
    from diffueraser_core.pipeline import SamplerSettings, decode_and_blend, encode_prior, sample_video
    from diffueraser_core.prior_injection import VAE_SCALING, StartLatents, forward_noise_latents

    ref, frames = run["ref"], run["frames"]
    prior = _dense(ref, "prior_frames", frames)
    prior_latent = encode_prior(prior, (spec.HEIGHT, spec.WIDTH), run["codec"])
    start = StartLatents(latent=forward_noise_latents(prior_latent, ref["noise_pre"], 999), prior_latent=prior_latent,
                         noise=ref["noise_pre"].clone(), window_length=spec.WINDOW_LENGTH)
    settings = SamplerSettings(steps=spec.STEPS, window_length=spec.WINDOW_LENGTH, mask_dilation=spec.MASK_DILATION)
    latents = sample_video(start, frames, run["masks"], run["text"], None, run["models"], run["codec"], settings,
                           run["runtime"], conditioning=_conditioning(run))
    ours = decode_and_blend(latents, frames, run["masks"], run["codec"], run["runtime"],
                            mask_dilation=spec.MASK_DILATION)
    expected = _dense(ref, "composed_frames", frames)
    _assert_latents("chain: final latents", latents * VAE_SCALING, ref["final_latents"])
    _assert_frames("chain: composed frames", ours, expected, run["masks"])
