"""Runs on the simulated device (device_sim.py): the full-size networks, the whole removal on a synthetic clip,
the diffusion stages alone (long clips, fixed vs per-frame cost) and single network calls (memory hints)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch

from .device_sim import (
    GIB,
    SIM_DEVICE,
    UNBOOKED,
    DeviceSimulator,
    FusedAttention,
    SimulatedRuntime,
    StageStats,
    book_vae_calls,
)
from .runtime import StandaloneRuntime


# ---------------------------------------------------------------------------------------------------------------
# Full-size networks
# ---------------------------------------------------------------------------------------------------------------
def _on_host(module: torch.nn.Module) -> torch.nn.Module:
    # built on meta (no init cost), then given uninitialised host storage: the runtime moves it to the device
    return module.to_empty(device="cpu").eval().requires_grad_(False)


#: the network methods the stages call, memoised by ``memoise_networks``
MEMOISED_METHODS = {
    "unet": ("forward",), "brushnet": ("forward",), "vae_encoder": ("forward",), "vae_decoder": ("forward",),
    "raft": ("forward",), "flow_completion": ("forward_bidirect_flow", "combine_flow"),
    "generator": ("forward", "img_propagation"),
}


def memoise_networks(simulator: DeviceSimulator, models, codec, nets) -> None:
    modules = {"unet": models.unet.module, "brushnet": models.brushnet.module,
               "vae_encoder": codec.handle.module.encoder, "vae_decoder": codec.handle.module.decoder,
               "raft": nets.raft.module, "flow_completion": nets.flow_completion.module,
               "generator": nets.generator.module}
    for name, module in modules.items():
        simulator.memoise(module, MEMOISED_METHODS[name])


def full_size_networks(runtime: StandaloneRuntime):
    """The official-size networks (random layout only, no values) wrapped in ``runtime``:
    ``(DiffuEraserModels, DiffusersVaeCodec, ProPainterNets)``."""
    from diffusers import AutoencoderKL, UNetMotionModel

    from .models import configs
    from .models.brushnet import BrushNetModel
    from .models.flow_completion import RecurrentFlowCompleteNet
    from .models.propainter import InpaintGenerator
    from .models.raft import RAFT
    from .models.unet_motion import DiffuEraserUNet
    from .pipeline import DiffuEraserModels, DiffusersVaeCodec
    from .prior_propainter import ProPainterNets
    from .random_weights.diffusion import _init_kwargs
    from .random_weights.sd15 import FULL_VAE_CONFIG

    with torch.device("meta"):
        unet = DiffuEraserUNet(**_init_kwargs(UNetMotionModel, configs.UNET_MAIN_CONFIG))
        brushnet = BrushNetModel(**_init_kwargs(BrushNetModel, configs.BRUSHNET_CONFIG))
        vae = AutoencoderKL(**FULL_VAE_CONFIG)
    # the ProPainter networks are small (about 50 M parameters) and compute index buffers at construction
    raft = RAFT().eval().requires_grad_(False)
    completion = RecurrentFlowCompleteNet().eval().requires_grad_(False)
    generator = InpaintGenerator(init_weights=False).eval().requires_grad_(False)
    models = DiffuEraserModels(unet=runtime.wrap(_on_host(unet), "diffueraser_unet_main"),
                               brushnet=runtime.wrap(_on_host(brushnet), "diffueraser_brushnet"))
    codec = DiffusersVaeCodec(runtime.wrap(_on_host(vae), "sd15_vae"), runtime)
    nets = ProPainterNets(raft=runtime.wrap(raft, "propainter_raft"),
                          flow_completion=runtime.wrap(completion, "propainter_flow_completion"),
                          generator=runtime.wrap(generator, "propainter_generator"))
    return models, codec, nets


# ---------------------------------------------------------------------------------------------------------------
# The whole removal
# ---------------------------------------------------------------------------------------------------------------
#: CLIP-L text embedding of the empty prompt: 77 tokens x 768
TEXT_EMBEDDING_SHAPE = (1, 77, 768)


@dataclass
class SimulationReport:
    width: int
    height: int
    frames: int
    dtype: str
    budget_bytes: Optional[int]
    stages: Dict[str, StageStats]
    peak_bytes: int
    attention_calls: Dict[str, int]
    oom_raised: int
    working_size: Tuple[int, int] = (0, 0)

    @property
    def total_flops(self) -> int:
        return sum(s.flops for s in self.stages.values())

    def as_dict(self) -> dict:
        return {
            "resolution": f"{self.width}x{self.height}", "frames": self.frames, "dtype": self.dtype,
            "budget_gib": None if self.budget_bytes is None else self.budget_bytes / GIB,
            "peak_gib": self.peak_bytes / GIB, "total_flops": self.total_flops,
            "working_size": f"{self.working_size[1]}x{self.working_size[0]}",
            "attention_calls": dict(self.attention_calls), "simulated_oom": self.oom_raised,
            "stages": {name: s.as_dict() for name, s in self.stages.items()},
        }


def simulate_removal(width: int = 1280, height: int = 720, num_frames: int = 50, *,
                     budget: Optional[int] = None, dtype: torch.dtype = torch.float16,
                     sampler_settings=None, frames: Optional[torch.Tensor] = None,
                     masks: Optional[torch.Tensor] = None, memoise: bool = True) -> SimulationReport:
    """Run ``remove_objects`` at full size on the simulated device; frames/masks default to the synthetic clip."""
    from .demo import synthetic_clip
    from .pipeline import SamplerSettings, remove_objects
    from .prior_injection import InjectionSettings
    from .video import DEFAULT_MAX_SIDE, working_size

    if frames is None:
        frames, masks = synthetic_clip(num_frames, (height, width))
    sampler = sampler_settings or SamplerSettings()
    injection = InjectionSettings(seed=0, window_length=sampler.window_length, inversion_steps=sampler.steps)
    simulator = DeviceSimulator(budget=budget)
    runtime = SimulatedRuntime(simulator, dtype=dtype)
    models, codec, nets = full_size_networks(runtime)
    book_vae_calls(codec, runtime)
    if memoise:
        memoise_networks(simulator, models, codec, nets)
    text = torch.zeros(TEXT_EMBEDDING_SHAPE, dtype=torch.float32)
    attention = FusedAttention()
    with torch.inference_mode(), attention, simulator:
        remove_objects(frames, masks, propainter_nets=nets, runtime=runtime, models=models, codec=codec,
                       text_embeddings=text, sampler_settings=sampler, injection_settings=injection)
        simulator.book(UNBOOKED)
    stages = {k: v for k, v in simulator.stages.items() if k != UNBOOKED or v.flops or v.ops}
    return SimulationReport(width, height, int(frames.shape[0]), str(dtype).replace("torch.", ""), budget, stages,
                            simulator.peak, dict(attention.calls), simulator.oom_raised,
                            working_size(height, width, DEFAULT_MAX_SIDE))


def vae_activation_peak(kind: str, num_frames: int, height: int, width: int,
                        dtype: torch.dtype = torch.float16) -> int:
    """Peak device bytes of one full-size VAE ``encode`` or ``decode`` call on ``num_frames`` images of
    ``height`` x ``width`` pixels, beyond the VAE's weights and the call's input (what ``memory_required`` should
    ask for)."""
    from diffusers import AutoencoderKL

    from .random_weights.sd15 import FULL_VAE_CONFIG

    with torch.device("meta"):
        vae = AutoencoderKL(**FULL_VAE_CONFIG).to(dtype).eval().requires_grad_(False)
    if kind == "encode":
        x = torch.empty((num_frames, 3, height, width), dtype=dtype, device=SIM_DEVICE)
    elif kind == "decode":
        x = torch.empty((num_frames, 4, height // 8, width // 8), dtype=dtype, device=SIM_DEVICE)
    else:
        raise ValueError(f"vae_activation_peak: kind must be 'encode' or 'decode', got {kind!r}")
    simulator = DeviceSimulator()
    with torch.inference_mode(), FusedAttention(), simulator:
        base = simulator.live
        if kind == "encode":
            out = vae.encode(x).latent_dist.mean
        else:
            out = vae.decode(x).sample
        del out
    return simulator.peak - base


def window_activation_peak(num_frames: int, latent_hw: Tuple[int, int], dtype: torch.dtype = torch.float16,
                           batch: int = 1) -> int:
    """Peak device bytes of one sampling window (BrushNet then the motion UNet, full size, ``batch`` text
    embeddings) beyond the networks' weights and the window's inputs."""
    from diffusers import UNetMotionModel

    from .models import configs
    from .models.brushnet import BrushNetModel
    from .models.unet_motion import DiffuEraserUNet
    from .random_weights.diffusion import _init_kwargs
    from .temporal_sampling import predict_noise

    with torch.device("meta"):
        unet = DiffuEraserUNet(**_init_kwargs(UNetMotionModel, configs.UNET_MAIN_CONFIG))
        brushnet = BrushNetModel(**_init_kwargs(BrushNetModel, configs.BRUSHNET_CONFIG))
    for net in (unet, brushnet):
        torch.nn.Module.to(net, dtype).eval().requires_grad_(False)
    h, w = latent_hw
    x = torch.empty((num_frames, 4, h, w), device=SIM_DEVICE)
    cond = torch.empty((num_frames, 5, h, w), device=SIM_DEVICE)
    text = torch.empty((batch,) + TEXT_EMBEDDING_SHAPE[1:], device=SIM_DEVICE)
    simulator = DeviceSimulator()
    with torch.inference_mode(), FusedAttention(), simulator:
        base = simulator.live
        out = predict_noise(unet, brushnet, x, 500, cond, text, 1.0)
        del out
    return simulator.peak - base


def simulate_diffusion(num_frames: int, working_hw: Tuple[int, int], dtype: torch.dtype = torch.float16,
                       sampler_settings=None, budget: Optional[int] = None) -> Dict[str, StageStats]:
    """The diffusion stages alone (pre-inference with its keyframe VAE passes, then sampling) on ``num_frames``
    latents at ``working_hw``, on the simulated device: cheap enough for 1000-frame clips (no prior, no input-size
    host work; the frames are one expanded frame, as the stages only read their shape here)."""
    from .pipeline import SamplerSettings, sample_video
    from .prior_injection import InjectionSettings, inject_forward_noise
    from .temporal_sampling import Conditioning

    sampler = sampler_settings or SamplerSettings()
    h, w = int(working_hw[0]) // 8, int(working_hw[1]) // 8
    simulator = DeviceSimulator(budget=budget)
    runtime = SimulatedRuntime(simulator, dtype=dtype)
    models, codec, nets = full_size_networks(runtime)
    book_vae_calls(codec, runtime)
    memoise_networks(simulator, models, codec, nets)
    injection = InjectionSettings(seed=0, window_length=sampler.window_length, inversion_steps=sampler.steps)
    start = inject_forward_noise(torch.zeros((num_frames, 4, h, w)), injection)
    conditioning = Conditioning(torch.zeros((num_frames, 4, h, w)), torch.zeros((num_frames, h, w), dtype=torch.bool))
    frames = torch.zeros((1, h * 8, w * 8, 3), dtype=torch.uint8).expand(num_frames, -1, -1, -1)
    masks = torch.ones((1, h * 8, w * 8), dtype=torch.bool).expand(num_frames, -1, -1)
    text = torch.zeros(TEXT_EMBEDDING_SHAPE, dtype=torch.float32)
    with torch.inference_mode(), FusedAttention(), simulator:
        sample_video(start, frames, masks, text, None, models, codec, sampler, runtime, conditioning=conditioning)
        simulator.book(UNBOOKED)
    return {k: v for k, v in simulator.stages.items() if v.flops or v.ops}


def fixed_and_per_frame(lengths: Sequence[int], working_hw: Tuple[int, int],
                        dtype: torch.dtype = torch.float16) -> dict:
    """Diffusion FLOPs at each clip length, split as ``fixed + per_frame * frames`` between consecutive lengths
    (pre-inference and window overlaps are costs per clip; the per-frame part is what should stay flat)."""
    totals = {}
    for n in lengths:
        stages = simulate_diffusion(n, working_hw, dtype)
        totals[n] = sum(s.flops for s in stages.values())
    rows = []
    ordered = sorted(totals)
    for a, b in zip(ordered, ordered[1:]):
        per_frame = (totals[b] - totals[a]) / (b - a)
        rows.append({"from": a, "to": b, "per_frame_flops": per_frame, "fixed_flops": totals[a] - per_frame * a})
    return {"total_flops": totals, "per_frame_flops_at": {n: totals[n] / n for n in ordered}, "splits": rows}
