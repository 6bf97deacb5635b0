"""Prior injection: forward-noise coefficients, TCD schedule/step, window noise, LATENT round trip, DDIM inversion."""

import pytest
import torch

from diffueraser_core.errors import InputError
from diffueraser_core.prior_injection import (
    VAE_SCALING,
    InjectionSettings,
    StartLatents,
    ddim_update,
    forward_noise_coefficients,
    inject_forward_noise,
    inversion_pairs,
    invert_prior,
    make_window_noise,
    start_timestep_for,
    tcd_timesteps,
)


def test_forward_noise_coefficients_at_999_match_the_reference():
    c_prior, c_noise = forward_noise_coefficients(999)
    assert c_prior == pytest.approx(0.0682649, abs=2e-7)
    assert c_noise == pytest.approx(0.9976672, abs=2e-7)
    assert c_prior**2 + c_noise**2 == pytest.approx(1.0, abs=1e-12)


def test_coefficients_agree_with_diffusers_sd15_schedule():
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    for t in (0, 1, 499, 999):
        c_prior, _ = forward_noise_coefficients(t)
        assert c_prior == pytest.approx(float(sched.alphas_cumprod[t]) ** 0.5, rel=1e-5)


@pytest.mark.parametrize(
    "steps, expected",
    [(2, [999, 499]), (4, [999, 759, 499, 259])],
)
def test_tcd_timesteps_trailing(steps, expected):
    assert tcd_timesteps(steps) == expected


def test_tcd_timesteps_8_and_16_ends():
    t8, t16 = tcd_timesteps(8), tcd_timesteps(16)
    assert (len(t8), t8[0], t8[1], t8[-1]) == (8, 999, 879, 139)
    assert (len(t16), t16[0], t16[1], t16[-1]) == (16, 999, 939, 79)


def test_steps_and_strength_validation():
    with pytest.raises(InputError, match="steps must be an integer in 1..50, got 0"):
        tcd_timesteps(0)
    with pytest.raises(InputError, match="strength"):
        tcd_timesteps(4, strength=0.05)
    with pytest.raises(InputError, match="mode must be one of"):
        InjectionSettings(mode="ddim")
    assert start_timestep_for(1.0) == 999
    assert start_timestep_for(0.5) == 499 == tcd_timesteps(2, 0.5)[0]


def test_ddim_update_equals_diffusers_tcd_step_eta0():
    from diffusers import TCDScheduler

    sched = TCDScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="trailing")
    sched.set_timesteps(2)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    timesteps = [int(t) for t in sched.timesteps]
    for i, t in enumerate(timesteps):
        eps = torch.randn(2, 4, 8, 8, generator=gen)
        expected = sched.step(eps, t, x, eta=0.0).prev_sample
        s = timesteps[i + 1] if i + 1 < len(timesteps) else 0
        ours = ddim_update(x, eps, t, s)
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
        x = expected


def test_window_noise_is_seeded_and_periodic():
    a = make_window_noise(5, (3, 4), seed=7)
    assert a.shape == (5, 4, 3, 4) and a.dtype == torch.float32
    torch.testing.assert_close(a, make_window_noise(5, (3, 4), seed=7), rtol=0, atol=0)
    assert not torch.allclose(a, make_window_noise(5, (3, 4), seed=8))

    prior = torch.randn(12, 4, 3, 4, generator=torch.Generator().manual_seed(1))
    start = inject_forward_noise(prior, InjectionSettings(seed=7, window_length=5))
    c_prior, c_noise = forward_noise_coefficients(999)
    noise_part = (start.latent * VAE_SCALING - c_prior * prior * VAE_SCALING) / c_noise
    for t in range(12):
        torch.testing.assert_close(noise_part[t], a[t % 5], rtol=1e-4, atol=1e-4)
    assert start.start_timestep == 999 and start.mode == "forward_noise"


def test_forward_injection_deterministic_per_seed():
    prior = torch.randn(6, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    one = inject_forward_noise(prior, InjectionSettings(seed=1)).latent
    again = inject_forward_noise(prior, InjectionSettings(seed=1)).latent
    other = inject_forward_noise(prior, InjectionSettings(seed=2)).latent
    assert torch.equal(one, again)
    assert (one - other).abs().mean() > 0.5


def test_latent_dict_round_trip_and_plain_latent():
    prior = torch.randn(3, 4, 4, 4)
    start = inject_forward_noise(prior, InjectionSettings(seed=4, window_length=2, strength=0.5))
    latent = start.to_latent_dict()
    assert torch.equal(latent["samples"], start.latent)
    back = StartLatents.from_latent_dict(latent)
    assert torch.equal(back.latent, start.latent) and torch.equal(back.prior_latent, prior)
    assert torch.equal(back.noise, start.noise)
    assert (back.start_timestep, back.strength, back.mode, back.seed, back.window_length) == (499, 0.5, "forward_noise", 4, 2)

    plain = StartLatents.from_latent_dict({"samples": torch.zeros(3, 4, 4, 4)})
    assert plain.prior_latent is None and plain.noise is None and plain.start_timestep == 999
    with pytest.raises(InputError, match=r"got \(3, 16, 4, 4\)"):
        StartLatents.from_latent_dict({"samples": torch.zeros(3, 16, 4, 4)})


def test_inversion_pairs_mirror_the_sampler():
    assert inversion_pairs(2, 1.0) == [(0, 499), (499, 999)]
    assert tcd_timesteps(4, 0.5) == [499, 379, 259, 139]
    assert inversion_pairs(4, 0.5) == [(0, 139), (139, 259), (259, 379), (379, 499)]


@pytest.fixture()
def one_thread():
    # tiny networks on a shared CPU: one intra-op thread is many times faster than two; restored afterwards
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def test_ddim_inversion_round_trip_on_tiny_models(one_thread):
    from diffueraser_core.pipeline import DiffuEraserModels
    from diffueraser_core.random_weights.diffusion import build_brushnet, build_unet_main
    from diffueraser_core.runtime import StandaloneRuntime
    from diffueraser_core.temporal_sampling import Conditioning, WindowSettings, denoise_windows, pairs_down

    runtime = StandaloneRuntime(device=torch.device("cpu"))
    models = DiffuEraserModels(
        unet=runtime.wrap(build_unet_main(seed=1), "unet"), brushnet=runtime.wrap(build_brushnet(seed=2), "brushnet")
    )
    gen = torch.Generator().manual_seed(0)
    prior = torch.randn(6, 4, 4, 6, generator=gen) * 4.0  # raw latents (x 0.18215 ~ unit scale)
    cond = Conditioning(torch.randn(6, 4, 4, 6, generator=gen), torch.rand(6, 4, 6, generator=gen) > 0.3)
    text = torch.randn(1, 8, 32, generator=gen)
    window = WindowSettings(window_length=4)  # 6 frames -> two overlapping windows per step
    settings = InjectionSettings(mode="ddim_inversion", window_length=4, strength=0.5, inversion_steps=2)

    start = invert_prior(prior, cond, text, models, settings, runtime)
    assert start.mode == "ddim_inversion" and start.start_timestep == 499 and start.noise is None
    moved = (start.latent - prior).abs().mean()
    assert moved > 0.2 * prior.abs().mean()  # really noised
    again = invert_prior(prior, cond, text, models, settings, runtime)
    assert torch.equal(start.latent, again.latent)  # deterministic: no noise drawn

    pairs = pairs_down(tcd_timesteps(2, 0.5))
    back = denoise_windows(start.latent * VAE_SCALING, pairs, cond, text, None, models, window, runtime) / VAE_SCALING
    forward = inject_forward_noise(prior, InjectionSettings(window_length=4, strength=0.5))
    sampled = denoise_windows(forward.latent * VAE_SCALING, pairs, cond, text, None, models, window, runtime)
    round_trip_error = (back - prior).abs().mean()
    assert round_trip_error < 0.02 * prior.abs().mean()
    assert round_trip_error < 0.01 * (sampled / VAE_SCALING - prior).abs().mean()
