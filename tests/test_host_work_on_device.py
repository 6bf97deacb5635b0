"""Per-frame image work on the compute device (issue 12, item 5): the composite and the BrushNet conditioning's
resizes and mask preparation run a chunk at a time where ``device=`` says. On the CPU the result is the host
path's bit for bit; on the simulated GPU (device_sim.py) no op mixes device and host tensors."""

from __future__ import annotations

import torch

from diffueraser_core.blend import blend_video
from diffueraser_core.device_sim import DeviceSimulator
from diffueraser_core.pipeline import DiffusersVaeCodec
from diffueraser_core.runtime import StandaloneRuntime
from diffueraser_core.temporal_sampling import build_conditioning


def _clip(seed: int = 7):
    gen = torch.Generator().manual_seed(seed)
    original = torch.randint(0, 256, (5, 72, 96, 3), generator=gen, dtype=torch.uint8)
    generated = torch.randint(0, 256, (5, 40, 56, 3), generator=gen, dtype=torch.uint8)
    masks = torch.zeros((5, 72, 96), dtype=torch.bool)
    masks[:, 20:40, 30:60] = True
    masks[2, 50:60, 5:15] = True
    return original, generated, masks


def test_blend_on_a_device_equals_the_host_path_and_mixes_no_devices():
    original, generated, masks = _clip()
    host = blend_video(original, generated, masks, mask_dilation=2, feather=7, chunk=2)
    on_device = blend_video(original, generated, masks, mask_dilation=2, feather=7, chunk=2,
                            device=torch.device("cpu"))
    assert torch.equal(host, on_device)
    simulator = DeviceSimulator()
    with simulator:
        simulated = blend_video(original, generated, masks, mask_dilation=2, feather=7, chunk=2,
                                device=torch.device("meta"))
    assert simulated.device.type == "cpu" and simulated.shape == original.shape
    simulator.book("blend")
    assert simulator.stages["blend"].flops > 0  # the feather's convolutions ran on the device


def test_conditioning_on_a_device_equals_the_host_path():
    from diffueraser_core.random_weights.sd15 import build_vae

    original, _, masks = _clip(3)
    runtime = StandaloneRuntime(device=torch.device("cpu"))
    codec = DiffusersVaeCodec(runtime.wrap(build_vae(seed=1), "vae"), runtime)
    host = build_conditioning(original, masks, (5, 7), codec, mask_dilation=2, chunk=2)
    on_device = build_conditioning(original, masks, (5, 7), codec, mask_dilation=2, chunk=2,
                                   device=torch.device("cpu"))
    assert torch.equal(host.masked_latents, on_device.masked_latents)
    assert torch.equal(host.known, on_device.known)
    assert not host.known.all() and host.known.any()
