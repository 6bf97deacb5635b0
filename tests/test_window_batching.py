"""Window batching: several equal-length windows of one step in one BrushNet + UNet forward (tiny models, CPU)."""

import logging

import pytest
import torch

from diffueraser_core import temporal_sampling
from diffueraser_core.errors import InputError
from diffueraser_core.pipeline import DiffuEraserModels
from diffueraser_core.prior_injection import tcd_timesteps
from diffueraser_core.random_weights.diffusion import build_brushnet, build_unet_main
from diffueraser_core.runtime import StandaloneRuntime
from diffueraser_core.temporal_sampling import Conditioning, WindowSettings, denoise_windows, pairs_down

TEXT_DIM = 32  # the tiny UNet's cross_attention_dim
LATENT_HW = (4, 6)
NUM_FRAMES = 30
WINDOW = 8  # overlap 2, stride 6: list A = [0,8) [6,14) [12,20) [18,26) [22,30); list B = [0,8) [4,12) ... [22,30)
PAIRS = pairs_down(tcd_timesteps(2))  # two steps: both window lists are used
# Every list of windows_for_step has full-length windows; this one (used through monkeypatching) has a run of
# three 8-frame windows, two 6-frame windows and a 4-frame one, each overlapping only its predecessor's tail.
UNEQUAL = [(0, 8), (6, 14), (12, 20), (18, 24), (22, 28), (26, 30)]


@pytest.fixture(scope="module")
def nets():
    return build_unet_main(seed=1), build_brushnet(seed=2)


class Counting(torch.nn.Module):
    """Passes through to ``inner``, recording the leading size of every ``sample`` it sees; with ``limit`` set it
    runs out of memory (as a small device would) on a leading size above the limit."""

    def __init__(self, inner, limit=None):
        super().__init__()
        self.inner = inner
        self.limit = limit
        self.sizes = []
        self.refused = 0

    def forward(self, sample, *args, **kwargs):
        if self.limit is not None and sample.shape[0] > self.limit:
            self.refused += 1
            raise torch.OutOfMemoryError("simulated: CUDA out of memory")
        self.sizes.append(int(sample.shape[0]))
        return self.inner(sample, *args, **kwargs)


class Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, stage, done, total, preview=None):
        self.calls.append((stage, done, total))


def make_models(runtime, unet, brushnet):
    return DiffuEraserModels(unet=runtime.wrap(unet, "unet"), brushnet=runtime.wrap(brushnet, "brushnet"))


def inputs(num=NUM_FRAMES):
    gen = torch.Generator().manual_seed(7)
    known = torch.rand((num, *LATENT_HW), generator=gen) > 0.3
    cond = Conditioning(torch.randn((num, 4, *LATENT_HW), generator=gen), known)
    x = torch.randn((num, 4, *LATENT_HW), generator=gen)
    return x, cond


def text(seed=0):
    return torch.randn((1, 8, TEXT_DIM), generator=torch.Generator().manual_seed(100 + seed))


def run(nets, per_batch, cfg, runtime=None, unet=None, brushnet=None):
    runtime = runtime or StandaloneRuntime(device=torch.device("cpu"))
    models = make_models(runtime, unet or nets[0], brushnet or nets[1])
    x, cond = inputs()
    negative = text(seed=5) if cfg else None
    settings = WindowSettings(window_length=WINDOW, guidance_scale=3.0 if cfg else 0.0, windows_per_batch=per_batch)
    return denoise_windows(x, PAIRS, cond, text(), negative, models, settings, runtime)


@pytest.fixture
def unequal_windows(monkeypatch):
    monkeypatch.setattr(temporal_sampling, "windows_for_step", lambda *args, **kwargs: list(UNEQUAL))


@pytest.fixture(scope="module")
def reference(nets):
    """The one-window-per-forward results, full-length and unequal-length schedules, without and with CFG."""
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        for cfg in (False, True):
            out["full", cfg] = run(nets, 1, cfg)
        mp.setattr(temporal_sampling, "windows_for_step", lambda *args, **kwargs: list(UNEQUAL))
        for cfg in (False, True):
            out["unequal", cfg] = run(nets, 1, cfg)
    return out


@pytest.mark.parametrize("cfg", [False, True], ids=["plain", "cfg"])
@pytest.mark.parametrize("per_batch", [2, 3, 8])
def test_batched_equals_one_window_at_a_time(nets, reference, per_batch, cfg):
    torch.testing.assert_close(run(nets, per_batch, cfg), reference["full", cfg], rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("cfg", [False, True], ids=["plain", "cfg"])
@pytest.mark.parametrize("per_batch", [2, 3])
def test_unequal_windows_batch_only_within_equal_lengths(nets, reference, unequal_windows, per_batch, cfg):
    unet = Counting(nets[0])
    out = run(nets, per_batch, cfg, unet=unet)
    torch.testing.assert_close(out, reference["unequal", cfg], rtol=1e-6, atol=1e-5)
    # lengths 8 8 8 | 6 6 | 4: groups never mix lengths and hold at most per_batch windows
    groups = {2: [2, 1, 2, 1], 3: [3, 2, 1]}[per_batch]
    videos = 2 if cfg else 1
    assert unet.sizes == [g * videos for g in groups] * len(PAIRS)


@pytest.mark.parametrize("per_batch", [1, 2, 8])
def test_forwards_are_batched_and_memory_hint_scales(nets, per_batch):
    unet, brushnet = Counting(nets[0]), Counting(nets[1])
    runtime = StandaloneRuntime(device=torch.device("cpu"))
    models = make_models(runtime, unet, brushnet)
    hints = []
    for handle in (models.unet, models.brushnet):
        acquire = handle.acquire

        def recording(memory_required=0, _acquire=acquire, _name=handle.name):
            hints.append((_name, memory_required))
            return _acquire(memory_required=memory_required)

        handle.acquire = recording
    x, cond = inputs()
    settings = WindowSettings(window_length=WINDOW, guidance_scale=3.0, windows_per_batch=per_batch)
    denoise_windows(x, PAIRS, cond, text(), text(seed=5), models, settings, runtime)

    windows = 5 + 5  # five windows in each of the two steps
    per_step = [min(per_batch, 5 - i) for i in range(0, 5, per_batch)]
    assert unet.sizes == [2 * k for k in per_step] * 2  # uncond + cond per window
    assert brushnet.sizes == [2 * k * WINDOW for k in per_step] * 2  # BrushNet sees the frames folded in
    if per_batch == 1:
        assert len(unet.sizes) == len(brushnet.sizes) == windows
    else:
        assert len(unet.sizes) == len(brushnet.sizes) < windows
    one_video = temporal_sampling._memory_hint(WINDOW, LATENT_HW, 1, runtime.dtype)
    assert [h for name, h in hints if name == "unet"] == [2 * k * one_video for k in per_step] * 2
    assert [h for name, h in hints if name == "brushnet"] == [2 * k * one_video for k in per_step] * 2


def progress_and_interrupt_checks(nets, per_batch):
    rec = Recorder()
    interrupts = []
    runtime = StandaloneRuntime(
        device=torch.device("cpu"), progress_callback=rec, interrupt_flag=lambda: interrupts.append(1) and False
    )
    run(nets, per_batch, False, runtime=runtime)
    return rec.calls, len(interrupts)


@pytest.fixture(scope="module")
def unbatched_progress(nets):
    return progress_and_interrupt_checks(nets, 1)


@pytest.mark.parametrize("per_batch", [2, 3])
def test_progress_once_per_window_in_order(nets, unbatched_progress, per_batch):
    single, single_checks = unbatched_progress
    batched, batched_checks = progress_and_interrupt_checks(nets, per_batch)
    assert single == [("sampling", i, 10) for i in range(0, 11)]  # announced at 0, then one per window
    assert batched == single
    assert single_checks == 10
    assert batched_checks == 2 * len(range(0, 5, per_batch))  # at least once per group


@pytest.mark.parametrize("cfg", [False, True], ids=["plain", "cfg"])
def test_oom_on_a_batch_falls_back_to_one_window_at_a_time(nets, reference, caplog, cfg):
    videos = 2 if cfg else 1
    unet = Counting(nets[0], limit=videos)  # fits one window's videos, never two windows
    with caplog.at_level(logging.WARNING, logger="diffueraser_core.temporal_sampling"):
        out = run(nets, 3, cfg, unet=unet)
    torch.testing.assert_close(out, reference["full", cfg], rtol=1e-6, atol=1e-5)
    assert unet.refused == 1  # after the first OOM no batch is tried again in this call
    assert unet.sizes == [videos] * 10
    warnings = [r for r in caplog.records if "batch of 3 windows" in r.getMessage()]
    assert len(warnings) == 1


def test_oom_fallback_keeps_the_single_window_ladder(nets, reference):
    # A device that fits only one video: the batch falls back, then each window splits its CFG batch as before.
    unet = Counting(nets[0], limit=1)
    out = run(nets, 8, True, unet=unet)
    torch.testing.assert_close(out, reference["full", True], rtol=1e-6, atol=1e-5)
    assert unet.sizes == [1] * 20


def test_other_errors_in_a_batch_propagate(nets):
    class Broken(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, sample, *args, **kwargs):
            raise RuntimeError("not a memory problem")

    with pytest.raises(RuntimeError, match="not a memory problem"):
        run(nets, 2, False, unet=Broken(nets[0]))


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", None])
def test_invalid_windows_per_batch(nets, bad):
    with pytest.raises(InputError, match=r"DiffuEraser Sampler.*windows_per_batch.*" + repr(bad).replace(".", r"\.")):
        WindowSettings(windows_per_batch=bad)
    # also when the field was changed after construction
    settings = WindowSettings(window_length=WINDOW)
    settings.windows_per_batch = bad
    runtime = StandaloneRuntime(device=torch.device("cpu"))
    x, cond = inputs()
    with pytest.raises(InputError, match=r"windows_per_batch"):
        denoise_windows(x, PAIRS, cond, text(), None, make_models(runtime, *nets), settings, runtime)


def test_integral_float_is_accepted():
    assert WindowSettings(windows_per_batch=4.0).windows_per_batch == 4
    assert WindowSettings().windows_per_batch == 1
