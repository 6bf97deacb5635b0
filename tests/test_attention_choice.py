"""The SDPA kernel choice (diffueraser_core/attention.py): a pure function of shapes, dtype and what the GPU
offers, so it is tested here on the CPU; ModelHandle.acquire installs it on CUDA devices."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffueraser_core.attention import (
    EFFICIENT,
    FLASH,
    H100_CAPABILITIES,
    MATH,
    AttentionKernelError,
    ExplicitAttention,
    SdpaCapabilities,
    choose_sdpa_backend,
    install_explicit_attention,
    math_attention_bytes,
)

GIB = 1024 ** 3
# the motion UNet's first self-attention on a 22-frame 720p window: 22 frames x 8 heads, 67x120 tokens, head 40
UNET_720P_Q = (22, 8, 67 * 120, 40)
NO_FUSED = SdpaCapabilities(flash=False, efficient=False)


def test_flash_when_the_gpu_and_input_allow_it():
    assert choose_sdpa_backend(UNET_720P_Q, UNET_720P_Q, torch.float16, False, H100_CAPABILITIES, 1 * GIB) == FLASH
    assert choose_sdpa_backend(UNET_720P_Q, UNET_720P_Q, torch.bfloat16, False, H100_CAPABILITIES, None) == FLASH


def test_memory_efficient_for_what_flash_refuses():
    # fp32, an attention mask, a head larger than 256, or a GPU without flash (pre-Ampere)
    assert choose_sdpa_backend(UNET_720P_Q, UNET_720P_Q, torch.float32, False, H100_CAPABILITIES, None) == EFFICIENT
    assert choose_sdpa_backend(UNET_720P_Q, UNET_720P_Q, torch.float16, True, H100_CAPABILITIES, None) == EFFICIENT
    big_head = (1, 1, 128, 512)
    assert choose_sdpa_backend(big_head, big_head, torch.float16, False, H100_CAPABILITIES, None) == EFFICIENT
    turing = SdpaCapabilities(flash=False, efficient=True)
    assert choose_sdpa_backend(UNET_720P_Q, UNET_720P_Q, torch.float16, False, turing, None) == EFFICIENT


def test_math_only_where_its_scores_fit():
    small = (2, 8, 256, 40)
    assert choose_sdpa_backend(small, small, torch.float16, False, NO_FUSED, 1 * GIB) == MATH
    assert math_attention_bytes(UNET_720P_Q, UNET_720P_Q) > 80 * GIB  # the 88 GiB of the issue
    with pytest.raises(AttentionKernelError, match=r"math fallback needs 8\d\.\d GiB .* 79\.0 GiB free"):
        choose_sdpa_backend(UNET_720P_Q, UNET_720P_Q, torch.float16, False, NO_FUSED, 79 * GIB)


def test_explicit_attention_leaves_cpu_calls_alone():
    q = torch.randn(1, 2, 16, 8)
    with ExplicitAttention(NO_FUSED, free_bytes=lambda: 0) as mode:
        out = F.scaled_dot_product_attention(q, q, q)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, q, q), rtol=0, atol=0)
    assert mode.calls == {}


def test_hooks_enter_and_leave_the_mode_even_on_errors():
    from diffusers.models.attention_processor import Attention

    net = torch.nn.Sequential(Attention(query_dim=16, heads=2, dim_head=8))
    assert install_explicit_attention(net, H100_CAPABILITIES) == 1
    assert install_explicit_attention(net, H100_CAPABILITIES) == 0  # once per layer
    depth = torch._C._len_torch_function_stack()
    net(torch.randn(1, 4, 16))
    assert torch._C._len_torch_function_stack() == depth
    with pytest.raises(Exception):
        net(torch.randn(1, 4, 3))  # wrong width
    assert torch._C._len_torch_function_stack() == depth
