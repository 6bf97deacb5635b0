"""The LCM-like PCM LoRA is sampled as the reference samples it: diffusers' LCMScheduler() at its default config,
fresh noise from the run's seeded generator window by window (issue 15, item 5)."""

import copy

import pytest
import torch

from diffueraser_core import temporal_sampling
from diffueraser_core.pipeline import DiffuEraserModels, DiffusersVaeCodec, SamplerSettings, sample_video
from diffueraser_core.prior_injection import InjectionSettings, inject_forward_noise, make_window_noise
from diffueraser_core.random_weights.diffusion import build_brushnet, build_unet_main
from diffueraser_core.random_weights.sd15 import build_vae
from diffueraser_core.runtime import StandaloneRuntime
from diffueraser_core.schedule import (
    LCM_FINAL,
    SamplerStep,
    StepNoise,
    lcm_boundary_scalings,
    lcm_pairs,
    lcm_timesteps,
    scheduler_for_lora,
)
from diffueraser_core.temporal_sampling import Conditioning, WindowSettings, denoise_windows
from diffueraser_core.windows import windows_for_step

HW = (3, 5)


def test_lora_names_pick_the_scheduler():
    assert scheduler_for_lora("/m/diffueraser/pcm_sd15_lcmlike_lora_converted.safetensors") == "lcm"
    assert scheduler_for_lora("pcm_sd15_smallcfg_2step_converted.safetensors") == "tcd"
    assert scheduler_for_lora("pcm_sd15_normalcfg_8step_converted.safetensors") == "tcd"
    assert scheduler_for_lora(None) == "tcd"
    with pytest.raises(ValueError, match="scheduler must be one of tcd, lcm, got 'ddpm'"):
        SamplerSettings(scheduler="ddpm")


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_timesteps_and_boundary_scalings_are_lcm_schedulers_defaults(steps):
    from diffusers import LCMScheduler

    scheduler = LCMScheduler()  # the reference: no arguments
    scheduler.set_timesteps(steps)
    assert lcm_timesteps(steps) == [int(t) for t in scheduler.timesteps]
    for t in scheduler.timesteps:
        c_skip, c_out = scheduler.get_scalings_for_boundary_condition_discrete(t)
        assert lcm_boundary_scalings(int(t)) == pytest.approx((float(c_skip), float(c_out)), rel=1e-6)
    assert lcm_timesteps(4) == [999, 759, 499, 259]


def fake_eps(x, timestep):
    """A deterministic stand-in for BrushNet + UNet: any smooth function of the latents and the timestep."""
    return torch.tanh(0.7 * x + 0.001 * timestep) + 0.1 * x.roll(1, dims=0)


class _Handle:
    def acquire(self, memory_required=0):
        return None

    def release(self):
        pass


def reference_windows_loop(latents, steps, seed, window_length, num_frames):
    """The reference pipeline's loop, re-stated with diffusers' LCMScheduler and a seeded CPU generator (the
    reference's generator draws the window noise first, then the scheduler draws from it at every step)."""
    from diffusers import LCMScheduler

    scheduler = LCMScheduler()
    scheduler.set_timesteps(steps)
    snapshot = copy.deepcopy(scheduler.__dict__)  # one shared snapshot, restored before every window
    generator = torch.Generator().manual_seed(seed)
    torch.randn((window_length, 4, *HW), generator=generator)  # noise_pre
    for i, t in enumerate(scheduler.timesteps):
        count = torch.zeros(num_frames)
        value = torch.zeros_like(latents)
        for j, (start, stop) in enumerate(windows_for_step(i, num_frames, window_length)):
            scheduler.__dict__.update(snapshot)
            context = list(range(start, stop))
            window = latents[context]
            window = scheduler.step(fake_eps(window, int(t)), t, window, generator=generator, return_dict=False)[0]
            count[context] += 1
            if j == 0:
                value[context] = window
            else:
                overlap = [k for k, c in enumerate(count[context]) if c > 1]
                ratio = torch.linspace(0, 1, len(overlap) + 2)[1:-1]
                for k in overlap:
                    value[context[k]] = value[context[k]] * (1 - ratio[k]) + window[k] * ratio[k]
                value[context[overlap[-1]:]] = window[overlap[-1]:]
        latents = value.clone()
    return latents


@pytest.mark.parametrize("num_frames, windows_per_batch", [(8, 1), (19, 1), (19, 3)])
def test_lcm_windows_match_the_reference_loop(monkeypatch, num_frames, windows_per_batch):
    def predict(unet, brushnet, x, timestep, cond, embeddings, scale):
        eps = fake_eps(x, timestep) if x.dim() == 4 else torch.stack([fake_eps(w, timestep) for w in x])
        batch = embeddings.shape[0]
        if x.dim() == 4:
            return eps.unsqueeze(0).expand(batch, *eps.shape)
        return eps.unsqueeze(1).expand(eps.shape[0], batch, *eps.shape[1:])

    monkeypatch.setattr(temporal_sampling, "predict_noise", predict)
    steps, seed, length = 4, 7, 8
    latents = torch.randn((num_frames, 4, *HW), generator=torch.Generator().manual_seed(3))
    expected = reference_windows_loop(latents.clone(), steps, seed, length, num_frames)
    cond = Conditioning(torch.zeros((num_frames, 4, *HW)), torch.ones((num_frames, *HW), dtype=torch.bool))
    pairs = lcm_pairs(lcm_timesteps(steps))
    assert pairs[-1] == (259, LCM_FINAL)
    got = denoise_windows(
        latents, pairs, cond, torch.zeros(1, 4, 8), None, DiffuEraserModels(_Handle(), _Handle()),
        WindowSettings(window_length=length, windows_per_batch=windows_per_batch),
        StandaloneRuntime(device="cpu"), step=SamplerStep("lcm", StepNoise(seed, (length, 4, *HW))),
    )
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # TCD on the same inputs is another sampler
    tcd = denoise_windows(
        latents, [(999, 759), (759, 499), (499, 259), (259, 0)], cond, torch.zeros(1, 4, 8), None,
        DiffuEraserModels(_Handle(), _Handle()), WindowSettings(window_length=length), StandaloneRuntime(device="cpu"),
    )
    assert (tcd - got).abs().max() > 0.1


def test_step_noise_continues_the_window_noise_generator():
    noise = make_window_noise(4, HW, seed=11)
    generator = torch.Generator().manual_seed(11)
    assert torch.equal(torch.randn((4, 4, *HW), generator=generator), noise)
    follow = torch.randn((4, 4, *HW), generator=generator)
    assert torch.equal(StepNoise(11, (4, 4, *HW)).draw((4, 4, *HW)), follow)


def test_a_replayed_step_hands_out_exactly_the_noise_drawn_for_it():
    # the Ray driver draws each window's noise and a worker replays it (distributed.py)
    moves = [((5, 4, *HW), 759), ((3, 4, *HW), 759), ((5, 4, *HW), LCM_FINAL)]
    driver = SamplerStep("lcm", StepNoise(5, (8, 4, *HW)))
    replayed = driver.replay(moves)
    direct = StepNoise(5, (8, 4, *HW))
    for shape, s in moves[:2]:
        assert torch.equal(replayed.fresh_noise(shape, s), direct.draw(shape))
    assert replayed.fresh_noise(moves[2][0], LCM_FINAL) is None  # the last LCM step draws none
    replayed.noise.check_used()
    assert torch.equal(driver.noise.draw((2,)), direct.draw((2,)))  # the driver's generator moved past them
    with pytest.raises(RuntimeError, match="asked for noise #3 of 2"):
        replayed.fresh_noise((5, 4, *HW), 759)
    with pytest.raises(RuntimeError, match=r"is \(5, 4, 3, 5\), asked for \(3, 4, 3, 5\)"):
        driver.replay(moves[:1]).fresh_noise((3, 4, *HW), 759)
    with pytest.raises(RuntimeError, match="0 of 1 noise tensors used"):
        driver.replay(moves[:1]).noise.check_used()
    tcd = SamplerStep("tcd")
    assert tcd.replay(moves) is tcd


@pytest.fixture(scope="module")
def nets():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield build_unet_main(seed=1), build_brushnet(seed=2), build_vae(seed=3)
    torch.set_num_threads(old)


def test_sample_video_uses_the_scheduler_the_lora_needs(nets):
    # 9 frames with 4-frame windows: pre-inference runs (9 > 2 * 4), its step noise continues into the main pass
    runtime = StandaloneRuntime(device="cpu")
    unet, brushnet, vae = nets
    codec = DiffusersVaeCodec(runtime.wrap(vae, "vae"), runtime)
    gen = torch.Generator().manual_seed(5)
    num, size = 9, (HW[0] * 8, HW[1] * 8)
    frames = torch.randint(0, 256, (num, *size, 3), generator=gen, dtype=torch.uint8)
    masks = torch.zeros((num, *size), dtype=torch.bool)
    masks[:, 8:20, 10:30] = True
    start = inject_forward_noise(torch.randn((num, 4, *HW), generator=gen), InjectionSettings(seed=2, window_length=4))
    text = torch.randn((1, 8, 32), generator=gen)

    def run(model_scheduler, setting):
        models = DiffuEraserModels(runtime.wrap(unet, "unet"), runtime.wrap(brushnet, "brushnet"), model_scheduler)
        settings = SamplerSettings(steps=4, window_length=4, mask_dilation=1, scheduler=setting)
        return sample_video(start, frames, masks, text, None, models, codec, settings, runtime)

    from_lora = run("lcm", "auto")
    assert torch.equal(from_lora, run("tcd", "lcm"))  # an explicit setting wins over the models' default
    assert torch.isfinite(from_lora).all()
    assert (from_lora - run("tcd", "auto")).abs().max() > 1e-3
