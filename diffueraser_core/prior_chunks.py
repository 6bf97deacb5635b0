"""Streaming storage of the ProPainter prior: per-frame chunk stores, chunk cursors with out-of-memory retry, the
flow-guided video pulled on demand (RAFT -> flow completion -> image propagation, a chunk at a time) and the
output writer that composites finished frames at the input size.

Chunks sit on the same grid as the reference's whole-video loops (from frame 0, in order), so every network sees
exactly the inputs the reference gives it; see ``prior_propainter`` for the whole stage.
"""

from __future__ import annotations

import bisect
import logging
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .allocator import return_free_memory
from .masks import resize_masks_nearest
from .prior_settings import (
    COMPLETION_VALUES_PER_PIXEL,
    OUTPUT_FLUSH_FRAMES,
    PROGRESS_STAGE,
    PROPAGATION_INTERPOLATION,
    PROPAGATION_VALUES_PER_PIXEL,
    RAFT_VALUES_PER_PIXEL,
    STAGE,
    PriorResult,
    PriorSink,
)
from .video import resize_frames

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------------
# Helpers


class _Progress:
    def __init__(self, runtime, total: int):
        self.runtime = runtime
        self.total = max(1, total)
        self.done = 0
        runtime.progress(PROGRESS_STAGE, 0, self.total)  # the bar exists from the start (the host fills it in)

    def step(self, amount: int) -> None:
        self.done = min(self.total, self.done + amount)
        self.runtime.progress(PROGRESS_STAGE, self.done, self.total)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _acquire(handle, dtype: torch.dtype, memory_required: int) -> torch.nn.Module:
    module = handle.acquire(memory_required=int(memory_required))
    param = next(module.parameters(), None)
    if param is not None and param.dtype != dtype:
        # The host gave it in another precision: an explicit settings.compute_dtype, or RAFT from a host that
        # ignores ``preferred_dtype`` (the reference always runs RAFT in fp32).
        module = module.to(dtype=dtype)
    return module


def _to_device_frames(frames_u8: torch.Tensor, device, dtype) -> torch.Tensor:
    """uint8 [n,h,w,3] CPU -> [1,n,3,h,w] in [-1,1] on the device (the reference's to_tensors()*2-1)."""
    x = frames_u8.to(device).permute(0, 3, 1, 2).to(torch.float32)
    return (x / 255.0 * 2.0 - 1.0).to(dtype).unsqueeze(0)


def _to_device_masks(masks: torch.Tensor, device, dtype) -> torch.Tensor:
    """bool [n,h,w] CPU -> [1,n,1,h,w] 0/1 on the device."""
    return masks.to(device).to(dtype).unsqueeze(1).unsqueeze(0)


# ----------------------------------------------------------------------------------------------------------
# Stages. A video's working-size frames, flows and propagated frames are computed a chunk at a time, when a later
# computation first needs them, and dropped once nothing ahead reads them, so host memory follows the chunk and
# reference-window lengths, not the video length. Chunks sit on the same grid as the reference's whole-video
# loops (from frame 0, in order), so every network sees exactly the inputs the reference gives it.


class _PerFrame:
    """CPU tensors of one ``shape``/``dtype`` by frame (or flow-pair) index, appended in order a chunk at a time.

    Kept as the chunks that produced them and dropped a whole chunk at a time: a few large allocations the
    allocator returns to the system, where per-frame tensors would leave the host heap fragmented and resident.
    """

    def __init__(self, shape: Tuple[int, ...], dtype: torch.dtype):
        self.shape, self.dtype = tuple(shape), dtype
        self.starts: List[int] = []
        self.chunks: List[torch.Tensor] = []
        self.stop = 0  # end of everything put so far, dropped or not

    def put(self, start: int, values: torch.Tensor) -> None:
        if start != self.stop:
            raise RuntimeError(f"{STAGE}: internal error, chunk at {start} does not follow {self.stop}")
        self.stop = int(start) + int(values.shape[0])
        self.starts.append(int(start))
        self.chunks.append(values.clone())  # its own storage: a view would pin the device result's copy

    def get(self, start: int, stop: int) -> torch.Tensor:
        return self.pick(range(start, stop))

    def pick(self, ids) -> torch.Tensor:
        found = []
        for i in ids:
            k = bisect.bisect_right(self.starts, i) - 1
            if k < 0 or i >= self.starts[k] + self.chunks[k].shape[0]:
                raise RuntimeError(f"{STAGE}: internal error, frame {i} is not held (held from {self.starts[:1]})")
            found.append(self.chunks[k][i - self.starts[k]])
        # an empty range is a real case (a one-frame chunk reads no flow pair)
        return torch.stack(found) if found else torch.empty((0, *self.shape), dtype=self.dtype)

    def drop_below(self, low: int) -> bool:
        dropped = False
        while self.chunks and self.starts[0] + self.chunks[0].shape[0] <= low:
            self.starts.pop(0)
            self.chunks.pop(0)
            dropped = True
        return dropped


class _ChunkCursor:
    """Runs ``run(start, count)`` over ``[0, length)`` in order, as far as asked; on out-of-memory the cache is
    emptied and the same start is retried with half the chunk (kept for the rest of the stage)."""

    def __init__(self, length: int, chunk: int, run: Callable[[int, int], None], runtime, what: str,
                 progress: "_Progress"):
        self.length, self.chunk, self.run = int(length), max(1, int(chunk)), run
        self.runtime, self.what, self.progress = runtime, what, progress
        self.done = 0

    def advance_to(self, target: int) -> None:
        target = min(int(target), self.length)
        while self.done < target:
            self.runtime.check_interrupt()
            count = min(self.chunk, self.length - self.done)
            out_of_memory = False
            try:
                self.run(self.done, count)
            except Exception as exc:  # noqa: BLE001 - only the host's out-of-memory errors are handled
                if not self.runtime.is_oom(exc) or count <= 1:
                    raise
                out_of_memory = True
            if out_of_memory:
                # Outside the except block so the traceback no longer pins the chunk's tensors.
                self.runtime.empty_cache()
                self.chunk = max(1, count // 2)
                log.warning("%s: out of memory in %s with %d frames; retrying with %d", STAGE, self.what, count,
                            self.chunk)
                continue
            self.done += count
            self.progress.step(count)


class _FlowGuidedVideo:
    """RAFT flow -> completed flow -> image propagation of one video (the whole clip, or the sample that
    pre-propagation uses), pulled on demand: ``ensure_propagated(stop)`` makes frames ``[0, stop)`` of
    ``updated``/``updated_masks`` available, running each stage only as far as that needs.

    ``frames_of(a, b)`` gives working-size uint8 frames ``[b-a,h,w,3]``; ``flow_masks`` is the bool dilated mask
    ``[n,h,w]`` (flow completion's mask); ``masks_in`` the image mask as a function of the frame range (the flow
    mask, with pre-propagated frames' masks replaced); ``overrides`` replaces some input frames by already
    propagated ones (fp16 ``[3,h,w]``).

    Flow completion reads RAFT's flows, padding included, and writes the completed ones apart, as the reference's
    separate output lists. RAFT pairs are independent (eval-mode norms), so any clip length gives the same flows,
    which the OOM retry relies on.
    """

    def __init__(self, count, size, frames_of, flow_masks, masks_in_of, overrides, nets, settings, dtype, runtime,
                 progress):
        self.count, (self.h, self.w) = int(count), size
        self.frames_of, self.flow_masks, self.masks_in_of = frames_of, flow_masks, masks_in_of
        self.overrides = overrides
        self.nets, self.settings, self.dtype, self.runtime = nets, settings, dtype, runtime
        h, w = size
        # per pair: RAFT's, and the completed ones
        self.raw_f, self.raw_b = _PerFrame((2, h, w), torch.float16), _PerFrame((2, h, w), torch.float16)
        self.flows_f, self.flows_b = _PerFrame((2, h, w), torch.float16), _PerFrame((2, h, w), torch.float16)
        self.frames = _PerFrame((h, w, 3), torch.uint8)  # working-size frames, resized once
        # in [-1,1]; True = still a hole after propagation
        self.updated, self.updated_masks = _PerFrame((3, h, w), torch.float16), _PerFrame((h, w), torch.bool)
        pairs = self.count - 1
        clip_pairs = settings.raft_clip_length(max(self.h, self.w)) - 1
        self.raft = _ChunkCursor(pairs, clip_pairs, self._raft, runtime, "RAFT flow", progress)
        self.completion = _ChunkCursor(pairs, settings.subvideo_length, self._complete, runtime, "flow completion",
                                       progress)
        self.propagation = _ChunkCursor(self.count, settings.propagation_chunk, self._propagate, runtime,
                                        "image propagation", progress)

    # -- what the stages read
    def frames_at(self, ids) -> torch.Tensor:
        ids = list(ids)
        stop = max(ids) + 1
        if stop > self.frames.stop:
            # whole blocks, so resizing runs on batches; kept until propagation and the transformer are past
            # them, since re-making them (a bicubic resize) for every reader costs more than holding them
            stop = min(self.count, max(stop, self.frames.stop + OUTPUT_FLUSH_FRAMES))
            self.frames.put(self.frames.stop, self.frames_of(self.frames.stop, stop))
        return self.frames.pick(ids)

    def ensure_propagated(self, stop: int) -> None:
        self.propagation.advance_to(stop)

    def ensure_completed(self, stop: int) -> None:
        self.completion.advance_to(stop)

    def drop_read(self, first_frame: int, first_pair: int) -> None:
        """Drop what no stage will read again: later transformer steps read propagated frames from
        ``first_frame`` and completed flows from ``first_pair`` on; the stages' own next chunks read their
        padding. Each store has its own readers, hence its own limit."""
        s = self.settings
        next_propagation = self.propagation.done - s.propagation_padding
        dropped = [
            self.frames.drop_below(min(self.raft.done, next_propagation, first_pair)),
        ] + [
            store.drop_below(self.completion.done - s.flow_completion_padding) for store in (self.raw_f, self.raw_b)
        ] + [
            store.drop_below(min(first_pair, next_propagation)) for store in (self.flows_f, self.flows_b)
        ] + [
            store.drop_below(first_frame) for store in (self.updated, self.updated_masks)
        ]
        if any(dropped):
            return_free_memory()  # see allocator.py: freed chunks would otherwise stay resident

    # -- the stages, one chunk each (the computations are the module functions below, shared with the Ray
    # executor, which runs the same chunks on other machines)
    def _raft(self, start: int, count: int) -> None:
        forward, backward = raft_chunk(self.nets, self.frames_at(range(start, start + count + 1)), self.settings)
        self.raw_f.put(start, forward)
        self.raw_b.put(start, backward)

    def _complete(self, start: int, count: int) -> None:
        s, e = completion_span(start, count, self.count, self.settings)
        self.raft.advance_to(e)
        self.runtime.check_interrupt()  # the pull above may have run for a while
        forward, backward = complete_chunk(self.nets, self.raw_f.get(s, e), self.raw_b.get(s, e),
                                           self.flow_masks[s : e + 1], start - s, count, self.dtype)
        self.flows_f.put(start, forward)
        self.flows_b.put(start, backward)

    def _propagate(self, start: int, count: int) -> None:
        s, e = propagation_span(start, count, self.count, self.settings)
        self.completion.advance_to(e - 1)
        self.runtime.check_interrupt()
        overrides = {i - s: self.overrides[i] for i in range(s, e) if i in self.overrides}
        updated, updated_masks = propagate_chunk(
            self.nets, self.frames_at(range(s, e)), overrides, self.masks_in_of(s, e),
            (self.flows_f.get(s, e - 1), self.flows_b.get(s, e - 1)), start - s, count, self.dtype,
        )
        self.updated.put(start, updated)
        self.updated_masks.put(start, updated_masks)


# ----------------------------------------------------------------------------------------------------------
# One chunk of each stage, from its (padded) inputs on the CPU to its outputs on the CPU. The single-process
# cursors above and the Ray executor's workers (``prior_distributed``) both run exactly these.


def completion_span(start: int, count: int, frames: int, settings) -> Tuple[int, int]:
    """The flow pairs ``[s, e)`` a flow-completion chunk reads: the chunk plus its padding, within the video."""
    pad = settings.flow_completion_padding
    return max(0, start - pad), min(frames - 1, start + count + pad)


def propagation_span(start: int, count: int, frames: int, settings) -> Tuple[int, int]:
    """The frames ``[s, e)`` an image-propagation chunk reads (it also reads the flow pairs ``[s, e - 1)``)."""
    pad = settings.propagation_padding
    return max(0, start - pad), min(frames, start + count + pad)


def raft_chunk(nets, frames_u8: torch.Tensor, settings) -> Tuple[torch.Tensor, torch.Tensor]:
    """RAFT on consecutive pairs of working-size uint8 frames ``[c+1,h,w,3]`` -> fp16 forward and backward flows
    ``[c,2,h,w]`` (always in fp32, as the reference)."""
    count, h, w = int(frames_u8.shape[0]) - 1, int(frames_u8.shape[1]), int(frames_u8.shape[2])
    # all-pairs correlation volume at 1/8 size in fp32, plus its pyramid (1 + 1/4 + 1/16 + ...)
    corr_bytes = (h // 8 * (w // 8)) ** 2 * 4 * 4 // 3
    raft = _acquire(nets.raft, torch.float32, count * (corr_bytes + h * w * RAFT_VALUES_PER_PIXEL * 4))
    device = next(raft.parameters()).device
    clip = _to_device_frames(frames_u8, device, torch.float32)[0]
    with torch.inference_mode():
        _, forward = raft(clip[:-1], clip[1:], iters=settings.raft_iter, test_mode=True)
        _, backward = raft(clip[1:], clip[:-1], iters=settings.raft_iter, test_mode=True)
    return forward.to("cpu", torch.float16), backward.to("cpu", torch.float16)


def complete_chunk(nets, raw_f, raw_b, flow_masks, head: int, count: int, dtype):
    """Flow completion of the padded pairs ``raw_f``/``raw_b`` (fp16 ``[p,2,h,w]``) with their frames' masks
    (bool ``[p+1,h,w]``); returns the completed flows of the ``count`` pairs from ``head`` (fp16)."""
    p, h, w = int(raw_f.shape[0]), int(raw_f.shape[2]), int(raw_f.shape[3])
    model = _acquire(nets.flow_completion, dtype, p * h * w * COMPLETION_VALUES_PER_PIXEL * _itemsize(dtype))
    device = next(model.parameters()).device
    gt = (raw_f.to(device, dtype).unsqueeze(0), raw_b.to(device, dtype).unsqueeze(0))
    masks = _to_device_masks(flow_masks, device, dtype)
    with torch.inference_mode():
        pred, _ = model.forward_bidirect_flow(gt, masks)
        pred = model.combine_flow(gt, pred, masks)
    return (pred[0][0, head : head + count].to("cpu", torch.float16),
            pred[1][0, head : head + count].to("cpu", torch.float16))


def propagate_chunk(nets, frames_u8, overrides: Dict[int, torch.Tensor], masks_in, flows, head: int, count: int,
                    dtype):
    """Image propagation of the padded working-size frames ``frames_u8`` (uint8 ``[t,h,w,3]``; ``overrides``:
    already propagated frames by offset, fp16 ``[3,h,w]``) with the image masks ``masks_in`` (bool ``[t,h,w]``)
    and completed flows (fp16 ``[t-1,2,h,w]`` each way). Returns the ``count`` frames from ``head``: fp16
    ``[3,h,w]`` in [-1,1] and bool masks (True = still a hole)."""
    t, h, w = int(frames_u8.shape[0]), int(frames_u8.shape[1]), int(frames_u8.shape[2])
    generator = _acquire(nets.generator, dtype, t * h * w * PROPAGATION_VALUES_PER_PIXEL * _itemsize(dtype))
    device = next(generator.parameters()).device
    frames = _to_device_frames(frames_u8, device, torch.float32)
    for k, value in overrides.items():
        frames[0, k] = value.to(device, torch.float32)
    frames = frames.to(dtype)
    m = _to_device_masks(masks_in, device, dtype)
    flows = (flows[0].to(device, dtype).unsqueeze(0), flows[1].to(device, dtype).unsqueeze(0))
    with torch.inference_mode():
        prop, prop_masks = generator.img_propagation(frames * (1 - m), flows, m, PROPAGATION_INTERPOLATION)
        result = frames * (1 - m) + prop.reshape(1, t, 3, h, w) * m
    return (result[0, head : head + count].to("cpu", torch.float16),
            prop_masks.reshape(t, h, w)[head : head + count].to("cpu") > 0.5)


def composite_prior(generated, frames, masks, work_masks) -> Tuple[torch.Tensor, torch.Tensor]:
    """Working-size generated frames (uint8 ``[t,h,w,3]``) upscaled into the input-size ``frames`` inside the hole:
    the working-size dilated mask upscaled by nearest neighbour, united with the input mask ``masks`` so no hole
    pixel is ever left out. Returns ``(composite uint8 [t,H,W,3], hole bool [t,H,W])``."""
    height, width = frames.shape[1:3]
    upscaled = resize_frames(generated, (height, width), mode="bicubic")
    hole = resize_masks_nearest(work_masks, (height, width)) | masks
    return torch.where(hole.unsqueeze(-1), upscaled, frames), hole


class _OutputWriter:
    """Collects composited working-size frames and writes finished ones into the input-size output, or hands them
    to ``sink`` (then no input-size output or mask is ever allocated).

    Frames are finished in increasing order and a written frame is never added again (every transformer step
    only adds frames at or after the frame it starts at, and only frames before it are flushed), so the frames
    written form one contiguous run from 0; ``_write`` checks it, since a sink cannot take anything else.
    """

    def __init__(self, frames, masks, work_masks, sink: Optional[PriorSink] = None):
        self.frames = frames
        self.masks = masks
        self.work_masks = work_masks
        self.sink = sink
        self.output = frames.clone() if sink is None else None
        self.out_masks = torch.empty_like(masks) if sink is None else None
        self.pending: Dict[int, torch.Tensor] = {}
        self.written = 0

    def add(self, index: int, composite: torch.Tensor) -> None:
        previous = self.pending.get(index)
        if previous is None:
            self.pending[index] = composite
        else:
            # The reference's running average of overlapping steps, truncated to uint8 each time.
            mixed = previous.to(torch.float32) * 0.5 + composite.to(torch.float32) * 0.5
            self.pending[index] = mixed.to(torch.uint8)

    def flush(self, before: int, force: bool = False) -> None:
        ready = sorted(i for i in self.pending if i < before)
        if not ready or (len(ready) < OUTPUT_FLUSH_FRAMES and not force):
            return
        for k in range(0, len(ready), OUTPUT_FLUSH_FRAMES):
            self._write(ready[k : k + OUTPUT_FLUSH_FRAMES])

    def write_range(self, start: int, stop: int, work_frames: torch.Tensor) -> None:
        """Frames ``[start, stop)`` whose working-size result is simply ``work_frames`` (nothing to fill there)."""
        for i in range(start, stop):
            self.pending[i] = work_frames[i - start]
        self.flush(stop, force=True)

    def _write(self, indices: List[int]) -> None:
        start, stop = self.written, self.written + len(indices)
        if indices != list(range(start, stop)):
            raise RuntimeError(
                f"{STAGE}: internal error, frames {indices[:3]}... were finished out of order (next expected {start})"
            )
        generated = torch.stack([self.pending.pop(i) for i in indices])
        self.written = stop
        self._composite(start, stop, generated)

    def _composite(self, start: int, stop: int, generated: torch.Tensor) -> None:
        """Composite finished frames ``[start, stop)`` and deliver them (the Ray executor does it on a worker)."""
        composite, hole = composite_prior(generated, self.frames[start:stop], self.masks[start:stop],
                                          self.work_masks[start:stop])
        self._deliver(start, stop, composite, hole)

    def _deliver(self, start: int, stop: int, composite: torch.Tensor, hole: torch.Tensor) -> None:
        if self.sink is None:
            self.out_masks[start:stop] = hole
            self.output[start:stop] = composite
        else:
            self.sink(start, stop, composite)

    def finish(self) -> PriorResult:
        if self.pending or self.written != self.frames.shape[0]:
            raise RuntimeError(
                f"{STAGE}: internal error, {self.written} of {self.frames.shape[0]} frames written, "
                f"{len(self.pending)} left pending"
            )
        return PriorResult(frames=self.output, masks=self.out_masks)
