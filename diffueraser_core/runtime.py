"""The seam between the pipeline and its host.

The pipeline never decides devices, never moves whole models itself and never loops without asking whether it
should stop. It asks a ``Runtime``. ``StandaloneRuntime`` (CLI, tests) implements it with plain torch; the
ComfyUI bridge (nodes/bridge.py) implements it with ModelPatcher / load_models_gpu / ProgressBar / interrupt.

Contract used by every stage:
* ``runtime.device`` / ``runtime.dtype``: where and in which dtype networks compute (fp32 on CPU, fp16 on CUDA).
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
        self._compiled: Optional[torch.nn.Module] = None
        self._channels_last = False
        self._attention_chosen = False

    def acquire(self, memory_required: int = 0) -> torch.nn.Module:
        rt = self.runtime
        device, dtype = rt.device, rt.dtype_for(self.module)
        first = next(self.module.parameters(), None)
        moving = first is not None and (first.device != device or first.dtype != dtype)
        incoming = module_bytes(self.module, dtype) if moving and first.device != device else 0
        rt.offload_released(keep=self, needed=int(memory_required) + incoming)
        # Stages acquire once per window; only move when something changed (a no-op .to() is not free).
        if moving:
            self.module.to(device=device, dtype=dtype)
        if device.type == "cuda" and not self._attention_chosen and self.name not in rt.compile_networks:
            # the SDPA kernel is chosen explicitly (flash / memory-efficient), never a silent math fallback
            from .attention import cuda_capabilities, install_explicit_attention

            install_explicit_attention(self.module, cuda_capabilities(device), rt.free_device_memory)
            self._attention_chosen = True
        if rt.channels_last and not self._channels_last:
            to_channels_last(self.module)
            self._channels_last = True
        if self.name in rt.compile_networks:
            if self._compiled is None:
                # Compiled lazily on the first call; the wrapper shares the module's parameters, so moves and
                # offloads of ``self.module`` apply to it.
                self._compiled = torch.compile(self.module)
            return self._compiled
        return self.module

    def release(self) -> None:
        # Offloaded lazily, when another network is acquired (as ComfyUI evicts on demand): a stage that calls the
        # VAE chunk by chunk then keeps it on the device instead of moving it out and back for every chunk.
        released = self.runtime.released
        if self.runtime.offload_after_use and self.runtime.device.type != "cpu" and self not in released:
            released.append(self)


def to_channels_last(module: torch.nn.Module) -> None:
    """2D convolution weights in channels_last layout (Module.to(memory_format=...) refuses networks that also
    hold 3D/5D convolutions, as ProPainter's do); later device moves keep the layout."""
    for layer in module.modules():
        if isinstance(layer, torch.nn.Conv2d):
            layer.weight.data = layer.weight.data.contiguous(memory_format=torch.channels_last)


def module_bytes(module: torch.nn.Module, dtype: Optional[torch.dtype] = None) -> int:
    """Bytes of a network's parameters and buffers (floating ones counted in ``dtype`` when given)."""
    total = 0
    for tensor in list(module.parameters()) + list(module.buffers()):
        size = tensor.element_size()
        if dtype is not None and tensor.is_floating_point():
            size = torch.empty((), dtype=dtype).element_size()
        total += tensor.numel() * size
    return total


#: device memory kept free beyond a request when deciding whether released networks may stay resident
#: (allocator fragmentation and the kernels' workspaces are not in the estimates)
RESIDENCY_MARGIN_BYTES = 512 * 1024 ** 2


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


#: the standalone runtime's dtype names (CLI ``--dtype``)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def default_dtype(device: torch.device) -> torch.dtype:
    """fp16 on CUDA and MPS (what the reference and ComfyUI run; bf16 only on request: ``is_bf16_supported()``
    is also true on cards that emulate it), fp32 on the CPU."""
    device = torch.device(device)
    if device.type in ("cuda", "mps"):
        return torch.float16
    return torch.float32


def dtype_from_name(name: Optional[str], device: torch.device) -> torch.dtype:
    """``"fp16"`` / ``"bf16"`` / ``"fp32"`` -> torch dtype; None -> ``default_dtype(device)``."""
    if name is None:
        return default_dtype(device)
    if name not in DTYPES:
        from .errors import InputError

        raise InputError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


@dataclass
class StandaloneRuntime:
    """Plain-torch runtime for the CLI and tests."""

    device: torch.device = field(default_factory=default_device)
    dtype: Optional[torch.dtype] = None
    offload_device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    offload_after_use: bool = True
    progress_callback: Optional[Callable[[str, int, int, Optional[torch.Tensor]], None]] = None
    interrupt_flag: Optional[Callable[[], bool]] = None
    #: cap on the device memory this run may use, in bytes (None: the whole card). Lets a large GPU behave
    #: like a small one: networks are offloaded to stay under it (the bench pairs it with a hard allocator cap).
    vram_budget: Optional[int] = None
    #: speed switches (bench/README.md, technique study): channels_last weights, and the handle names of the
    #: networks to run through torch.compile (e.g. "diffueraser_unet_main", "diffueraser_brushnet")
    channels_last: bool = False
    compile_networks: tuple = ()

    def __post_init__(self):
        self.released: List[ModelHandle] = []
        self.device = torch.device(self.device)
        if self.dtype is None:
            self.dtype = default_dtype(self.device)

    def free_device_memory(self) -> Optional[int]:
        """Bytes still usable on ``device`` (within ``vram_budget`` when set); None when unknown."""
        if self.device.type != "cuda":
            return None
        free, _total = torch.cuda.mem_get_info(self.device)
        allocated = torch.cuda.memory_allocated(self.device)
        # blocks torch's caching allocator holds but no tensor uses are free for the next request too
        free += torch.cuda.memory_reserved(self.device) - allocated
        if self.vram_budget is not None:
            free = min(free, int(self.vram_budget) - allocated)
        return int(free)

    def placement_device(self, nbytes: int) -> torch.device:
        """Where to build a network of ``nbytes`` at load time: straight on ``device`` when it fits there (the
        weights then never occupy host RAM), else on the offload device."""
        free = self.free_device_memory()
        if free is not None and free >= nbytes + RESIDENCY_MARGIN_BYTES:
            return self.device
        return self.offload_device

    def offload_released(self, keep: Optional[ModelHandle] = None, needed: int = 0) -> None:
        """Make room for ``needed`` bytes by moving released networks (oldest release first) to the offload
        device. Where free device memory is known (CUDA), released networks that do not stand in the way stay
        resident, as ComfyUI evicts on demand: a stage switch then costs no weight transfer on a large card.
        Where it is unknown, every released network except ``keep`` goes."""
        free = self.free_device_memory()
        kept: List[ModelHandle] = []
        for handle in self.released:
            if handle is keep:
                continue  # being acquired again: held, not released
            if free is not None and free >= needed + RESIDENCY_MARGIN_BYTES:
                kept.append(handle)
                continue
            handle.module.to(self.offload_device)
            if free is not None:
                self.empty_cache()
                free = self.free_device_memory()
        self.released = kept

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
