"""Half precision on real CPU kernels: the tiny pipeline (tiny diffusion networks, the real ProPainter networks)
in float16 and bfloat16 against float32, through ``StandaloneRuntime(dtype=...)``.

CPU ``grid_sample`` in half precision is broken upstream (pytorch#127224); the harness alone upcasts it to float32
(the GPU kernels are fine), so everything else runs in the half dtype as on a GPU. Tolerances are on the uint8
result (mean and largest difference over the changed pixels); outside what the runs changed the input must come
back bit for bit whatever the dtype.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from diffueraser_core.models.flow_completion import RecurrentFlowCompleteNet
from diffueraser_core.models.propainter import InpaintGenerator
from diffueraser_core.models.raft import RAFT
from diffueraser_core.pipeline import DiffuEraserModels, DiffusersVaeCodec, SamplerSettings, remove_objects
from diffueraser_core.prior_injection import InjectionSettings
from diffueraser_core.prior_propainter import ProPainterNets, ProPainterSettings
from diffueraser_core.runtime import StandaloneRuntime
from tests.test_faults import build_tiny_nets, make_clip, text_embedding

SAMPLER = dict(steps=1, window_length=2, mask_dilation=2)
PRIOR = dict(resize_ratio=1.0, raft_iter=2, mask_dilation=2)
#: (mean, max) |half - fp32| over the pixels either run changed, in uint8 levels. Measured on this clip (dev VM,
#: torch 2.13 CPU): fp16 0.07 / 1, bf16 0.54 / 6 (bf16 keeps 8 mantissa bits to fp16's 11)
TOLERANCE = {torch.float16: (0.5, 4), torch.bfloat16: (2.0, 16)}


def _grid_sample_upcast(original):
    def grid_sample(x, grid, *args, **kwargs):
        if x.dtype in (torch.float16, torch.bfloat16) and x.device.type == "cpu":
            return original(x.float(), grid.float(), *args, **kwargs).to(x.dtype)
        return original(x, grid, *args, **kwargs)

    return grid_sample


@pytest.fixture(scope="module")
def networks():
    torch.manual_seed(0)
    propainter = (RAFT(), RecurrentFlowCompleteNet(), InpaintGenerator(init_weights=True))
    return build_tiny_nets(), propainter


@pytest.fixture(scope="module")
def clip():
    return make_clip(5, 64, 64, seed=3)


def _run(networks, clip, dtype):
    (unet, brushnet, vae), (raft, completion, generator) = copy.deepcopy(networks)
    runtime = StandaloneRuntime(device=torch.device("cpu"), dtype=dtype)
    models = DiffuEraserModels(unet=runtime.wrap(unet, "unet_main"), brushnet=runtime.wrap(brushnet, "brushnet"))
    codec = DiffusersVaeCodec(runtime.wrap(vae, "vae"), runtime)
    nets = ProPainterNets(raft=runtime.wrap(raft, "propainter_raft"),
                          flow_completion=runtime.wrap(completion, "propainter_flow_completion"),
                          generator=runtime.wrap(generator, "propainter_generator"))
    sampler = SamplerSettings(**SAMPLER)
    frames, masks = clip
    with torch.inference_mode():
        return remove_objects(
            frames, masks, propainter_nets=nets, runtime=runtime, models=models, codec=codec,
            text_embeddings=text_embedding(), sampler_settings=sampler,
            injection_settings=InjectionSettings(seed=0, window_length=sampler.window_length),
            propainter_settings=ProPainterSettings(**PRIOR), feather=3,
        )


@pytest.fixture(scope="module")
def fp32_result(networks, clip):
    return _run(networks, clip, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_matches_fp32(networks, clip, fp32_result, dtype, monkeypatch):
    monkeypatch.setattr(F, "grid_sample", _grid_sample_upcast(F.grid_sample))
    frames, masks = clip
    out = _run(networks, clip, dtype)
    assert out.dtype == torch.uint8 and out.shape == frames.shape
    changed = (out != frames).any(-1) | (fp32_result != frames).any(-1)
    # outside what either run changed, both are the input: nothing outside the mask depends on the dtype
    assert torch.equal(out[~changed], frames[~changed])
    assert changed.any()
    diff = (out.float() - fp32_result.float()).abs()[changed]
    mean_limit, max_limit = TOLERANCE[dtype]
    assert diff.mean().item() <= mean_limit, diff.mean().item()
    assert diff.max().item() <= max_limit, diff.max().item()
    # and the half run is not the fp32 one by accident (the dtype reached the networks)
    assert not torch.equal(out, fp32_result)
