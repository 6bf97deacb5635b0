"""A GPU stand-in for CPU-only machines: the real stages with full-size networks on PyTorch's ``meta`` device.

``meta`` tensors carry shapes and dtypes but no data, so full-size networks cost nothing to "run", while frames,
masks and latents stay real on the CPU. ``DeviceSimulator`` (a TorchDispatchMode) sees every op and:

* raises ``DeviceMixingError`` when an op mixes device (meta) tensors with CPU tensors the way CUDA refuses
  (torch's own meta kernels let e.g. a CPU weight through a meta convolution);
* answers what ``meta`` cannot (the shim): copies back to the host become zeros (or uninitialised memory for
  network offloads), ``.item()``/``bool()`` read 1 (True), and ``nonzero`` treats every element as nonzero except
  in the result of a comparison with zero (ProPainter's window split then sends every window through the hole
  path, its more expensive side);
* counts live device bytes (storages allocated and freed, as ``torch.cuda.max_memory_allocated`` reports, without
  the caching allocator's rounding), FLOPs (``torch.utils.flop_counter``'s formulas) and kernel launches (ops on
  device tensors that are not views), booked to the pipeline stage that is running;
* enforces a device budget: an allocation past it raises ``torch.OutOfMemoryError``, so the stages' offload and
  out-of-memory retry paths run as on a smaller card.

``SimulatedRuntime`` is a ``StandaloneRuntime`` on ``meta`` whose free memory is the budget minus the live bytes,
so networks stay resident or are offloaded as on a real card. Attention runs as the fused kernel the CUDA runtime
picks (``attention.choose_sdpa_backend``), not as the math decomposition meta would otherwise trace.

device_sim_runs.py builds the full-size networks and runs the pipeline (``simulate_removal``), the diffusion
stages alone and single network calls this way; bench/simulate_gpu.py prints the result. FakeTensorMode with
fake ``cuda`` tensors needs a CUDA build of torch, which is why this is not built on it.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._python_dispatch import _disable_current_modes as _disable_dispatch_modes
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.flop_counter import flop_registry
from torch.utils.weak import WeakIdKeyDictionary

from .runtime import StandaloneRuntime

log = logging.getLogger(__name__)

SIM_DEVICE = torch.device("meta")
GIB = 1024 ** 3
#: the card a budget-less simulation models (H100 80 GB): networks stay resident while they fit
DEFAULT_CAPACITY_BYTES = 80 * 10 ** 9
#: stage name for work before the first progress event and after the last
UNBOOKED = "setup"

aten = torch.ops.aten
#: ops that move data between host and device: never device mixing
_TRANSFER_OPS = {aten._to_copy.default, aten.to.device, aten.to.dtype_layout, aten.to.other, aten.copy_.default,
                 aten.copy.default, aten.lift_fresh.default, aten._copy_from.default,
                 aten._copy_from_and_resize.default,
                 aten._has_compatible_shallow_copy_type.default, aten.set_.source_Tensor}
#: ops that, like on CUDA, accept CPU index tensors for a device tensor
_INDEX_OPS = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}


#: composite ops whose decomposition reaches the FLOP formulas (convolution, mm, addmm, bmm, baddbmm)
_FLOP_COMPOSITES = {aten.conv1d, aten.conv2d, aten.conv3d, aten.conv_transpose1d, aten.conv_transpose2d,
                    aten.conv_transpose3d, aten.linear, aten.matmul, aten.einsum, aten.bilinear, aten.tensordot}


class DeviceMixingError(RuntimeError):
    """An op got device tensors and host tensors together: it would fail on a GPU."""


def _is_sim(t) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type == "meta"


def _leaves(value, out: list) -> list:
    """The tensors in op arguments (lists, tuples and dicts walked; faster than pytree for this one use)."""
    if isinstance(value, torch.Tensor):
        out.append(value)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _leaves(v, out)
    elif isinstance(value, dict):
        for v in value.values():
            _leaves(v, out)
    return out


def _is_host_array(t) -> bool:
    # 0-dim CPU tensors are scalars, which CUDA kernels accept next to device tensors
    return isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.dim() > 0


class _Unhashable(Exception):
    pass


_PLAIN = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.layout, torch.memory_format)


def _signature(value):
    """A hashable description of op arguments: tensors by device, shape, strides and dtype."""
    if isinstance(value, torch.Tensor):
        if value.device.type != "meta":
            if value.dim() == 0:
                # a host scalar: its value can decide the result's dtype and contents, not the shape
                return ("S", value.dtype)
            raise _Unhashable
        return ("T", tuple(value.shape), tuple(value.stride()), value.dtype, value.storage_offset())
    if isinstance(value, (list, tuple)):
        return tuple(_signature(v) for v in value)
    if isinstance(value, dict):
        return tuple((k, _signature(v)) for k, v in sorted(value.items()))
    if isinstance(value, _PLAIN):
        return (type(value), value)
    raise _Unhashable


def _call_signature(value):
    """``_signature`` for a network call's arguments: host tensors by shape (and device) too."""
    if isinstance(value, torch.Tensor):
        return (value.device.type, tuple(value.shape), tuple(value.stride()), value.dtype)
    if isinstance(value, (list, tuple)):
        return tuple(_call_signature(v) for v in value)
    if isinstance(value, dict):
        return tuple((k, _call_signature(v)) for k, v in sorted(value.items()))
    if isinstance(value, _PLAIN):
        return (type(value), value)
    raise _Unhashable


def _target_of(func, args, kwargs):
    """(device, dtype) a ``_to_copy``/``to`` call moves to (None where unchanged)."""
    if func is aten.to.device:
        return args[1], args[2] if len(args) > 2 else kwargs.get("dtype")
    if func is aten.to.other:
        return args[1].device, args[1].dtype
    return kwargs.get("device"), kwargs.get("dtype")


@dataclass
class StageStats:
    """What one pipeline stage did on the device: peak live bytes, FLOPs, kernel launches, host<->device bytes."""

    peak_bytes: int = 0
    flops: int = 0
    ops: int = 0
    to_device_bytes: int = 0
    to_host_bytes: int = 0
    seconds_spans: int = 0

    def as_dict(self) -> dict:
        return {"peak_gib": self.peak_bytes / GIB, "flops": self.flops, "ops": self.ops,
                "to_device_gib": self.to_device_bytes / GIB, "to_host_gib": self.to_host_bytes / GIB}


class DeviceSimulator(TorchDispatchMode):
    """Dispatch mode that tracks, shims and checks every op on the simulated device (see the module docstring).

    ``budget``: device bytes an allocation may not exceed (None: no limit). ``book(stage)`` closes the running
    span and books it to ``stage`` (the runtime does it on every progress event).
    """

    def __init__(self, budget: Optional[int] = None):
        super().__init__()
        self.budget = budget
        self.live = 0
        self.peak = 0
        self._tracked = WeakIdKeyDictionary()
        self._known_zero = WeakIdKeyDictionary()
        self.stages: Dict[str, StageStats] = {}
        self._span = StageStats()
        self.uninitialised_host_copies = False
        self.oom_raised = 0
        self._shape_cache: Dict[tuple, object] = {}
        self.cache_hits = 0
        self._recording: List[dict] = []
        self.replays = 0

    # -- accounting -------------------------------------------------------------------------------------------
    def book(self, stage: str) -> None:
        stats = self.stages.setdefault(stage, StageStats())
        span = self._span
        stats.peak_bytes = max(stats.peak_bytes, span.peak_bytes)
        stats.flops += span.flops
        stats.ops += span.ops
        stats.to_device_bytes += span.to_device_bytes
        stats.to_host_bytes += span.to_host_bytes
        self._span = StageStats(peak_bytes=self.live)

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def _track_outputs(self, out) -> int:
        new = 0
        for t in _leaves(out, []):
            if not _is_sim(t):
                continue
            storage = t.untyped_storage()
            if storage in self._tracked:
                continue
            nbytes = storage.nbytes()
            self._tracked[storage] = nbytes
            weakref.finalize(storage, self._free, nbytes)
            new += nbytes
        self.live += new
        self._raise_peak(self.live)
        return new

    def _raise_peak(self, level: int) -> None:
        self.peak = max(self.peak, level)
        self._span.peak_bytes = max(self._span.peak_bytes, level)
        for record in self._recording:
            record["peak"] = max(record["peak"], level)

    # -- memoised network calls -------------------------------------------------------------------------------
    def memoise(self, module: torch.nn.Module, names: Iterable[str] = ("forward",)) -> None:
        """Replay calls of ``module``'s methods ``names`` on arguments of shapes, strides, dtypes and devices
        already seen: on ``meta`` a call's outputs, FLOPs, op count and peak are functions of those alone, and
        windows, chunks and RAFT iterations repeat them, so a long clip costs the Python time of its distinct
        shapes only. A call on new shapes (or with a host tensor where a device one was) runs for real and is
        checked as usual."""
        for name in names:
            setattr(module, name, self._memoised(getattr(module, name)))

    def _memoised(self, original):
        cache: Dict[tuple, dict] = {}

        def call(*args, **kwargs):
            try:
                key = (_call_signature(args), _call_signature(kwargs))
            except _Unhashable:
                return original(*args, **kwargs)
            record = cache.get(key)
            if record is not None:
                return self._replay(record)
            span = self._span
            record = {"peak": self.live, "live": self.live, "flops": span.flops, "ops": span.ops}
            self._recording.append(record)
            try:
                out = original(*args, **kwargs)
            finally:
                self._recording.remove(record)
            if self._span is not span:  # a progress event inside the call: do not replay it
                return out
            leaves, spec = tree_flatten(out)
            described = []
            for leaf in leaves:
                if isinstance(leaf, torch.Tensor) and _is_sim(leaf):
                    described.append(("T", tuple(leaf.shape), tuple(leaf.stride()), leaf.dtype))
                elif leaf is None or isinstance(leaf, (int, float, bool)):
                    described.append(leaf)
                else:
                    return out
            cache[key] = {"peak_delta": record["peak"] - record["live"], "flops": span.flops - record["flops"],
                          "ops": span.ops - record["ops"], "spec": spec, "leaves": described}
            return out

        return call

    def _replay(self, record: dict):
        self.replays += 1
        level = self.live + record["peak_delta"]
        if self.budget is not None and level > self.budget:
            self.oom_raised += 1
            raise torch.OutOfMemoryError(
                f"simulated device: out of memory ({level / GIB:.2f} GiB needed, budget {self.budget / GIB:.2f} GiB)"
            )
        self._raise_peak(level)
        self._span.flops += record["flops"]
        self._span.ops += record["ops"]
        leaves = []
        with _disable_dispatch_modes():
            for leaf in record["leaves"]:
                if isinstance(leaf, tuple):
                    leaf = torch.empty_strided(leaf[1], leaf[2], dtype=leaf[3], device=SIM_DEVICE)
                leaves.append(leaf)
        self._track_outputs(leaves)
        return tree_unflatten(leaves, record["spec"])

    def track(self, tensors: Iterable[torch.Tensor]) -> None:
        """Count tensors already on the device (e.g. networks built there before the simulation started)."""
        self._track_outputs(list(tensors))

    # -- the shim ---------------------------------------------------------------------------------------------
    def _host_copy(self, like: torch.Tensor, dtype=None) -> torch.Tensor:
        dtype = dtype or like.dtype
        if self.uninitialised_host_copies:
            return torch.empty(like.shape, dtype=dtype)
        return torch.zeros(like.shape, dtype=dtype)

    def _shim(self, func, args, kwargs):
        """The result for ops ``meta`` cannot answer, or None to run the op."""
        if func.overloadpacket in (aten._to_copy, aten.to) and _is_sim(args[0]):
            device, dtype = _target_of(func, args, kwargs)
            if device is not None and torch.device(device).type == "cpu":
                self._span.to_host_bytes += args[0].numel() * args[0].element_size()
                return self._host_copy(args[0], dtype)
        if func in (aten.copy_.default, aten.copy.default) and _is_sim(args[1]) and not _is_sim(args[0]):
            self._span.to_host_bytes += args[1].numel() * args[1].element_size()
            if func is aten.copy_.default:
                return args[0].zero_() if not self.uninitialised_host_copies else args[0]
            return torch.zeros_like(args[0])
        if func is aten._local_scalar_dense.default and _is_sim(args[0]):
            return 1.0 if args[0].is_floating_point() else (True if args[0].dtype == torch.bool else 1)
        if func is aten.is_nonzero.default and _is_sim(args[0]):
            return True
        if func in (aten.nonzero.default,) and _is_sim(args[0]):
            x = args[0]
            count = 0 if x in self._known_zero else x.numel()
            index = torch.empty((count, x.dim()), dtype=torch.long, device=SIM_DEVICE)
            return index
        return None

    def _check_mixing(self, func, args, kwargs, flat) -> None:
        if func in _TRANSFER_OPS:
            return
        if func in _INDEX_OPS:
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            flat = [t for t in flat if not any(t is i for i in (indices or ()))]
        host = [t for t in flat if _is_host_array(t)]
        if host:
            shapes = ", ".join(f"cpu {tuple(t.shape)} {t.dtype}" for t in host[:3])
            raise DeviceMixingError(
                f"{func}: device tensors mixed with host tensors ({shapes}); a GPU run fails here with "
                "'Expected all tensors to be on the same device'"
            )

    def _account(self, new: int) -> None:
        if self.budget is not None and new and self.live > self.budget:
            self.oom_raised += 1
            raise torch.OutOfMemoryError(
                f"simulated device: out of memory ({self.live / GIB:.2f} GiB live, budget {self.budget / GIB:.2f} GiB)"
            )

    def _run(self, func, args, kwargs):
        """``func(*args, **kwargs)``, from the shape cache when the same op already ran on inputs of the same
        shapes, strides and dtypes: most of meta's kernels are Python decompositions (milliseconds per op), and
        windows and chunks repeat the same shapes over and over."""
        if func.is_view or "out" in kwargs:
            return func(*args, **kwargs)
        try:
            key = (func, _signature(args), _signature(kwargs))
        except _Unhashable:
            return func(*args, **kwargs)
        hit = self._shape_cache.get(key)
        if hit is not None:
            self.cache_hits += 1
            if hit == "self":
                return args[0]
            spec, leaves = hit
            return tree_unflatten([torch.empty_strided(leaf[1], leaf[2], dtype=leaf[3], device=SIM_DEVICE)
                                   if isinstance(leaf, tuple) and leaf and leaf[0] == "T" else leaf
                                   for leaf in leaves], spec)
        out = func(*args, **kwargs)
        if func._schema.is_mutable:
            if out is args[0] and _is_sim(out):
                self._shape_cache[key] = "self"
            return out
        leaves, spec = tree_flatten(out)
        described = []
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor):
                if not _is_sim(leaf) or leaf.storage_offset() != 0:
                    return out
                described.append(("T", tuple(leaf.shape), tuple(leaf.stride()), leaf.dtype))
            elif leaf is None or isinstance(leaf, (int, float, bool)):
                described.append(leaf)
            else:
                return out
        self._shape_cache[key] = (spec, described)
        return out

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = _leaves(kwargs, _leaves(args, []))
        if not any(t.device.type == "meta" for t in tensors):
            out = func(*args, **kwargs)  # host work (or a factory call)
            if isinstance(out, torch.Tensor) and _is_sim(out):
                self._span.ops += 1
                if func.overloadpacket in (aten._to_copy, aten.to):
                    self._span.to_device_bytes += out.numel() * out.element_size()
                self._account(self._track_outputs(out))
            return out
        self._check_mixing(func, args, kwargs, tensors)
        packet = func.overloadpacket
        if packet in _FLOP_COMPOSITES:
            # Under inference_mode composite ops reach the mode whole; these carry the FLOPs (the registry knows
            # convolution, mm, addmm, bmm), so count the kernels they decompose into, as FlopCounterMode does.
            # Other composites run whole: Python decompositions (e.g. of upsampling) would allocate
            # intermediates the CUDA kernels do not.
            with self:
                decomposed = func.decompose(*args, **kwargs)
            if decomposed is not NotImplemented:
                return decomposed
        out = self._shim(func, args, kwargs)
        if out is None:
            out = self._run(func, args, kwargs)
            if func.overloadpacket in (aten._to_copy, aten.to) and not _is_sim(args[0]) and _is_sim(out):
                self._span.to_device_bytes += out.numel() * out.element_size()
            elif func is aten.copy_.default and _is_sim(args[0]) and not _is_sim(args[1]):
                self._span.to_device_bytes += args[1].numel() * args[1].element_size()
            if func in (aten.eq.Scalar,) and _is_sim(out) and args[1] == 0:
                self._known_zero[out] = True
        if packet in flop_registry:
            self._span.flops += int(flop_registry[packet](*args, **kwargs, out_val=out))
        if not func.is_view:
            self._span.ops += 1
            if not func._schema.is_mutable:
                # views and in-place ops allocate nothing (their storage is an input's, perhaps one created
                # before the simulation started, which must not be counted then)
                self._account(self._track_outputs(out))
        return out


class FusedAttention(TorchFunctionMode):
    """``F.scaled_dot_product_attention`` on the simulated device runs as the fused kernel a CUDA run would pick
    (flash or memory-efficient: only the output and its log-sum-exp are allocated), instead of meta's math trace."""

    def __init__(self, capabilities=None):
        super().__init__()
        from .attention import H100_CAPABILITIES

        self.capabilities = capabilities or H100_CAPABILITIES
        self.calls: Dict[str, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and _is_sim(args[0]):
            from .attention import choose_sdpa_backend

            q, k, v = args[:3]
            mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
            backend = choose_sdpa_backend(q.shape, k.shape, q.dtype, mask is not None, self.capabilities,
                                          free_bytes=None)
            self.calls[backend] = self.calls.get(backend, 0) + 1
            scale = kwargs.get("scale")
            if backend == "flash":
                return aten._scaled_dot_product_flash_attention(q, k, v, scale=scale)[0]
            if backend == "efficient":
                return aten._scaled_dot_product_efficient_attention(q, k, v, mask, False, scale=scale)[0]
        return func(*args, **kwargs)


class SimulatedRuntime(StandaloneRuntime):
    """``StandaloneRuntime`` on the simulated device; free memory = budget (or an 80 GB card) minus live bytes.

    Progress events book the span since the previous event to their stage (as bench/run.py times stages).
    """

    def __init__(self, simulator: DeviceSimulator, dtype: torch.dtype = torch.float16, **kwargs):
        super().__init__(device=SIM_DEVICE, dtype=dtype, vram_budget=simulator.budget, **kwargs)
        self.simulator = simulator
        self.capacity = simulator.budget if simulator.budget is not None else DEFAULT_CAPACITY_BYTES

    def free_device_memory(self) -> Optional[int]:
        return int(self.capacity - self.simulator.live)

    def offload_released(self, keep=None, needed: int = 0) -> None:
        # network weights sent back to the host need no values: leave the host copies uninitialised (untouched
        # pages cost no RAM), so offloading a 2.6 GB UNet costs nothing on the machine running the simulation
        sim = self.simulator
        sim.uninitialised_host_copies = True
        try:
            super().offload_released(keep=keep, needed=needed)
        finally:
            sim.uninitialised_host_copies = False

    def progress(self, stage, done, total, preview=None, preview_latent=None):
        self.simulator.book(stage)
        super().progress(stage, done, total, preview, preview_latent)

    def mark(self, stage: str) -> None:
        self.simulator.book(stage)


def book_vae_calls(codec, runtime: SimulatedRuntime) -> None:
    """Book every VAE encode to "encode" and decode to "decode" wherever they happen (the prior hands its frames
    to the encoder inside its own stage; the conditioning is encoded before sampling)."""
    state = {"stage": "prior"}

    def booked(fn, name):
        def call(x):
            runtime.mark(state["stage"])
            try:
                return fn(x)
            finally:
                runtime.mark(name)

        return call

    original_progress = runtime.progress

    def progress(stage, done, total, preview=None, preview_latent=None):
        if stage not in ("encode", "decode"):
            state["stage"] = stage
        original_progress(stage, done, total, preview, preview_latent)

    runtime.progress = progress
    codec.encode = booked(codec.encode, "encode")
    codec.decode = booked(codec.decode, "decode")
