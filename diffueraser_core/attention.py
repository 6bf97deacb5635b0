"""Which scaled-dot-product-attention kernel runs on a GPU, chosen explicitly.

At 720p a 22-frame window needs about 3.9 GiB of activations with the flash or memory-efficient SDPA kernels but
88 GiB with the math fallback, which materialises the ``[batch, heads, Lq, Lk]`` score matrix. PyTorch falls back
to math silently when the fused kernels refuse an input (dtype, head size, GPU generation). So on CUDA every
attention call goes through ``choose_sdpa_backend`` (a pure function of shapes, dtype and what the GPU offers):
flash when it can, else memory-efficient, else math only where its score matrix fits, else a clear error.

``ExplicitAttention`` is the TorchFunctionMode that applies the choice; ``ModelHandle.acquire`` (runtime.py) has
it entered around every attention layer of a network on a CUDA device (``install_explicit_attention``). The device simulation (device_sim.py) uses the same
choice to model the kernel's memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

FLASH, EFFICIENT, MATH = "flash", "efficient", "math"
#: fp32 bytes per score element in the math path: scores and their softmax live together at the peak
MATH_BYTES_PER_SCORE = 2 * 4


class AttentionKernelError(RuntimeError):
    """Only the math attention kernel is available and its score matrix does not fit."""


@dataclass(frozen=True)
class SdpaCapabilities:
    """What the device's fused attention kernels accept."""

    flash: bool
    efficient: bool
    flash_dtypes: tuple = (torch.float16, torch.bfloat16)
    flash_max_head_dim: int = 256
    #: the memory-efficient kernel takes fp32 too, and any head size that is a multiple of 8
    efficient_head_dim_multiple: int = 8


#: an H100 / A100 (sm80+): flash and memory-efficient kernels
H100_CAPABILITIES = SdpaCapabilities(flash=True, efficient=True)


def cuda_capabilities(device: torch.device) -> SdpaCapabilities:
    """The fused kernels this CUDA build and GPU offer (flash needs sm80+, memory-efficient sm50+)."""
    major, _minor = torch.cuda.get_device_capability(device)
    flash_built = getattr(torch.backends.cuda, "is_flash_attention_available", lambda: True)()
    return SdpaCapabilities(
        flash=bool(flash_built and major >= 8 and torch.backends.cuda.flash_sdp_enabled()),
        efficient=bool(major >= 5 and torch.backends.cuda.mem_efficient_sdp_enabled()),
    )


def math_attention_bytes(q_shape: Sequence[int], k_shape: Sequence[int]) -> int:
    """Bytes of the math fallback's score matrices for queries ``[..., Lq, E]`` and keys ``[..., Lk, E]``."""
    batch = math.prod(int(s) for s in q_shape[:-2])
    return batch * int(q_shape[-2]) * int(k_shape[-2]) * MATH_BYTES_PER_SCORE


def choose_sdpa_backend(q_shape: Sequence[int], k_shape: Sequence[int], dtype: torch.dtype, has_mask: bool,
                        capabilities: SdpaCapabilities, free_bytes: Optional[int]) -> str:
    """``"flash"``, ``"efficient"`` or ``"math"`` for one attention call; raises ``AttentionKernelError`` when
    only math remains and its score matrices exceed ``free_bytes`` (None: unknown, math allowed)."""
    head_dim = int(q_shape[-1])
    if (capabilities.flash and not has_mask and dtype in capabilities.flash_dtypes
            and head_dim <= capabilities.flash_max_head_dim and head_dim % 8 == 0):
        return FLASH
    if capabilities.efficient and head_dim % capabilities.efficient_head_dim_multiple == 0:
        return EFFICIENT
    needed = math_attention_bytes(q_shape, k_shape)
    if free_bytes is not None and needed > free_bytes:
        raise AttentionKernelError(
            f"attention: no fused SDPA kernel takes queries {tuple(q_shape)} in {dtype} on this GPU (flash "
            f"{'available' if capabilities.flash else 'unavailable'}, memory-efficient "
            f"{'available' if capabilities.efficient else 'unavailable'}), and the math fallback needs "
            f"{needed / 1024 ** 3:.1f} GiB for its scores with {free_bytes / 1024 ** 3:.1f} GiB free; lower the "
            "resolution (max_side) or the window length, or use a GPU with flash / memory-efficient attention"
        )
    return MATH


_BACKENDS = None


def _sdpa_backend(name: str):
    global _BACKENDS
    if _BACKENDS is None:
        from torch.nn.attention import SDPBackend

        _BACKENDS = {FLASH: SDPBackend.FLASH_ATTENTION, EFFICIENT: SDPBackend.EFFICIENT_ATTENTION,
                     MATH: SDPBackend.MATH}
    return _BACKENDS[name]


class ExplicitAttention(TorchFunctionMode):
    """Runs every CUDA ``F.scaled_dot_product_attention`` with exactly the kernel ``choose_sdpa_backend`` names.

    ``free_bytes``: a callable giving the device's free bytes (the runtime's ``free_device_memory``)."""

    def __init__(self, capabilities: SdpaCapabilities, free_bytes=None):
        super().__init__()
        self.capabilities = capabilities
        self.free_bytes = free_bytes
        self.calls = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and args and args[0].device.type == "cuda":
            from torch.nn.attention import sdpa_kernel

            q, k = args[0], args[1]
            mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
            free = self.free_bytes() if self.free_bytes is not None else None
            backend = choose_sdpa_backend(q.shape, k.shape, q.dtype, mask is not None, self.capabilities, free)
            self.calls[backend] = self.calls.get(backend, 0) + 1
            # flash may still refuse an input for reasons outside the choice (e.g. strides): memory-efficient is
            # then the only fallback allowed; math runs only when chosen
            allowed = {FLASH: [FLASH, EFFICIENT], EFFICIENT: [EFFICIENT], MATH: [MATH]}[backend]
            with sdpa_kernel([_sdpa_backend(name) for name in allowed]):
                return func(*args, **kwargs)
        return func(*args, **kwargs)


#: classes whose forward calls SDPA (diffusers' Attention in UNet, BrushNet, the motion modules and the VAE;
#: ProPainter's sparse window attention); hooks on them, not on the networks, also cover calls that do not go
#: through a network's forward (vae.encode / vae.decode, the generator's img_propagation)
ATTENTION_MODULE_NAMES = ("Attention", "SparseWindowAttention")


def install_explicit_attention(module: torch.nn.Module, capabilities: SdpaCapabilities, free_bytes=None) -> int:
    """Run every attention layer of ``module`` under ``ExplicitAttention``; returns how many layers got hooks.
    The mode is left even when the layer raises (``always_call``)."""
    count = 0
    for layer in module.modules():
        if type(layer).__name__ not in ATTENTION_MODULE_NAMES or getattr(layer, "_explicit_attention", False):
            continue
        mode = ExplicitAttention(capabilities, free_bytes)

        def enter(_layer, _args, _mode=mode):
            _mode.__enter__()

        def leave(_layer, _args, _out, _mode=mode):
            _mode.__exit__(None, None, None)

        layer.register_forward_pre_hook(enter)
        layer.register_forward_hook(leave, always_call=True)
        layer._explicit_attention = True
        count += 1
    return count
