"""The seam between the pipeline and its host.

The pipeline never decides devices, never moves whole models itself and never loops without asking whether it
should stop. It asks a ``Runtime``. ``StandaloneRuntime`` (CLI, tests) implements it with plain torch; the
ComfyUI bridge (nodes/bridge.py) implements it with ModelPatcher / load_models_gpu / ProgressBar / interrupt.

Contract used by every stage:
* ``runtime.device`` / ``runtime.dtype``: where and in which dtype networks compute (fp32 on CPU).
* ``handle = runtime.wrap(module, name)`` once per network; ``model = handle.acquire(memory_required=bytes)``
  before each window/chunk returns the module ready on ``runtime.device`` (the host may evict others or load
  partially); ``handle.release()`` after the stage lets the host offload it.
* ``runtime.check_interrupt()`` inside every loop (at least once per window or chunk).
* ``runtime.progress(stage, done, total, preview=None, preview_latent=None)``: preview is an optional uint8
  [H,W,3] tensor; preview_latent an optional raw VAE latent [1,4,h,w] the host may turn into a live preview.
* ``runtime.is_oom(exc)``: true for an out-of-memory error of this host; stages then retry with smaller chunks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch

from .errors import Interrupted

log = logging.getLogger(__name__)


class ModelHandle:
    """A network kept on its offload device until a stage acquires it."""

    def __init__(self, module: torch.nn.Module, runtime: "StandaloneRuntime", name: str):
        self.module = module
        self.runtime = runtime
        self.name = name

    def acquire(self, memory_required: int = 0) -> torch.nn.Module:
        rt = self.runtime
        rt.offload_released(keep=self)
        device, dtype = rt.device, rt.dtype_for(self.module)
        first = next(self.module.parameters(), None)
        # Stages acquire once per window; only move when something changed (a no-op .to() is not free).
        if first is None or first.device != device or first.dtype != dtype:
            self.module.to(device=device, dtype=dtype)
        return self.module

    def release(self) -> None:
        # Offloaded lazily, when another network is acquired (as ComfyUI evicts on demand): a stage that calls the
        # VAE chunk by chunk then keeps it on the device instead of moving it out and back for every chunk.
        if self.runtime.offload_after_use and self.runtime.device.type != "cpu":
            self.runtime.released.append(self)


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


@dataclass
class StandaloneRuntime:
    """Plain-torch runtime for the CLI and tests."""

    device: torch.device = field(default_factory=default_device)
    dtype: Optional[torch.dtype] = None
    offload_device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    offload_after_use: bool = True
    progress_callback: Optional[Callable[[str, int, int, Optional[torch.Tensor]], None]] = None
    interrupt_flag: Optional[Callable[[], bool]] = None

    def __post_init__(self):
        self.released: List[ModelHandle] = []
        self.device = torch.device(self.device)
        if self.dtype is None:
            self.dtype = default_dtype(self.device)

    def offload_released(self, keep: Optional[ModelHandle] = None) -> None:
        """Move every released network except ``keep`` to the offload device."""
        for handle in self.released:
            if handle is not keep:
                handle.module.to(self.offload_device)
        self.released = []  # ``keep`` is being acquired again: held, not released

    def dtype_for(self, module: torch.nn.Module) -> torch.dtype:
        # Networks that are numerically fragile in half precision may pin their own dtype.
        return getattr(module, "preferred_dtype", None) or self.dtype

    def wrap(self, module: torch.nn.Module, name: str) -> ModelHandle:
        module.eval().requires_grad_(False)
        return ModelHandle(module, self, name)

    def check_interrupt(self) -> None:
        if self.interrupt_flag is not None and self.interrupt_flag():
            raise Interrupted("DiffuEraser: run cancelled")

    def progress(
        self,
        stage: str,
        done: int,
        total: int,
        preview: Optional[torch.Tensor] = None,
        preview_latent: Optional[torch.Tensor] = None,
    ) -> None:
        if self.progress_callback is not None:
            self.progress_callback(stage, done, total, preview)

    def is_oom(self, exc: BaseException) -> bool:
        return isinstance(exc, torch.OutOfMemoryError)

    def empty_cache(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
