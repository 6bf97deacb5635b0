"""ProPainter prior: frames + masks -> RAFT flow -> completed flow -> image propagation -> transformer.

Reproduces DiffuEraser's ``propainter/inference.py`` (reference-spec section 9) with streaming memory:

* The video stays on the CPU in compact dtypes: input frames ``uint8``, masks ``bool``, flows and propagated
  frames ``float16``. The working-size frames, flows and propagated frames are computed a chunk at a time when
  a later step first needs them and dropped once nothing ahead reads them (``_FlowGuidedVideo``): for a video
  longer than ``subvideo_length`` what is held depends on the chunk lengths and the transformer's reference
  window, never on the video length. Only the current clip / chunk / transformer step goes to
  ``runtime.device`` and comes back, so peak device memory does not depend on the video length either.
* Each network is acquired through its runtime handle once per chunk with a rough memory estimate, so the host
  can make room. On an out-of-memory error the cache is emptied and the same frames are computed again with
  half the chunk: exact for RAFT (pairs are independent); for flow completion and image propagation only the
  frames next to the extra chunk boundary can differ (as with a smaller subvideo_length). A transformer step
  cannot be split without changing its result, so it is retried once and the error raised if it recurs.
* The result is at the input size: the generated working-size frames are upscaled (bicubic, antialiased) and
  composited inside the dilated mask (the working-size dilated mask upscaled by nearest neighbour, united with
  the input mask so no hole pixel is ever left out); every pixel outside it is the input's, bit for bit.
* Host memory: by default the result is returned whole, an input-size uint8 copy of the video plus its bool
  mask (4 bytes per input pixel per frame on top of the input). With a ``sink`` the finished frames are handed
  over ``OUTPUT_FLUSH_FRAMES`` at a time, in frame order, and that copy never exists: what stays is the input,
  the working-size dilated mask (bool) and the moving window of working-size frames, flows and propagated frames.

Reference behaviour kept on purpose: the working size (ratio 0.6, longer side capped at 960, rounded down to
a multiple of 8), ProPainter's cross-shaped mask dilation, RAFT in fp32 on consecutive pairs in short clips,
flow completion in padded chunks, the pre-propagation of sampled frames for long videos, image propagation in
padded chunks, the neighbour/reference frame selection of the transformer, the uint8 truncations and the
0.5/0.5 running average of overlapping transformer outputs.

Deliberate differences: the prior is not round-tripped through an mp4 file (quirk 7) and is composited back at
the input size instead of being written at the unrounded 0.6x size; transformer outputs are clamped to 0..255
before the uint8 truncation (numpy's cast of out-of-range floats is undefined); flows and propagated frames are
stored in fp16 between stages also when computing in fp32 (the reference keeps fp32 on the CPU, fp16 on GPU);
a 1-frame video runs as the frame repeated twice (the reference cannot compute flow for it).
"""

from __future__ import annotations

import bisect
import logging
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .allocator import return_free_memory
from .errors import InputError
from .masks import dilate_cross, resize_masks_nearest
from .video import resize_frames

log = logging.getLogger(__name__)

STAGE = "ProPainter prior"
PROGRESS_STAGE = "prior"

# Reference defaults (propainter/inference.py, Propainter.forward and module constants).
DEFAULT_RESIZE_RATIO = 0.6
MAX_SIDE_THRESH = 960
DEFAULT_MASK_DILATION = 4
# run_diffueraser calls the prior with mask_dilation=8; the forward's own default is 4.
RUN_DIFFUERASER_MASK_DILATION = 8
DEFAULT_REF_STRIDE = 10
DEFAULT_NEIGHBOR_LENGTH = 10
DEFAULT_SUBVIDEO_LENGTH = 80
DEFAULT_RAFT_ITER = 20
# RAFT clip length (frames per call) by the working size's longer side: <=640 -> 12, <=720 -> 8, <=1280 -> 4.
RAFT_CLIP_LENGTHS: Tuple[Tuple[int, int], ...] = ((640, 12), (720, 8), (1280, 4))
RAFT_CLIP_LENGTH_LARGEST = 2
FLOW_COMPLETION_PADDING = 5
PROPAGATION_PADDING = 10
# Image propagation (and the pre-propagation rule) uses chunks of min(100, subvideo_length) frames.
PROPAGATION_CHUNK_CAP = 100
PROPAGATION_INTERPOLATION = "nearest"
SIZE_MULTIPLE = 8
# RAFT's 4-level correlation pyramid halves the 1/8-size feature map three times: 8 pixels -> 1 is the floor.
MIN_WORKING_SIDE = 64

# Memory estimates given to handle.acquire so the host can make room: activation values per working-size pixel
# of one frame (RAFT: per pair, both directions run one after the other), times the element size. Rough upper
# bounds from the layer widths, not measurements (no GPU was available to measure them).
RAFT_VALUES_PER_PIXEL = 256
COMPLETION_VALUES_PER_PIXEL = 384
PROPAGATION_VALUES_PER_PIXEL = 64
TRANSFORMER_VALUES_PER_PIXEL = 384
# Finished working-size frames are upscaled and written to the output (or handed to the sink) this many at a time.
OUTPUT_FLUSH_FRAMES = 16

#: ``sink(start, stop, frames_u8)``: receives the finished input-size frames ``[start, stop)`` (uint8
#: ``[stop-start,H,W,3]``, to be treated as read-only: they may be views of the input).
PriorSink = Callable[[int, int, torch.Tensor], None]

RAFT_FILE = "raft-things.pth"
FLOW_COMPLETION_FILE = "recurrent_flow_completion.pth"
GENERATOR_FILE = "ProPainter.pth"


@dataclass
class ProPainterSettings:
    """Every parameter of the reference prior, with the reference default.

    ``mask_dilation``: iterations of the cross-shaped dilation for both the flow mask and the image mask (the
    forward's default is 4; run_diffueraser passes ``RUN_DIFFUERASER_MASK_DILATION`` = 8).
    ``raft_clip_lengths``: ``(max longer side, frames per RAFT call)`` rows, first match wins, else
    ``raft_clip_length_largest``. ``pre_propagation``: the reference always pre-propagates sampled frames when
    the video is longer than ``min(propagation_chunk_cap, subvideo_length)``; False skips it.
    ``compute_dtype``: None = the runtime's (fp16/bf16 on GPU, fp32 on CPU); RAFT always runs in fp32.
    """

    resize_ratio: float = DEFAULT_RESIZE_RATIO
    max_side: int = MAX_SIDE_THRESH
    mask_dilation: int = DEFAULT_MASK_DILATION
    ref_stride: int = DEFAULT_REF_STRIDE
    neighbor_length: int = DEFAULT_NEIGHBOR_LENGTH
    subvideo_length: int = DEFAULT_SUBVIDEO_LENGTH
    raft_iter: int = DEFAULT_RAFT_ITER
    raft_clip_lengths: Tuple[Tuple[int, int], ...] = RAFT_CLIP_LENGTHS
    raft_clip_length_largest: int = RAFT_CLIP_LENGTH_LARGEST
    flow_completion_padding: int = FLOW_COMPLETION_PADDING
    propagation_padding: int = PROPAGATION_PADDING
    propagation_chunk_cap: int = PROPAGATION_CHUNK_CAP
    pre_propagation: bool = True
    compute_dtype: Optional[torch.dtype] = None

    def validate(self) -> None:
        checks = [
            ("resize_ratio", self.resize_ratio, 0 < self.resize_ratio <= 4, "in (0, 4]"),
            ("max_side", self.max_side, self.max_side >= MIN_WORKING_SIDE, f">= {MIN_WORKING_SIDE}"),
            ("mask_dilation", self.mask_dilation, self.mask_dilation >= 0, ">= 0"),
            ("ref_stride", self.ref_stride, self.ref_stride >= 1, ">= 1"),
            ("neighbor_length", self.neighbor_length, self.neighbor_length >= 2, ">= 2"),
            ("subvideo_length", self.subvideo_length, self.subvideo_length >= 2, ">= 2"),
            ("raft_iter", self.raft_iter, self.raft_iter >= 1, ">= 1"),
            ("raft_clip_length_largest", self.raft_clip_length_largest, self.raft_clip_length_largest >= 2, ">= 2"),
            ("flow_completion_padding", self.flow_completion_padding, self.flow_completion_padding >= 0, ">= 0"),
            ("propagation_padding", self.propagation_padding, self.propagation_padding >= 0, ">= 0"),
            ("propagation_chunk_cap", self.propagation_chunk_cap, self.propagation_chunk_cap >= 2, ">= 2"),
        ]
        for name, value, ok, rule in checks:
            if not ok:
                raise InputError(f"{STAGE}: {name} must be {rule}, got {value!r}")
        if self.compute_dtype is not None and not (
            isinstance(self.compute_dtype, torch.dtype) and self.compute_dtype.is_floating_point
        ):
            raise InputError(
                f"{STAGE}: compute_dtype must be a floating torch dtype or None, got {self.compute_dtype!r}"
            )
        for row in self.raft_clip_lengths:
            if len(row) != 2 or row[1] < 2:
                raise InputError(f"{STAGE}: raft_clip_lengths rows must be (max_side, frames>=2), got {row!r}")

    def raft_clip_length(self, longer_side: int) -> int:
        for max_side, length in self.raft_clip_lengths:
            if longer_side <= max_side:
                return int(length)
        return int(self.raft_clip_length_largest)

    @property
    def propagation_chunk(self) -> int:
        return min(self.propagation_chunk_cap, self.subvideo_length)


@dataclass
class ProPainterNets:
    """Runtime handles (``runtime.wrap(module, name)``) of the three ProPainter networks."""

    raft: object
    flow_completion: object
    generator: object


@dataclass
class PriorResult:
    """``frames`` uint8 [T,H,W,3] at the input size; ``masks`` bool [T,H,W], the dilated mask composited in.

    Both are None when the frames went to a sink instead (``run_propainter_prior(..., sink=...)``).
    """

    frames: Optional[torch.Tensor]
    masks: Optional[torch.Tensor]


def load_propainter_nets(folder, runtime, raft_path=None, flow_completion_path=None, generator_path=None
                         ) -> ProPainterNets:
    """Load raft-things.pth, recurrent_flow_completion.pth and ProPainter.pth and wrap them in ``runtime``.

    Files are looked up in ``folder`` under their official names unless a path is given for them.
    """
    from .models.flow_completion import load_flow_completion
    from .models.propainter import load_propainter
    from .models.raft import load_raft

    folder = os.fspath(folder) if folder is not None else ""
    return ProPainterNets(
        raft=runtime.wrap(load_raft(raft_path or os.path.join(folder, RAFT_FILE)), "propainter_raft"),
        flow_completion=runtime.wrap(
            load_flow_completion(flow_completion_path or os.path.join(folder, FLOW_COMPLETION_FILE)),
            "propainter_flow_completion",
        ),
        generator=runtime.wrap(
            load_propainter(generator_path or os.path.join(folder, GENERATOR_FILE)), "propainter_generator"
        ),
    )


def working_size(height: int, width: int, settings: ProPainterSettings) -> Tuple[int, int]:
    """The reference's processing size ``(h, w)``: ratio (reduced so the longer side <= max_side), int(), /8 down.

    Documented fallback: when that would make the shorter side smaller than RAFT's 64-pixel minimum (small
    clips at ratio 0.6), the ratio is raised just enough to keep 64 pixels, up to the input size itself.
    """
    ratio = settings.resize_ratio
    longer, shorter = max(height, width), min(height, width)
    if longer > settings.max_side:
        ratio = ratio * settings.max_side / longer
    if ratio * shorter < MIN_WORKING_SIDE <= shorter:
        ratio = min(1.0, (MIN_WORKING_SIDE + 0.5) / shorter)
    if ratio != 1.0:
        height, width = int(ratio * height), int(ratio * width)
    return height - height % SIZE_MULTIPLE, width - width % SIZE_MULTIPLE


def get_ref_index(mid: int, neighbor_ids: List[int], length: int, ref_stride: int, ref_num: int) -> List[int]:
    """Reference frames of one transformer step, exactly as the reference picks them.

    ``ref_num == -1``: every ``ref_stride``-th frame of the video. Otherwise frames every ``ref_stride`` in
    ``[mid - ref_stride*(ref_num//2), mid + ref_stride*(ref_num//2))``; the reference's ``len > ref_num`` test
    lets one more than ``ref_num`` through, kept as is.
    """
    if ref_num == -1:
        return [i for i in range(0, length, ref_stride) if i not in neighbor_ids]
    refs: List[int] = []
    start = max(0, mid - ref_stride * (ref_num // 2))
    end = min(length, mid + ref_stride * (ref_num // 2))
    for i in range(start, end, ref_stride):
        if i not in neighbor_ids:
            if len(refs) > ref_num:
                break
            refs.append(i)
    return refs


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

    # -- the stages, one chunk each
    def _raft(self, start: int, count: int) -> None:
        h, w = self.h, self.w
        # all-pairs correlation volume at 1/8 size in fp32, plus its pyramid (1 + 1/4 + 1/16 + ...)
        corr_bytes = (h // 8 * (w // 8)) ** 2 * 4 * 4 // 3
        raft = _acquire(self.nets.raft, torch.float32, count * (corr_bytes + h * w * RAFT_VALUES_PER_PIXEL * 4))
        device = next(raft.parameters()).device
        clip = _to_device_frames(self.frames_at(range(start, start + count + 1)), device, torch.float32)[0]
        with torch.inference_mode():
            _, forward = raft(clip[:-1], clip[1:], iters=self.settings.raft_iter, test_mode=True)
            _, backward = raft(clip[1:], clip[:-1], iters=self.settings.raft_iter, test_mode=True)
        self.raw_f.put(start, forward.to("cpu", torch.float16))
        self.raw_b.put(start, backward.to("cpu", torch.float16))

    def _complete(self, start: int, count: int) -> None:
        h, w, dtype, pad = self.h, self.w, self.dtype, self.settings.flow_completion_padding
        s, e = max(0, start - pad), min(self.count - 1, start + count + pad)
        self.raft.advance_to(e)
        self.runtime.check_interrupt()  # the pull above may have run for a while
        model = _acquire(self.nets.flow_completion, dtype, (e - s) * h * w * COMPLETION_VALUES_PER_PIXEL * _itemsize(dtype))
        device = next(model.parameters()).device
        gt = (self.raw_f.get(s, e).to(device, dtype).unsqueeze(0), self.raw_b.get(s, e).to(device, dtype).unsqueeze(0))
        masks = _to_device_masks(self.flow_masks[s : e + 1], device, dtype)
        with torch.inference_mode():
            pred, _ = model.forward_bidirect_flow(gt, masks)
            pred = model.combine_flow(gt, pred, masks)
        head = start - s
        self.flows_f.put(start, pred[0][0, head : head + count].to("cpu", torch.float16))
        self.flows_b.put(start, pred[1][0, head : head + count].to("cpu", torch.float16))

    def _propagate(self, start: int, count: int) -> None:
        h, w, dtype, pad = self.h, self.w, self.dtype, self.settings.propagation_padding
        s, e = max(0, start - pad), min(self.count, start + count + pad)
        self.completion.advance_to(e - 1)
        self.runtime.check_interrupt()
        generator = _acquire(self.nets.generator, dtype, (e - s) * h * w * PROPAGATION_VALUES_PER_PIXEL * _itemsize(dtype))
        device = next(generator.parameters()).device
        frames = _to_device_frames(self.frames_at(range(s, e)), device, torch.float32)
        for i in range(s, e):
            if i in self.overrides:
                frames[0, i - s] = self.overrides[i].to(device, torch.float32)
        frames = frames.to(dtype)
        m = _to_device_masks(self.masks_in_of(s, e), device, dtype)
        flows = (self.flows_f.get(s, e - 1).to(device, dtype).unsqueeze(0),
                 self.flows_b.get(s, e - 1).to(device, dtype).unsqueeze(0))
        with torch.inference_mode():
            prop, prop_masks = generator.img_propagation(frames * (1 - m), flows, m, PROPAGATION_INTERPOLATION)
            t = e - s
            result = frames * (1 - m) + prop.reshape(1, t, 3, h, w) * m
        head = start - s
        self.updated.put(start, result[0, head : head + count].to("cpu", torch.float16))
        self.updated_masks.put(start, prop_masks.reshape(t, h, w)[head : head + count].to("cpu") > 0.5)


def _pre_propagate(frames_of, work_masks, size, nets, settings, dtype, runtime, progress):
    """Long videos: propagate a sparse sample of frames first (reference rule); their results replace those
    input frames (fp16 [3,h,w]) and image masks (bool [h,w]) for the main propagation.

    Returns ``(frame overrides, mask overrides)`` by frame index, both empty when the rule does not apply.
    """
    n = work_masks.shape[0]
    chunk = settings.propagation_chunk
    if not settings.pre_propagation or n <= chunk:
        return {}, {}
    sample_rate = n // (chunk // 2)
    index = list(range(0, n, sample_rate))
    log.info("%s: pre-propagating %d sampled frames (every %d-th)", STAGE, len(index), sample_rate)
    sample_frames = torch.cat([frames_of(i, i + 1) for i in index])
    sample_masks = work_masks[index]
    sample = _FlowGuidedVideo(
        len(index), size, lambda a, b: sample_frames[a:b], sample_masks, lambda a, b: sample_masks[a:b], {}, nets,
        settings, dtype, runtime, progress,
    )
    sample.ensure_propagated(len(index))
    updated, updated_masks = sample.updated.get(0, len(index)), sample.updated_masks.get(0, len(index))
    return ({i: updated[k].clone() for k, i in enumerate(index)},
            {i: updated_masks[k].clone() for k, i in enumerate(index)})


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
        height, width = self.frames.shape[1:3]
        generated = torch.stack([self.pending.pop(i) for i in indices])
        upscaled = resize_frames(generated, (height, width), mode="bicubic")
        hole = resize_masks_nearest(self.work_masks[start:stop], (height, width)) | self.masks[start:stop]
        composite = torch.where(hole.unsqueeze(-1), upscaled, self.frames[start:stop])
        self.written = stop
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


def _transformer(video: _FlowGuidedVideo, work_masks, masks_in_of, writer, nets, settings, dtype, runtime,
                 progress) -> None:
    """Feature propagation + transformer over neighbour windows, composited into ``writer``.

    Each step pulls the propagated frames it reads from ``video``; afterwards everything before the earliest
    frame a later step or a pending chunk can still read is dropped. For a video longer than
    ``subvideo_length`` the reference frames stay within ``ref_stride * (ref_num // 2)`` of the step, so what is
    held does not grow with the video; a shorter video keeps every frame (each step sees all its references).
    """
    n, h, w = video.count, video.h, video.w
    stride = settings.neighbor_length // 2
    ref_num = settings.subvideo_length // settings.ref_stride if n > settings.subvideo_length else -1
    ref_reach = None if ref_num == -1 else settings.ref_stride * (ref_num // 2)
    for f in range(0, n, stride):
        runtime.check_interrupt()
        neighbor_ids = list(range(max(0, f - stride), min(n, f + stride + 1)))
        ref_ids = get_ref_index(f, neighbor_ids, n, settings.ref_stride, ref_num)
        ids = neighbor_ids + ref_ids
        local = len(neighbor_ids)
        pair_ids = ids[: local - 1]
        video.ensure_propagated(max(ids) + 1)
        video.ensure_completed(max(pair_ids, default=-1) + 1)
        runtime.check_interrupt()
        inputs = (
            video.updated.pick(ids),
            torch.cat([masks_in_of(i, i + 1) for i in ids]),
            video.updated_masks.pick(ids),
            (video.flows_f.pick(pair_ids), video.flows_b.pick(pair_ids)),
        )
        pred = None
        for attempt in range(2):
            out_of_memory = False
            try:
                pred = _transformer_step(inputs, local, (h, w), nets, dtype)
            except Exception as exc:  # noqa: BLE001 - only the host's out-of-memory errors are handled
                # One step cannot be split without changing its result: free the cache, retry once, then give up.
                if not runtime.is_oom(exc) or attempt == 1:
                    raise
                out_of_memory = True
            if out_of_memory:
                runtime.empty_cache()
                log.warning("%s: out of memory in the transformer at frame %d; retrying once", STAGE, f)
                continue
            break
        del inputs
        pred = ((pred.to(torch.float32) + 1) / 2 * 255).clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
        hole = work_masks[neighbor_ids].unsqueeze(-1)
        composite = torch.where(hole, pred, video.frames_at(neighbor_ids))
        for k, index in enumerate(neighbor_ids):
            writer.add(index, composite[k])
        # The next step starts at frame f, so everything before f is final.
        writer.flush(f)
        progress.step(1)
        following = f + stride
        # the writer reads the input and work_masks, never these stores
        video.drop_read(first_frame=0 if ref_reach is None else following - max(stride, ref_reach),
                        first_pair=following - stride)
    writer.flush(n, force=True)


def _transformer_step(inputs, local, size, nets, dtype) -> torch.Tensor:
    updated, masks_in, updated_masks, flows = inputs
    h, w = size
    generator = _acquire(nets.generator, dtype, updated.shape[0] * h * w * TRANSFORMER_VALUES_PER_PIXEL * _itemsize(dtype))
    device = next(generator.parameters()).device
    frames = updated.to(device, dtype).unsqueeze(0)
    m_in = _to_device_masks(masks_in, device, dtype)
    m_up = _to_device_masks(updated_masks, device, dtype)
    flows = (flows[0].to(device, dtype).unsqueeze(0), flows[1].to(device, dtype).unsqueeze(0))
    with torch.inference_mode():
        out = generator(frames, flows, m_in, m_up, local)
    return out.reshape(local, 3, h, w).to("cpu")


# ----------------------------------------------------------------------------------------------------------
# Entry point


def _check_inputs(frames: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    is_frames = isinstance(frames, torch.Tensor) and frames.dtype == torch.uint8 and frames.dim() == 4
    if not is_frames or frames.shape[-1] != 3:
        got = f"{tuple(frames.shape)} {frames.dtype}" if isinstance(frames, torch.Tensor) else type(frames).__name__
        raise InputError(f"{STAGE}: frames must be uint8 [T,H,W,3], got {got}")
    if not isinstance(masks, torch.Tensor) or masks.dtype != torch.bool or masks.dim() != 3:
        got = f"{tuple(masks.shape)} {masks.dtype}" if isinstance(masks, torch.Tensor) else type(masks).__name__
        raise InputError(f"{STAGE}: masks must be bool [T,H,W] (True = hole), got {got}")
    if frames.device.type != "cpu" or masks.device.type != "cpu":
        raise InputError(f"{STAGE}: frames and masks must be on the CPU, got {frames.device} and {masks.device}")
    count, height, width = frames.shape[:3]
    if count == 0:
        raise InputError(f"{STAGE}: the video has no frames")
    if masks.shape[0] not in (count, 1):
        raise InputError(
            f"{STAGE}: mask has {masks.shape[0]} frames but the video has {count}; "
            "give one mask per frame or a single mask for all frames"
        )
    if tuple(masks.shape[1:]) != (height, width):
        raise InputError(
            f"{STAGE}: masks are {masks.shape[2]}x{masks.shape[1]} but the frames are {width}x{height}; "
            "resize the masks to the video size first"
        )
    return masks.expand(count, height, width)


def run_propainter_prior(
    frames: torch.Tensor,
    masks: torch.Tensor,
    nets: ProPainterNets,
    settings: Optional[ProPainterSettings] = None,
    runtime=None,
    sink: Optional[PriorSink] = None,
) -> PriorResult:
    """ProPainter prior of a video (reference-spec section 9), streamed through ``runtime``.

    ``frames`` uint8 [T,H,W,3] CPU; ``masks`` bool [T,H,W] or [1,H,W] CPU (True = hole). Returns
    ``PriorResult(frames uint8 [T,H,W,3], masks bool [T,H,W])``: generated content inside the returned
    (dilated) mask, the input's pixels outside it. An empty mask returns the input frames themselves (no copy)
    without touching any network.

    ``sink``: when given, ``sink(start, stop, frames_u8)`` receives the result frames instead, in consecutive
    ranges covering ``[0, T)`` exactly once, in order (at most ``OUTPUT_FLUSH_FRAMES`` frames per call, bit for
    bit the slices of the returned frames without a sink), as they are finished; the call then returns
    ``PriorResult(None, None)`` and never holds an input-size copy of the video. The frames are read-only (with
    an empty mask they are slices of the input). An exception raised by the sink stops the stage.
    """
    if runtime is None:
        from .runtime import StandaloneRuntime

        runtime = StandaloneRuntime()
    settings = settings if settings is not None else ProPainterSettings()
    settings.validate()
    masks = _check_inputs(frames, masks)
    count, height, width = frames.shape[:3]
    if not bool(masks.any()):
        if sink is None:
            return PriorResult(frames=frames, masks=masks.contiguous())
        for start in range(0, count, OUTPUT_FLUSH_FRAMES):
            stop = min(start + OUTPUT_FLUSH_FRAMES, count)
            sink(start, stop, frames[start:stop])
        return PriorResult(frames=None, masks=None)
    h, w = working_size(height, width, settings)
    if min(h, w) < MIN_WORKING_SIDE:
        raise InputError(
            f"{STAGE}: the working size {w}x{h} (from {width}x{height}, resize_ratio {settings.resize_ratio}) is "
            f"below the {MIN_WORKING_SIDE}-pixel minimum of RAFT; use a video at least {MIN_WORKING_SIDE} pixels a side"
        )
    if count == 1:
        # Flow needs a pair: run the frame twice (zero motion) and keep the first result.
        pair_frames, pair_masks = frames.expand(2, height, width, 3), masks.expand(2, height, width)
        if sink is None:
            result = run_propainter_prior(pair_frames, pair_masks, nets, settings, runtime)
            return PriorResult(frames=result.frames[:1].clone(), masks=result.masks[:1].clone())

        def first_frame_only(start: int, stop: int, part: torch.Tensor) -> None:
            if start < 1:
                sink(0, 1, part[: 1 - start])

        run_propainter_prior(pair_frames, pair_masks, nets, settings, runtime, sink=first_frame_only)
        return PriorResult(frames=None, masks=None)

    dtype = settings.compute_dtype or runtime.dtype

    def frames_of(start: int, stop: int) -> torch.Tensor:
        # resized when first needed: the working-size video is never held whole
        return resize_frames(frames[start:stop], (h, w), mode="bicubic")

    # the one whole-video tensor at the working size (bool, 1 byte a pixel): every stage reads it
    work_masks = dilate_cross(resize_masks_nearest(masks, (h, w)), settings.mask_dilation)
    writer = _OutputWriter(frames, masks, work_masks, sink)
    if not bool(work_masks.any()):
        log.info("%s: the mask vanishes at the working size %dx%d; nothing for the networks to fill", STAGE, w, h)
        for start in range(0, count, OUTPUT_FLUSH_FRAMES):
            stop = min(start + OUTPUT_FLUSH_FRAMES, count)
            writer.write_range(start, stop, frames_of(start, stop))
        return writer.finish()

    # progress units: RAFT pairs + completed flows + propagated frames (+ the same for pre-propagation) + steps
    chunk = settings.propagation_chunk
    total = 3 * count - 2 + len(range(0, count, settings.neighbor_length // 2))
    if settings.pre_propagation and count > chunk:
        total += 3 * len(range(0, count, count // (chunk // 2))) - 2
    progress = _Progress(runtime, total)
    log.info("%s: %d frames at %dx%d (input %dx%d), %s", STAGE, count, w, h, width, height, dtype)

    try:
        frame_overrides, mask_overrides = _pre_propagate(
            frames_of, work_masks, (h, w), nets, settings, dtype, runtime, progress
        )

        def masks_in_of(start: int, stop: int) -> torch.Tensor:
            # the image mask: the flow mask, except where pre-propagation already filled frames
            part = work_masks[start:stop]
            replaced = [i for i in mask_overrides if start <= i < stop]
            if replaced:
                part = part.clone()
                for i in replaced:
                    part[i - start] = mask_overrides[i]
            return part

        video = _FlowGuidedVideo(count, (h, w), frames_of, work_masks, masks_in_of, frame_overrides, nets,
                                 settings, dtype, runtime, progress)
        _transformer(video, work_masks, masks_in_of, writer, nets, settings, dtype, runtime, progress)
    finally:
        # Also after a cancel or an error, so the host can offload the networks.
        for handle in (nets.raft, nets.flow_completion, nets.generator):
            handle.release()
    return writer.finish()
