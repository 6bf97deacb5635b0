"""Window-by-window BrushNet + motion UNet sampling, conditioning, CFG/OOM handling and pre-inference (tiny models)."""

import pytest
import torch

from diffueraser_core.errors import Interrupted
from diffueraser_core.pipeline import DiffuEraserModels, DiffusersVaeCodec, SamplerSettings, sample_video
from diffueraser_core.pre_inference import keyframe_indices, run_pre_inference, should_pre_infer
from diffueraser_core.prior_injection import (
    VAE_SCALING,
    InjectionSettings,
    StartLatents,
    ddim_update,
    forward_noise_coefficients,
    inject_forward_noise,
    tcd_timesteps,
)
from diffueraser_core.random_weights.diffusion import build_brushnet, build_unet_main
from diffueraser_core.random_weights.sd15 import build_vae
from diffueraser_core.runtime import StandaloneRuntime
from diffueraser_core.temporal_sampling import (
    Conditioning,
    WindowSettings,
    build_conditioning,
    denoise_windows,
    pairs_down,
    predict_noise,
)

TEXT_DIM = 32  # the tiny UNet's cross_attention_dim
LATENT_HW = (4, 6)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The tiny networks are dominated by thread synchronisation: on a shared CPU two intra-op threads run them
    # many times slower than one. Restored afterwards.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def nets():
    return build_unet_main(seed=1), build_brushnet(seed=2), build_vae(seed=3)


class Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, stage, done, total, preview=None):
        self.calls.append((stage, done, total))


def make_runtime(**kw):
    return StandaloneRuntime(device=torch.device("cpu"), **kw)


def make_models(runtime, nets, brushnet=None):
    unet, bn, _ = nets
    return DiffuEraserModels(unet=runtime.wrap(unet, "unet"), brushnet=runtime.wrap(brushnet or bn, "brushnet"))


def random_conditioning(num, seed=0, hw=LATENT_HW):
    gen = torch.Generator().manual_seed(seed)
    known = torch.rand((num, *hw), generator=gen) > 0.3
    return Conditioning(torch.randn((num, 4, *hw), generator=gen), known)


def text(seed=0, batch=1):
    return torch.randn((batch, 8, TEXT_DIM), generator=torch.Generator().manual_seed(100 + seed))


def test_build_conditioning_blacks_holes_and_marks_known(nets):
    runtime = make_runtime()
    codec = DiffusersVaeCodec(runtime.wrap(nets[2], "vae"), runtime)
    gen = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (3, 64, 64, 3), generator=gen, dtype=torch.uint8)
    masks = torch.zeros((3, 64, 64), dtype=torch.bool)
    masks[:, 20:40, 8:30] = True
    cond = build_conditioning(frames, masks, (8, 8), codec, mask_dilation=2)
    # erode 1 + dilate 2 -> the hole grows by one pixel: rows 19..40, cols 7..30; nearest samples every 8th pixel
    holes = torch.zeros((64, 64), dtype=torch.bool)
    holes[19:41, 7:31] = True
    expected_known = ~holes[::8, ::8]
    assert torch.equal(cond.known, expected_known.expand(3, 8, 8))
    blacked = frames.clone()
    blacked[:, holes] = 0
    torch.testing.assert_close(cond.masked_latents, codec.encode(blacked) * VAE_SCALING)
    window = cond.window(1, 3)
    assert window.shape == (2, 5, 8, 8) and torch.equal(window[:, 4], expected_known.float().expand(2, 8, 8))
    # no mask: every pixel known, the plain frames encoded
    plain = build_conditioning(frames, None, (8, 8), codec)
    assert bool(plain.known.all())
    torch.testing.assert_close(plain.masked_latents, codec.encode(frames) * VAE_SCALING)
    # the same conditioning from latents already encoded (the inversion node reuses the prior's encode)
    reused = Conditioning.all_known(codec.encode(frames))
    torch.testing.assert_close(reused.masked_latents, plain.masked_latents)
    assert torch.equal(reused.known, plain.known)


def test_one_window_equals_the_explicit_tcd_chain(nets):
    runtime = make_runtime()
    models = make_models(runtime, nets)
    cond = random_conditioning(5)
    x = torch.randn((5, 4, *LATENT_HW), generator=torch.Generator().manual_seed(1))
    emb = text()
    out = denoise_windows(x, pairs_down(tcd_timesteps(2)), cond, emb, None, models, WindowSettings(window_length=8), runtime)
    expected = x
    with torch.no_grad():
        for t, s in [(999, 499), (499, 0)]:
            eps = predict_noise(nets[0], nets[1], expected, t, cond.window(0, 5), emb, 1.0)[0]
            expected = ddim_update(expected, eps, t, s)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(out, x)


def test_windows_progress_interrupt_and_determinism(nets):
    rec = Recorder()
    runtime = make_runtime(progress_callback=rec)
    models = make_models(runtime, nets)
    cond = random_conditioning(13)
    x = torch.randn((13, 4, *LATENT_HW), generator=torch.Generator().manual_seed(2))
    settings = WindowSettings(window_length=6)  # overlap 1, stride 5: A = [0,6) [5,11) [7,13); B = [0,6) [3,9) [7,13)
    out = denoise_windows(x, pairs_down(tcd_timesteps(2)), cond, text(), None, models, settings, runtime)
    assert rec.calls == [("sampling", i, 6) for i in range(0, 7)]  # announced at 0, then one per window
    again = denoise_windows(x, pairs_down(tcd_timesteps(2)), cond, text(), None, models, settings, runtime)
    assert torch.equal(out, again)
    other = denoise_windows(x, pairs_down(tcd_timesteps(2)), cond, text(seed=1), None, models, settings, runtime)
    assert not torch.allclose(out, other)

    count = {"n": 0}

    def stop_after_two():
        count["n"] += 1
        return count["n"] > 2

    stopping = make_runtime(interrupt_flag=stop_after_two)
    with pytest.raises(Interrupted):
        denoise_windows(x, pairs_down(tcd_timesteps(2)), cond, text(), None, make_models(stopping, nets), settings, stopping)
    assert count["n"] == 3


class OomOnce(torch.nn.Module):
    """BrushNet that runs out of memory on batches larger than ``limit`` items (a small device)."""

    def __init__(self, inner, limit):
        super().__init__()
        self.inner = inner
        self.limit = limit
        self.refused = 0

    def forward(self, sample, *args, **kwargs):
        if sample.shape[0] > self.limit:
            self.refused += 1
            raise torch.OutOfMemoryError("simulated: CUDA out of memory")
        return self.inner(sample, *args, **kwargs)


def test_cfg_only_above_one_and_oom_splits_the_cfg_batch(nets):
    runtime = make_runtime()
    cond = random_conditioning(4)
    x = torch.randn((4, 4, *LATENT_HW), generator=torch.Generator().manual_seed(3))
    pairs = pairs_down(tcd_timesteps(2))
    neg = text(seed=5)
    plain = denoise_windows(x, pairs, cond, text(), None, make_models(runtime, nets), WindowSettings(), runtime)
    cfg1 = denoise_windows(
        x, pairs, cond, text(), neg, make_models(runtime, nets), WindowSettings(guidance_scale=1.0), runtime
    )
    assert torch.equal(plain, cfg1)  # guidance 1 -> no CFG
    cfg3 = denoise_windows(
        x, pairs, cond, text(), neg, make_models(runtime, nets), WindowSettings(guidance_scale=3.0), runtime
    )
    assert not torch.allclose(plain, cfg3)

    small = OomOnce(nets[1], limit=4)  # fits one window of 4 frames, not the CFG batch of 8
    split = denoise_windows(
        x, pairs, cond, text(), neg, make_models(runtime, nets, small), WindowSettings(guidance_scale=3.0), runtime
    )
    assert small.refused == 2  # once per step, then the two halves ran
    torch.testing.assert_close(split, cfg3, rtol=1e-4, atol=1e-5)

    tiny = OomOnce(nets[1], limit=2)
    with pytest.raises(torch.OutOfMemoryError, match="lower the resolution"):
        denoise_windows(x, pairs, cond, text(), None, make_models(runtime, nets, tiny), WindowSettings(), runtime)


def test_pre_inference_rule_and_keyframes():
    start = StartLatents(latent=torch.zeros(45, 4, 2, 2), prior_latent=torch.zeros(45, 4, 2, 2), noise=torch.zeros(22, 4, 2, 2))
    assert should_pre_infer(45, 22, start)
    assert not should_pre_infer(44, 22, start)
    assert not should_pre_infer(45, 22, start, enabled=False)
    assert not should_pre_infer(45, 22, StartLatents(latent=torch.zeros(45, 4, 2, 2)))  # plain LATENT
    assert keyframe_indices(50, 22).tolist() == [i * 50 // 22 for i in range(22)]
    assert keyframe_indices(50, 22)[-1] == 47


def _reference_keyframes(num, length=22):
    # the reference's sample_index: step = n_total_frames / nframes; [int(i * step) for i in range(nframes)]
    step = num / length
    return [int(i * step) for i in range(length)][:22]


@pytest.mark.parametrize("num", [60, 120, 240, 480])
def test_keyframes_divide_first_as_the_reference(num):
    # lengths where dividing first lands one frame below the exact floor(i * N / 22)
    got = keyframe_indices(num, 22).tolist()
    assert got == _reference_keyframes(num)
    exact = [i * num // 22 for i in range(22)]
    lower = [i for i in range(22) if got[i] != exact[i]]
    assert lower and all(exact[i] - got[i] == 1 for i in lower)


def test_keyframes_match_the_reference_formula_on_a_sweep():
    differing = 0
    for num in range(45, 3001):
        got = keyframe_indices(num, 22).tolist()
        assert got == _reference_keyframes(num), num
        assert got[0] == 0 and got[-1] < num and got == sorted(set(got))
        differing += got != [i * num // 22 for i in range(22)]
    assert 40 < differing < 100  # about 2% of lengths differ from the exact floor
    assert keyframe_indices(13, 4).tolist() == [int(i * (13 / 4)) for i in range(4)]


def test_pre_inference_writes_keyframes_back(nets):
    rec = Recorder()
    runtime = make_runtime(progress_callback=rec)
    models = make_models(runtime, nets)
    codec = DiffusersVaeCodec(runtime.wrap(nets[2], "vae"), runtime)
    num, length = 13, 4
    prior = torch.randn((num, 4, *LATENT_HW), generator=torch.Generator().manual_seed(4))
    start = inject_forward_noise(prior, InjectionSettings(seed=3, window_length=length))
    cond = random_conditioning(num)
    before = (start.latent.clone(), cond.masked_latents.clone(), cond.known.clone())
    settings = WindowSettings(window_length=length)
    pre = run_pre_inference(start, cond, tcd_timesteps(2), text(), None, models, codec, settings, runtime)
    idx = keyframe_indices(num, length)
    assert idx.tolist() == [0, 3, 6, 9]
    assert [c[0] for c in rec.calls] == ["pre-inference"] * 3  # announced at 0, then one per step
    # inputs untouched (a host may cache them)
    assert torch.equal(start.latent, before[0]) and torch.equal(cond.masked_latents, before[1])
    assert torch.equal(cond.known, before[2])
    # keyframes: all known, conditioning = encode(decode(result)), start re-noised from the result
    others = torch.ones(num, dtype=torch.bool)
    others[idx] = False
    assert bool(pre.conditioning.known[idx].all())
    assert torch.equal(pre.conditioning.known[others], cond.known[others])
    assert torch.equal(pre.start_latent[others], start.latent[others])
    expected_clean = denoise_windows(
        forward_noise_latents_rows(prior[idx], start.noise) * VAE_SCALING,
        pairs_down(tcd_timesteps(2)), cond.select(idx), text(), None, models, settings, runtime,
    )
    decoded = codec.decode(expected_clean / VAE_SCALING)
    torch.testing.assert_close(pre.conditioning.masked_latents[idx], codec.encode(decoded) * VAE_SCALING)
    c1, c2 = forward_noise_coefficients(999)
    expected_start = c1 * expected_clean + c2 * start.noise[idx % length]
    torch.testing.assert_close(pre.start_latent[idx] * VAE_SCALING, expected_start, rtol=1e-4, atol=1e-5)


def forward_noise_latents_rows(prior, noise):
    c1, c2 = forward_noise_coefficients(999)
    return (c1 * prior * VAE_SCALING + c2 * noise[: prior.shape[0]]) / VAE_SCALING


def test_sample_video_runs_pre_inference_only_on_long_clips(nets):
    rec = Recorder()
    runtime = make_runtime(progress_callback=rec)
    models = make_models(runtime, nets)
    codec = DiffusersVaeCodec(runtime.wrap(nets[2], "vae"), runtime)
    gen = torch.Generator().manual_seed(5)
    num = 9
    frames = torch.randint(0, 256, (num, 70, 50, 3), generator=gen, dtype=torch.uint8)  # resized to 64x48 inside
    masks = torch.zeros((1, 70, 50), dtype=torch.bool)
    masks[0, 10:40, 10:30] = True
    prior = torch.randn((num, 4, 8, 6), generator=gen)
    start = inject_forward_noise(prior, InjectionSettings(seed=1, window_length=4))
    settings = SamplerSettings(steps=2, window_length=4)
    out = sample_video(start, frames, masks, text(), None, models, codec, settings, runtime)
    assert out.shape == (num, 4, 8, 6) and torch.isfinite(out).all()
    stages = {c[0] for c in rec.calls}
    assert "pre-inference" in stages and "sampling" in stages  # 9 > 2 * 4
    rec.calls.clear()
    no_pre = sample_video(
        start, frames, masks, text(), None, models, codec, SamplerSettings(steps=2, window_length=4, pre_inference=False), runtime
    )
    assert "pre-inference" not in {c[0] for c in rec.calls}
    assert not torch.allclose(out, no_pre)
    # a plain LATENT (no "diffueraser" key) is the start latent at t=999; without a prior there is no pre-inference
    rec.calls.clear()
    plain = StartLatents.from_latent_dict({"samples": start.latent.clone()})
    from_plain = sample_video(plain, frames, masks, text(), None, models, codec, settings, runtime)
    assert "pre-inference" not in {c[0] for c in rec.calls}
    assert torch.equal(from_plain, no_pre)
    # the dict written by to_latent_dict carries everything: same result as the StartLatents itself
    rec.calls.clear()
    via_dict = sample_video(StartLatents.from_latent_dict(start.to_latent_dict()), frames, masks, text(), None, models,
                            codec, settings, runtime)
    assert torch.equal(via_dict, out)
