"""Faults: cancel inside each stage, out of memory inside a chunk of each stage, an exception inside a window.

The stages run for real (``pipeline.remove_objects``: ProPainter prior -> VAE encode -> pre-inference -> sampling
-> VAE decode -> blend) on tiny random diffusion networks. The three ProPainter networks exist only at their
official full size (seconds per frame on a CPU), so the prior stage runs here with light stand-ins that have the
same call signatures and use the real image propagation; the real networks' chunking and OOM retry are checked
in tests/test_prior_propainter.py.

Out of memory is raised the way ComfyUI sees it: ``comfy.model_management.OOM_EXCEPTION`` is
``torch.cuda.OutOfMemoryError`` (= ``torch.OutOfMemoryError``), raised here from inside a network call on a chunk
of more than one frame, once. A stage must then retry with a smaller chunk and give the same frames.

This module also holds the helpers the other reliability tests import (test_bad_input_matrix.py,
test_nothing_lost.py): the stand-in ProPainter networks, a tracking runtime, and the tiny pipeline parts.
"""

from __future__ import annotations

import os

import pytest
import torch

from diffueraser_core.errors import DiffuEraserError, Interrupted
from diffueraser_core.models.flow_completion import RecurrentFlowCompleteNet
from diffueraser_core.models.propainter import propagate_image
from diffueraser_core.pipeline import DiffuEraserModels, DiffusersVaeCodec, SamplerSettings, remove_objects
from diffueraser_core.prior_injection import InjectionSettings
from diffueraser_core.prior_propainter import ProPainterNets, ProPainterSettings
from diffueraser_core.runtime import ModelHandle, StandaloneRuntime

# ComfyUI's model_management.OOM_EXCEPTION on every torch it supports.
COMFY_OOM_EXCEPTION = torch.cuda.OutOfMemoryError
TEXT_DIM = 32  # cross_attention_dim of the tiny UNet
#: pipeline stages in the order remove_objects runs them (progress stage names)
STAGE_ORDER = ("prior", "encode", "pre-inference", "sampling", "decode", "blend")


# ------------------------------------------------------------------------------------------------------------
# Helpers shared with the other reliability tests


class StandInRaft(torch.nn.Module):
    """RAFT's call signature; flow = scaled colour difference of the pair."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(0.5))

    def forward(self, image1, image2, iters=20, flow_init=None, test_mode=True):
        flow = (image2 - image1)[:, :2] * self.scale * iters
        return flow[..., ::8, ::8], flow


class StandInFlowCompletion(torch.nn.Module):
    """RecurrentFlowCompleteNet's calls; masked flow plus a drift that depends on the whole chunk."""

    combine_flow = staticmethod(RecurrentFlowCompleteNet.combine_flow)

    def __init__(self):
        super().__init__()
        self.gain = torch.nn.Parameter(torch.tensor(0.2))

    def forward_bidirect_flow(self, flows_bi, masks):
        forward = flows_bi[0] * (1 - masks[:, :-1])
        backward = flows_bi[1] * (1 - masks[:, 1:])
        return [forward + self.gain * forward.mean(), backward + self.gain * backward.mean()], [None, None]


class StandInGenerator(torch.nn.Module):
    """InpaintGenerator's calls: the real image propagation, a transformer that mixes neighbours and references."""

    def __init__(self):
        super().__init__()
        self.mix = torch.nn.Parameter(torch.tensor(0.3))

    def img_propagation(self, masked_frames, completed_flows, masks, interpolation="nearest"):
        return propagate_image(masked_frames, completed_flows[0], completed_flows[1], masks, interpolation)

    def forward(self, frames, flows, masks_in, masks_updated, local):
        context = frames.mean(dim=1, keepdim=True)
        out = frames[:, :local] * (1 - self.mix) + context * self.mix + 0.1 * masks_in[:, :local]
        return torch.tanh(out)


def stand_in_propainter(runtime) -> ProPainterNets:
    return ProPainterNets(
        raft=runtime.wrap(StandInRaft(), "propainter_raft"),
        flow_completion=runtime.wrap(StandInFlowCompletion(), "propainter_flow_completion"),
        generator=runtime.wrap(StandInGenerator(), "propainter_generator"),
    )


class TrackingHandle(ModelHandle):
    """A standalone handle that remembers whether a stage still holds it (acquired and not released)."""

    held = False

    def acquire(self, memory_required: int = 0):
        self.held = True
        return super().acquire(memory_required)

    def release(self) -> None:
        self.held = False
        super().release()


class TrackingRuntime(StandaloneRuntime):
    """CPU runtime that records progress events and held handles, and can cancel after the n-th event of a stage."""

    def __init__(self, cancel_after=None):
        super().__init__(device=torch.device("cpu"))
        self.events = []
        self.handles = []
        self.cancel_after = cancel_after  # (stage, number of that stage's progress events)
        self.cancel = False  # set by a test hook, e.g. after the n-th call of a network
        self.interrupt_flag = self._cancelled

    def wrap(self, module, name):
        module.eval().requires_grad_(False)
        handle = TrackingHandle(module, self, name)
        self.handles.append(handle)
        return handle

    def progress(self, stage, done, total, preview=None, preview_latent=None):
        self.events.append((stage, done, total))

    def _cancelled(self) -> bool:
        if self.cancel or self.cancel_after is None:
            return self.cancel
        stage, count = self.cancel_after
        return sum(1 for event in self.events if event[0] == stage) >= count

    def stages_seen(self):
        return {event[0] for event in self.events}

    def held(self):
        return sorted(h.name for h in self.handles if h.held)


def raise_once(monkeypatch, obj, method: str, make_exc, when=lambda *a, **k: True) -> dict:
    """Make ``obj.method`` raise ``make_exc()`` on its first call for which ``when(args)`` holds; count calls."""
    original = getattr(obj, method)
    state = {"raised": 0, "calls": 0}

    def wrapper(*args, **kwargs):
        state["calls"] += 1
        if not state["raised"] and when(*args, **kwargs):
            state["raised"] += 1
            raise make_exc()
        return original(*args, **kwargs)

    monkeypatch.setattr(obj, method, wrapper)
    return state


def comfy_oom():
    return COMFY_OOM_EXCEPTION("simulated: CUDA out of memory. Tried to allocate 2.00 GiB")


def build_tiny_nets(seed: int = 0):
    """(unet_main, brushnet, vae) tiny random networks in the official classes, in memory."""
    from diffueraser_core.random_weights.diffusion import build_brushnet, build_unet_main
    from diffueraser_core.random_weights.sd15 import build_vae

    return build_unet_main(seed=seed + 1), build_brushnet(seed=seed + 2), build_vae(seed=seed + 3)


def text_embedding(seed: int = 0) -> torch.Tensor:
    return torch.randn((1, 8, TEXT_DIM), generator=torch.Generator().manual_seed(100 + seed))


def make_clip(count: int, height: int, width: int, seed: int = 0):
    """Random uint8 frames and a box mask that moves a little per frame."""
    gen = torch.Generator().manual_seed(seed)
    frames = torch.randint(0, 256, (count, height, width, 3), generator=gen, dtype=torch.uint8)
    masks = torch.zeros((count, height, width), dtype=torch.bool)
    for i in range(count):
        top, left = height // 4 + i % 3, width // 4 + (2 * i) % 5
        masks[i, top : top + height // 3, left : left + width // 3] = True
    return frames, masks


# One TCD step and 2-frame windows keep a whole run to a few windows on a busy CPU; 5 frames > 2 windows, so the
# pre-inference runs too. (Both window lists are exercised in test_nothing_lost.py.)
FAST_SAMPLER = dict(steps=1, window_length=2, mask_dilation=2)
FAST_PRIOR = dict(resize_ratio=1.0, raft_iter=1, mask_dilation=2)


def run_pipeline(nets, frames, masks, runtime, sampler=None, prior=None, feather: int = 5, seed: int = 0):
    """remove_objects on the tiny networks with the stand-in prior; returns uint8 [T,H,W,3]."""
    unet, brushnet, vae = nets
    models = DiffuEraserModels(unet=runtime.wrap(unet, "unet_main"), brushnet=runtime.wrap(brushnet, "brushnet"))
    codec = DiffusersVaeCodec(runtime.wrap(vae, "vae"), runtime)
    sampler_settings = SamplerSettings(**{**FAST_SAMPLER, **(sampler or {})})
    return remove_objects(
        frames,
        masks,
        propainter_nets=stand_in_propainter(runtime),
        runtime=runtime,
        models=models,
        codec=codec,
        text_embeddings=text_embedding(),
        sampler_settings=sampler_settings,
        injection_settings=InjectionSettings(seed=seed, window_length=sampler_settings.window_length),
        propainter_settings=ProPainterSettings(**{**FAST_PRIOR, **(prior or {})}),
        feather=feather,
    )


# ------------------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def nets():
    return build_tiny_nets()


@pytest.fixture(scope="module")
def clip():
    return make_clip(5, 64, 64, seed=1)


@pytest.fixture(scope="module")
def clean_run(nets, clip):
    runtime = TrackingRuntime()
    out = run_pipeline(nets, *clip, runtime)
    return out, runtime


# ------------------------------------------------------------------------------------------------------------
# Cancel


def test_clean_run_reports_every_stage_and_releases_every_network(clean_run, clip):
    out, runtime = clean_run
    assert out.shape == clip[0].shape
    assert runtime.stages_seen() == set(STAGE_ORDER)
    assert runtime.held() == []


# How to cancel "in the middle" of each stage: after its first progress event (stages that report per chunk or
# window), or after a network call inside it (the VAE stages report once per 16 frames; the first VAE decode call
# belongs to the pre-inference, the second to the decode stage).
CANCEL_POINTS = {
    "prior": ("event", "prior", 1),
    "encode": ("call", "vae", "encode", 1),
    "pre-inference": ("event", "pre-inference", 1),
    "sampling": ("event", "sampling", 1),
    "decode": ("call", "vae", "decode", 2),
}


class _CancellingRuntime(TrackingRuntime):
    def __init__(self, monkeypatch, point):
        super().__init__(cancel_after=point[1:] if point[0] == "event" else None)
        self.monkeypatch = monkeypatch
        self.point = point

    def wrap(self, module, name):
        handle = super().wrap(module, name)
        if self.point[0] == "call" and name == self.point[1]:
            _, _, method, nth = self.point
            original = getattr(module, method)
            count = {"n": 0}

            def counting(*args, **kwargs):
                result = original(*args, **kwargs)
                count["n"] += 1
                if count["n"] >= nth:
                    self.cancel = True
                return result

            self.monkeypatch.setattr(module, method, counting)
        return handle


@pytest.mark.parametrize("stage", sorted(CANCEL_POINTS, key=STAGE_ORDER.index))
def test_cancel_in_the_middle_of_each_stage(nets, clip, monkeypatch, stage):
    runtime = _CancellingRuntime(monkeypatch, CANCEL_POINTS[stage])
    with pytest.raises(Interrupted):
        run_pipeline(nets, *clip, runtime)
    seen = runtime.stages_seen()
    later = set(STAGE_ORDER[STAGE_ORDER.index(stage) + 1 :])
    assert not (seen & later), f"cancel in {stage} went on to {sorted(seen & later)}"
    assert runtime.held() == [], f"cancel in {stage} left networks acquired: {runtime.held()}"


# ------------------------------------------------------------------------------------------------------------
# Out of memory inside a chunk


def _more_than_one_frame():
    def when(*args, **kwargs):
        x = args[0]
        if isinstance(x, (list, tuple)):
            x = x[0]
        # [N,...] batches of frames or [1,T,...] clips: either way more than one frame in the chunk
        return x.shape[0] > 1 or (x.dim() == 5 and x.shape[1] > 1)

    return when


# where -> (network name suffix, method, condition on its arguments)
OOM_SITES = {
    "prior RAFT chunk": ("raft", "forward", _more_than_one_frame()),
    "prior flow completion chunk": ("flow_completion", "forward_bidirect_flow", _more_than_one_frame()),
    "prior image propagation chunk": ("generator", "img_propagation", _more_than_one_frame()),
    "prior transformer step": ("generator", "forward", lambda *a, **k: True),
    "VAE encode chunk": ("vae", "encode", _more_than_one_frame()),
    "VAE decode chunk": ("vae", "decode", _more_than_one_frame()),
}


class _OomEverywhereRuntime(TrackingRuntime):
    """Raises one out-of-memory error inside a chunk of every site of ``OOM_SITES`` (networks are patched as the
    pipeline wraps them; the stand-ins are created per run)."""

    def __init__(self, monkeypatch, sites, table=None):
        super().__init__()
        self.monkeypatch = monkeypatch
        self.sites = sites
        self.table = OOM_SITES if table is None else table
        self.states = {}

    def wrap(self, module, name):
        handle = super().wrap(module, name)
        for site in self.sites:
            target, method, when = self.table[site]
            if name.endswith(target) and site not in self.states:
                self.states[site] = raise_once(self.monkeypatch, module, method, comfy_oom, when)
        return handle


@pytest.mark.parametrize("site", [s for s in OOM_SITES if s.startswith("prior")])
def test_out_of_memory_inside_a_prior_chunk_retries_and_gives_the_same_frames(clip, monkeypatch, site):
    from diffueraser_core.prior_propainter import run_propainter_prior

    settings = ProPainterSettings(**FAST_PRIOR)
    clean = run_propainter_prior(*clip, stand_in_propainter(TrackingRuntime()), settings, TrackingRuntime())
    runtime = _OomEverywhereRuntime(monkeypatch, [site])
    again = run_propainter_prior(*clip, stand_in_propainter(runtime), settings, runtime)
    assert runtime.states[site]["raised"] == 1, f"{site}: the OOM was never raised"
    assert torch.equal(again.frames, clean.frames) and torch.equal(again.masks, clean.masks)
    assert runtime.held() == []


@pytest.mark.parametrize("direction", ["encode", "decode"])
def test_out_of_memory_inside_a_vae_chunk_halves_the_chunk_and_gives_the_same_result(nets, clip, monkeypatch,
                                                                                      direction):
    vae = nets[2]
    frames = clip[0]
    clean_codec = DiffusersVaeCodec(TrackingRuntime().wrap(vae, "vae"), TrackingRuntime())
    latents = clean_codec.encode(frames)
    expected = latents if direction == "encode" else clean_codec.decode(latents)
    runtime = _OomEverywhereRuntime(monkeypatch, [f"VAE {direction} chunk"])
    codec = DiffusersVaeCodec(runtime.wrap(vae, "vae"), runtime)
    got = codec.encode(frames) if direction == "encode" else codec.decode(latents)
    assert runtime.states[f"VAE {direction} chunk"]["raised"] == 1
    assert torch.equal(got, expected)
    assert runtime.held() == []


def test_out_of_memory_once_in_every_retrying_stage_gives_the_same_frames(nets, clip, clean_run, monkeypatch):
    runtime = _OomEverywhereRuntime(monkeypatch, sorted(OOM_SITES))
    out = run_pipeline(nets, *clip, runtime)
    assert {site: state["raised"] for site, state in runtime.states.items()} == {site: 1 for site in OOM_SITES}
    assert torch.equal(out, clean_run[0]), "a retry after out of memory changed the frames"
    assert runtime.held() == []


@pytest.mark.parametrize("network", ["unet_main", "brushnet"])
def test_out_of_memory_inside_a_sampling_window_retries_and_gives_the_same_frames(
    nets, clip, clean_run, monkeypatch, network
):
    table = {"sampling window": (network, "forward", lambda *a, **k: True)}
    runtime = _OomEverywhereRuntime(monkeypatch, ["sampling window"], table)
    out = run_pipeline(nets, *clip, runtime)
    assert runtime.states["sampling window"]["raised"] == 1
    assert torch.equal(out, clean_run[0])


# ------------------------------------------------------------------------------------------------------------
# An exception in one window / chunk


class _Boom(RuntimeError):
    pass


EXCEPTION_SITES = {
    # network name -> method that raises (on its first call, i.e. in the first chunk / window of its stage)
    "propainter_raft": "forward",
    "propainter_flow_completion": "forward_bidirect_flow",
    "propainter_generator": "forward",
    "vae": "encode",
    "brushnet": "forward",
    "unet_main": "forward",
}


@pytest.mark.parametrize("network", sorted(EXCEPTION_SITES))
def test_an_exception_in_one_window_leaves_no_network_acquired(nets, clip, monkeypatch, network):
    method = EXCEPTION_SITES[network]

    class Runtime(TrackingRuntime):
        state = None

        def wrap(self, module, name):
            handle = super().wrap(module, name)
            if name == network and self.state is None:
                self.state = raise_once(monkeypatch, module, method, lambda: _Boom(f"failure in {name}"))
            return handle

    runtime = Runtime()
    with pytest.raises(_Boom):
        run_pipeline(nets, *clip, runtime)
    assert runtime.state["raised"] == 1
    assert runtime.held() == [], f"an exception in {network} left {runtime.held()} acquired"


# ------------------------------------------------------------------------------------------------------------
# The CLI: no half-written output


@pytest.fixture(scope="module")
def cli_inputs(tmp_path_factory):
    """A tiny models folder (diffusion networks as the official files; ProPainter as placeholders, served by the
    stand-ins) and a 6-frame video with its mask image."""
    from diffueraser_core.random_weights import make_models_folder
    from diffueraser_core.media_out import write_video

    root = tmp_path_factory.mktemp("cli")
    models = root / "models"
    make_models_folder(str(models), propainter=False)
    (models / "propainter").mkdir()
    for name in ("raft-things.pth", "recurrent_flow_completion.pth", "ProPainter.pth"):
        (models / "propainter" / name).write_bytes(b"placeholder: the stand-in networks are used")
    frames, masks = make_clip(6, 64, 64, seed=2)
    video = write_video(root / "in.mp4", frames, 24)
    import cv2

    mask_file = root / "mask.png"
    cv2.imwrite(str(mask_file), masks[0].numpy().astype("uint8") * 255)
    return {"models": models, "video": video, "mask": mask_file, "root": root}


def _cli(monkeypatch, cli_inputs, output, *extra):
    from diffueraser_core import cli, model_loading

    monkeypatch.setattr(model_loading, "load_propainter", lambda found, runtime: stand_in_propainter(runtime))
    argv = [str(cli_inputs["video"]), str(cli_inputs["mask"]), str(output), "--models", str(cli_inputs["models"]),
            "--device", "cpu", "--quiet", "--steps", "1", "--window-length", "2", "--mask-dilation", "2",
            "--raft-iter", "1",
            "--resize-ratio", "1.0"]
    return cli.main(argv + list(extra))


@pytest.mark.parametrize("failure", [_Boom("a window failed"), KeyboardInterrupt()], ids=["exception", "ctrl-c"])
def test_cli_failure_in_a_window_writes_no_output(monkeypatch, cli_inputs, tmp_path, failure):
    from diffueraser_core.models.unet_motion import DiffuEraserUNet

    calls = {"n": 0}
    original = DiffuEraserUNet.forward

    def failing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise failure
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DiffuEraserUNet, "forward", failing)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(type(failure)):
        _cli(monkeypatch, cli_inputs, out_dir / "result.mp4")
    assert calls["n"] == 1
    assert os.listdir(out_dir) == [], "a failed run left a (partial) file behind"


def test_cli_bad_input_exits_1_with_the_reason_and_writes_nothing(monkeypatch, cli_inputs, tmp_path, capsys):
    out = tmp_path / "result.mp4"
    rc = _cli(monkeypatch, cli_inputs, out, "--steps", "0")
    assert rc == 1
    err = capsys.readouterr().err
    assert "steps must be an integer in 1..50, got 0" in err
    assert not out.exists()


def test_cli_cancel_exits_130_and_writes_nothing(monkeypatch, cli_inputs, tmp_path, capsys):
    from diffueraser_core.runtime import StandaloneRuntime as Base

    def check_interrupt(self):
        raise Interrupted("DiffuEraser: run cancelled")

    monkeypatch.setattr(Base, "check_interrupt", check_interrupt)
    out = tmp_path / "result.mp4"
    assert _cli(monkeypatch, cli_inputs, out) == 130
    assert "cancelled" in capsys.readouterr().err
    assert not out.exists() and os.listdir(tmp_path) == []


def test_errors_are_value_errors_for_hosts():
    # ComfyUI shows ValueError messages as they are; the pack's errors must stay ValueErrors.
    assert issubclass(DiffuEraserError, ValueError)


class _FakeDeviceRuntime(StandaloneRuntime):
    """Standalone runtime that records module moves instead of using a GPU (none on CI)."""

    def __init__(self):
        super().__init__(device=torch.device("cpu"))
        self.device = torch.device("meta")  # not "cpu": release() must consider offloading
        self.moves = []

    def wrap(self, module, name):
        handle = super().wrap(module, name)
        runtime = self

        class Recorder(torch.nn.Module):
            def to(self, *args, **kwargs):
                runtime.moves.append((name, str(kwargs.get("device", args[0] if args else None))))
                return self

        handle.module = Recorder()
        return handle


def test_a_released_network_is_offloaded_only_when_another_is_acquired():
    runtime = _FakeDeviceRuntime()
    vae, unet = runtime.wrap(torch.nn.Identity(), "vae"), runtime.wrap(torch.nn.Identity(), "unet")
    for _ in range(3):  # a stage calling the VAE chunk by chunk: acquire, release, acquire, ...
        vae.acquire()
        vae.release()
    assert ("vae", "cpu") not in runtime.moves, "the VAE went back to the CPU between chunks"
    unet.acquire()
    assert ("vae", "cpu") in runtime.moves and runtime.released == []
