"""Bridge between the core's runtime contract (diffueraser_core/runtime.py) and ComfyUI's model management.

Inside ComfyUI every network sits in a ``comfy.model_patcher.ModelPatcher``; a stage's ``handle.acquire(bytes)``
calls ``comfy.model_management.load_models_gpu`` so ComfyUI decides what to evict and whether to load fully or
partially (its layers are switched to ``comfy.ops.manual_cast`` classes so a partial load streams weights per
forward). Progress goes through the V3 API's ``set_progress`` (``comfy.utils.ProgressBar`` on hosts without it)
with live latent previews; cancellation to ``throw_exception_if_processing_interrupted``. The pack never unloads
other models by hand.

Progress moves inside long network forwards too: every network gets forward hooks on its blocks
(``install_heartbeats``) that, at most every ``HEARTBEAT_INTERVAL_S``, check for a cancel and report a fraction of
the unit the stage is working on (never reaching the next unit the stage itself reports).

Without ComfyUI (tests, CLI) ``get_runtime`` returns the core's ``StandaloneRuntime``.
Nothing here imports ComfyUI at module import time: ComfyUI is looked up on every ``get_runtime`` call.
"""

from __future__ import annotations

import importlib
import logging
import time
from typing import Dict, List, Optional

import torch

from diffueraser_core.errors import InputError
from diffueraser_core.runtime import ModelHandle, StandaloneRuntime

log = logging.getLogger(__name__)

# SD1.5 latent scale; ComfyUI's latent previewers expect scaled ("process_in") latents.
SD15_LATENT_SCALE = 0.18215
# Frames converted per VAE call by ComfyVaeCodec: bounds the float32 copies made at the boundary.
DEFAULT_CODEC_CHUNK = 8
# Prefix of the wrapped network inside the ModelPatcher's root module (see _PatcherRoot).
_ROOT_ATTR = "net"
#: at most one heartbeat (cancel check + progress inside a forward) per this many seconds
HEARTBEAT_INTERVAL_S = 0.5
#: a heartbeat moves the bar by 1 - 1/(1 + beats/HEARTBEAT_HALF) of the current unit: half a unit after this many
HEARTBEAT_HALF = 8
#: block depth below a network's root that gets heartbeat hooks (1: its children; 2: also theirs)
HEARTBEAT_DEPTH = 2

_TORCH_TO_CAST_NAME = (
    (torch.nn.Linear, "Linear"),
    (torch.nn.Conv1d, "Conv1d"),
    (torch.nn.Conv2d, "Conv2d"),
    (torch.nn.Conv3d, "Conv3d"),
    (torch.nn.ConvTranspose2d, "ConvTranspose2d"),
    (torch.nn.GroupNorm, "GroupNorm"),
    (torch.nn.LayerNorm, "LayerNorm"),
)


def _import_comfy() -> Optional[Dict[str, object]]:
    """The ComfyUI modules the bridge needs, or None when not running inside ComfyUI."""
    try:
        return {
            "mm": importlib.import_module("comfy.model_management"),
            "patcher": importlib.import_module("comfy.model_patcher"),
            "utils": importlib.import_module("comfy.utils"),
            "ops": importlib.import_module("comfy.ops"),
        }
    except ImportError:
        return None


def comfy_available() -> bool:
    return _import_comfy() is not None


# Handles acquired during the current node run: loaded together so loading one never evicts another that the
# same stage still uses (load_models_gpu only keeps the models it is given).
_ACTIVE_HANDLES: List["ComfyModelHandle"] = []


def get_runtime(node_name: str, unique_id: Optional[str] = None):
    """Runtime for one node execution: ComfyUI's when importable, else the standalone one."""
    _ACTIVE_HANDLES.clear()
    comfy = _import_comfy()
    runtime = StandaloneRuntime() if comfy is None else ComfyRuntime(node_name, unique_id, comfy)
    set_current_runtime(runtime)
    return runtime


# The runtime of the node running now: the heartbeat hooks of the (cached, shared) networks report to it.
_CURRENT: Dict[str, object] = {"runtime": None}


def set_current_runtime(runtime) -> None:
    _CURRENT["runtime"] = runtime


class ProgressHeartbeat:
    """Mixin for runtimes: remembers the last progress a stage reported, and ``heartbeat`` (called from forward
    hooks) re-reports it with a fraction of the next unit, at most every ``HEARTBEAT_INTERVAL_S``.

    ``_send(stage, value, total, preview, preview_latent)`` is the host's own report.
    """

    _last = None
    _beats = 0
    _beat_time = 0.0

    def progress(self, stage, done, total, preview=None, preview_latent=None) -> None:
        self._last = (stage, float(done), float(total))
        self._beats = 0
        self._beat_time = time.monotonic()
        self._send(stage, done, total, preview, preview_latent)

    def heartbeat(self) -> None:
        now = time.monotonic()
        if now - self._beat_time < HEARTBEAT_INTERVAL_S:
            return
        self._beat_time = now
        self.check_interrupt()
        if self._last is None:
            return
        stage, done, total = self._last
        if done >= total:
            return
        self._beats += 1
        fraction = 1.0 - 1.0 / (1.0 + self._beats / HEARTBEAT_HALF)
        self._send(stage, done + fraction, total, None, None)


def heartbeat() -> None:
    """Forward-hook target: the running node's runtime checks for a cancel and moves its bar."""
    runtime = _CURRENT["runtime"]
    beat = getattr(runtime, "heartbeat", None)
    if beat is not None:
        beat()
    elif runtime is not None:
        runtime.check_interrupt()


def _heartbeat_hook(module, args, output) -> None:
    heartbeat()


def install_heartbeats(module: torch.nn.Module, depth: int = HEARTBEAT_DEPTH) -> int:
    """Forward hooks on the blocks of a network (children down to ``depth``) that call ``heartbeat``: progress and
    cancel inside one long forward (RAFT's refinement iterations, the transformer's blocks, UNet/VAE stages).
    Installed once per module; returns how many blocks were hooked."""
    if getattr(module, "_diffueraser_heartbeats", False):
        return 0
    hooked = 0
    level = [module]
    for _ in range(depth):
        level = [child for parent in level for child in parent.children()]
        for child in level:
            if any(True for _ in child.parameters()):
                child.register_forward_hook(_heartbeat_hook)
                hooked += 1
    module._diffueraser_heartbeats = True
    return hooked


class _PatcherRoot(torch.nn.Module):
    """Plain root module for a ModelPatcher.

    ModelPatcher writes ``model.device`` and bookkeeping attributes; diffusers models expose ``device`` as a
    read-only property, so the network is held one level down.
    """

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        setattr(self, _ROOT_ATTR, net)


def convert_to_cast_ops(module: torch.nn.Module, ops_namespace) -> int:
    """Swap plain torch layers for ComfyUI's casting classes in place (same parameters, same math).

    Only exact torch classes are swapped (subclasses may carry their own forward). Returns how many were swapped.
    """
    swapped = 0
    for sub in module.modules():
        for torch_cls, cast_name in _TORCH_TO_CAST_NAME:
            if type(sub) is torch_cls:
                cast_cls = getattr(ops_namespace, cast_name, None)
                if cast_cls is None:
                    break
                sub.__class__ = cast_cls
                # Per-instance lists: the class-level defaults are shared by every layer.
                sub.weight_function = []
                sub.bias_function = []
                swapped += 1
                break
    return swapped


def _move_stragglers(patcher, device_to, *args, **kwargs) -> None:
    """ON_LOAD callback: after a partial load, move what ComfyUI cannot stream to the compute device.

    Layers without casting support (e.g. custom deformable convs) and buffers (positional tables) are small; a
    partial load leaves them on the offload device, which would mix devices inside one forward.
    """
    if device_to is None:
        return
    for sub in patcher.model.modules():
        streams = getattr(sub, "comfy_cast_weights", False) or getattr(sub, "prev_comfy_cast_weights", False)
        if not streams:
            for name, param in sub.named_parameters(recurse=False):
                if param.device != torch.device(device_to):
                    param.data = param.data.to(device_to)
        for name, buf in sub.named_buffers(recurse=False):
            if buf is not None and buf.device != torch.device(device_to):
                sub._buffers[name] = buf.to(device_to)


class ComfyModelHandle:
    """A network inside a ModelPatcher; ``acquire`` lets ComfyUI load it (fully or partially)."""

    def __init__(self, patcher, runtime: "ComfyRuntime", name: str):
        self.patcher = patcher
        self.runtime = runtime
        self.name = name

    @property
    def module(self) -> torch.nn.Module:
        return getattr(self.patcher.model, _ROOT_ATTR)

    def acquire(self, memory_required: int = 0) -> torch.nn.Module:
        mm = self.runtime.comfy["mm"]
        group = [h for h in _ACTIVE_HANDLES if h is not self] + [self]
        mm.load_models_gpu([h.patcher for h in group], memory_required=int(memory_required))
        if self not in _ACTIVE_HANDLES:
            _ACTIVE_HANDLES.append(self)
        module = getattr(self.patcher.model, _ROOT_ATTR)
        device = torch.device(self.patcher.load_device)
        if device.type == "cuda" and not getattr(module, "_diffueraser_attention", False):
            # as the standalone runtime: the SDPA kernel is chosen explicitly (flash / memory-efficient), and a
            # size only the math fallback could run, and cannot fit, is a clear error instead of a silent fallback
            from diffueraser_core.attention import cuda_capabilities, install_explicit_attention

            install_explicit_attention(module, cuda_capabilities(device), lambda: mm.get_free_memory(device))
            module._diffueraser_attention = True
        return module

    def release(self) -> None:
        # ComfyUI offloads when memory is needed; the pack never unloads by hand.
        if self in _ACTIVE_HANDLES:
            _ACTIVE_HANDLES.remove(self)

    def with_weight_patches(self, deltas: Dict[str, torch.Tensor], strength: float) -> "ComfyModelHandle":
        """A clone whose weights get ``strength * delta`` when loaded; the base weights stay untouched, so a new
        strength only re-patches (no file is read again)."""
        clone = self.patcher.clone()
        if deltas and strength != 0.0:
            patches = {f"{_ROOT_ATTR}.{key}": (delta,) for key, delta in deltas.items()}
            applied = clone.add_patches(patches, strength_patch=float(strength))
            if len(applied) != len(patches):
                missing = sorted(set(patches) - set(applied))[:3]
                raise InputError(
                    f"{self.runtime.node_name}: {len(patches) - len(applied)} LoRA deltas match no weight of "
                    f"{self.name!r} (first: {missing})"
                )
        return ComfyModelHandle(clone, self.runtime, self.name)


class ComfyRuntime(ProgressHeartbeat):
    """diffueraser_core.runtime contract on top of ComfyUI (devices, dtypes, ModelPatcher, progress, interrupt)."""

    def __init__(self, node_name: str, unique_id: Optional[str], comfy: Dict[str, object]):
        self.node_name = node_name
        self.unique_id = unique_id
        self.comfy = comfy
        mm = comfy["mm"]
        self.device = torch.device(mm.get_torch_device())
        self.offload_device = torch.device(mm.unet_offload_device())
        self.dtype = mm.unet_dtype(
            device=self.device, supported_dtypes=[torch.float16, torch.bfloat16, torch.float32]
        )
        self._bars: Dict[str, object] = {}
        self._previewer = None
        self._previewer_checked = False
        self._progress_api = _host_progress_api()

    def dtype_for(self, module: torch.nn.Module) -> torch.dtype:
        return getattr(module, "preferred_dtype", None) or self.dtype

    def wrap(self, module: torch.nn.Module, name: str) -> ComfyModelHandle:
        module.eval().requires_grad_(False)
        module.to(device=self.offload_device, dtype=self.dtype_for(module))
        swapped = convert_to_cast_ops(module, self.comfy["ops"].manual_cast)
        log.debug("%s: %s uses ComfyUI casting ops on %d layers", self.node_name, name, swapped)
        patcher_mod = self.comfy["patcher"]
        # CoreModelPatcher is the class ComfyUI's own loaders use: current ComfyUI rebinds it to
        # ModelPatcherDynamic when dynamic VRAM is on (main.py), so the pack's networks are managed the same way
        # as the host's. Looked up at every wrap (it is rebound after import); older hosts only have ModelPatcher.
        patcher_cls = getattr(patcher_mod, "CoreModelPatcher", None) or patcher_mod.ModelPatcher
        patcher = patcher_cls(_PatcherRoot(module), load_device=self.device, offload_device=self.offload_device)
        callbacks = getattr(patcher_mod, "CallbacksMP", None)
        if callbacks is not None and hasattr(patcher, "add_callback"):
            patcher.add_callback(callbacks.ON_LOAD, _move_stragglers)
        return ComfyModelHandle(patcher, self, name)

    def check_interrupt(self) -> None:
        self.comfy["mm"].throw_exception_if_processing_interrupted()

    def _latent_preview(self, latent: torch.Tensor):
        if not self._previewer_checked:
            self._previewer_checked = True
            try:
                latent_preview = importlib.import_module("latent_preview")
                formats = importlib.import_module("comfy.latent_formats")
                self._previewer = latent_preview.get_previewer(self.device, formats.SD15())
            except ImportError:
                self._previewer = None
        if self._previewer is None:
            return None
        return self._previewer.decode_latent_to_preview_image("JPEG", latent.float() * SD15_LATENT_SCALE)

    def _send(self, stage: str, done: float, total: float, preview=None, preview_latent=None) -> None:
        """One progress report of the node (every report is also a cancel point)."""
        self.check_interrupt()
        image = None
        if preview_latent is not None:
            image = self._latent_preview(preview_latent[:1])
        elif preview is not None:
            from PIL import Image

            image = ("JPEG", Image.fromarray(preview.cpu().numpy()), None)
        if self._progress_api is not None and self.unique_id is not None:
            self._progress_api.set_progress(value=float(done), max_value=float(total), node_id=str(self.unique_id),
                                            preview_image=image[1] if image is not None else None)
            return
        bar = self._bars.get(stage)
        if bar is None:
            bar = self.comfy["utils"].ProgressBar(total, node_id=self.unique_id)
            self._bars[stage] = bar
        bar.update_absolute(done, total, image)

    def is_oom(self, exc: BaseException) -> bool:
        return isinstance(exc, self.comfy["mm"].OOM_EXCEPTION)

    def empty_cache(self) -> None:
        self.comfy["mm"].soft_empty_cache()


def _host_progress_api():
    """``ComfyAPISync().execution`` of the V3 API (its ``set_progress`` reports a node's progress with a preview),
    or None on hosts without it."""
    try:
        from comfy_api.latest import ComfyAPISync

        return ComfyAPISync().execution
    except (ImportError, AttributeError):
        return None


def with_weight_patches(handle, deltas: Dict[str, torch.Tensor], strength: float):
    """Apply LoRA deltas (``strength * delta``) to a handle, whatever the runtime.

    ComfyUI: a ModelPatcher clone with weight patches (base weights untouched). Standalone: in place, remembering
    the applied strength so a new strength adds only the difference.
    """
    if isinstance(handle, ComfyModelHandle):
        return handle.with_weight_patches(deltas, strength)
    if not isinstance(handle, ModelHandle):
        raise TypeError(f"unexpected model handle {type(handle).__name__}")
    applied: Dict[str, float] = handle.__dict__.setdefault("_applied_patches", {})
    if any(key not in deltas for key in applied):
        # Deltas from another LoRA were applied in place and cannot be undone here: the loader reloads the base
        # weights when the LoRA file changes, so reaching this is a programming error.
        raise InputError(f"LoRA patches on {handle.name!r} come from another file; reload the base model")
    params = dict(handle.module.named_parameters())
    missing = [k for k in deltas if k not in params]
    if missing:
        raise InputError(f"{len(missing)} LoRA deltas match no weight of {handle.name!r} (first: {missing[:3]})")
    with torch.no_grad():
        for key, delta in deltas.items():
            step = float(strength) - applied.get(key, 0.0)
            if step != 0.0:
                param = params[key]
                param.add_(delta.to(device=param.device, dtype=torch.float32).mul(step).to(param.dtype))
            applied[key] = float(strength)
    return handle


class ComfyVaeCodec:
    """LatentCodec contract on ComfyUI's VAE: uint8 frames <-> raw latents, chunk by chunk on the CPU side."""

    def __init__(self, vae, runtime=None, chunk: int = DEFAULT_CODEC_CHUNK, node: str = "DiffuEraser"):
        if not hasattr(vae, "encode") or not hasattr(vae, "decode"):
            raise InputError(f"{node}: the vae input is a {type(vae).__name__}, expected a VAE (from VAELoader)")
        self.vae = vae
        self.runtime = runtime
        self.chunk = max(1, int(chunk))
        self.node = node

    def _check(self) -> None:
        if self.runtime is not None:
            self.runtime.check_interrupt()

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise InputError(
                f"{self.node}: VAE encode expects uint8 frames [n,H,W,3], got {frames.dtype} {tuple(frames.shape)}"
            )
        out = []
        for start in range(0, frames.shape[0], self.chunk):
            self._check()
            pixels = frames[start:start + self.chunk].float().div_(255.0)
            latent = self.vae.encode(pixels)
            out.append(latent.to(device="cpu", dtype=torch.float32))
        return torch.cat(out, dim=0)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if latents.ndim != 4:
            raise InputError(f"{self.node}: VAE decode expects latents [n,4,h,w], got {tuple(latents.shape)}")
        out = []
        for start in range(0, latents.shape[0], self.chunk):
            self._check()
            images = self.vae.decode(latents[start:start + self.chunk])
            if images.ndim == 5:
                images = images.reshape(-1, *images.shape[-3:])
            out.append(images.to("cpu").float().clamp_(0.0, 1.0).mul_(255.0).round_().to(torch.uint8))
        return torch.cat(out, dim=0)


def conditioning_to_embeddings(conditioning, node: str, expected_dim: Optional[int] = None) -> torch.Tensor:
    """ComfyUI CONDITIONING ``[[cond [1,L,D], {...}], ...]`` -> text embeddings float32 [1,L,D] on the CPU.

    Only the first entry is used (DiffuEraser has one prompt); extra entries are logged and ignored.
    """
    if not isinstance(conditioning, (list, tuple)) or len(conditioning) == 0:
        raise InputError(f"{node}: conditioning is empty or not a CONDITIONING list ({type(conditioning).__name__})")
    entry = conditioning[0]
    if not isinstance(entry, (list, tuple)) or len(entry) < 1 or not torch.is_tensor(entry[0]):
        raise InputError(f"{node}: conditioning entry is not [tensor, dict] ({type(entry).__name__})")
    if len(conditioning) > 1:
        log.warning("%s: conditioning has %d entries; only the first is used", node, len(conditioning))
    cond = entry[0]
    if cond.ndim != 3:
        raise InputError(f"{node}: conditioning tensor must be [1,tokens,dim], got {tuple(cond.shape)}")
    if expected_dim is not None and cond.shape[-1] != expected_dim:
        raise InputError(
            f"{node}: conditioning width {cond.shape[-1]} does not match the model's cross-attention width "
            f"{expected_dim}; use the SD1.5 text encoder (CLIP-L, CLIPLoader type stable_diffusion)"
        )
    return cond[:1].detach().to(device="cpu", dtype=torch.float32)
