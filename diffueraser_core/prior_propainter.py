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
the input size instead of being written at the unrounded 0.6x size; transformer outputs are quantised in fp16
in fp16 runs as the reference, in fp32 otherwise (``quantise_output``), clamped to 0..255 before the uint8
truncation (numpy's cast of out-of-range floats is undefined); flows and propagated frames are
stored in fp16 between stages also when computing in fp32 (the reference keeps fp32 on the CPU, fp16 on GPU);
a 1-frame video runs as the frame repeated twice (the reference cannot compute flow for it).

Modules: ``prior_settings`` (settings, constants, working size), ``prior_chunks`` (chunk stores, cursors, the
flow-guided video, the output writer) and this one (loading the networks, pre-propagation, the transformer
steps, ``run_propainter_prior``). The public names stay importable from here.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import List, Optional

import torch

from .errors import InputError
from .masks import dilate_cross, resize_masks_nearest, same_aspect
from .prior_chunks import (  # noqa: F401  (re-exported for callers and tests)
    _acquire,
    _ChunkCursor,
    _FlowGuidedVideo,
    _itemsize,
    _OutputWriter,
    _PerFrame,
    _Progress,
    _to_device_frames,
    _to_device_masks,
)
from .prior_settings import (  # noqa: F401  (the settings API lives there; re-exported here)
    COMPLETION_VALUES_PER_PIXEL,
    DEFAULT_MASK_DILATION,
    DEFAULT_NEIGHBOR_LENGTH,
    DEFAULT_RAFT_ITER,
    DEFAULT_REF_STRIDE,
    DEFAULT_RESIZE_RATIO,
    DEFAULT_SUBVIDEO_LENGTH,
    FLOW_COMPLETION_FILE,
    FLOW_COMPLETION_PADDING,
    GENERATOR_FILE,
    MAX_SIDE_THRESH,
    MIN_WORKING_SIDE,
    OUTPUT_FLUSH_FRAMES,
    PROGRESS_STAGE,
    PROPAGATION_CHUNK_CAP,
    PROPAGATION_INTERPOLATION,
    PROPAGATION_PADDING,
    PROPAGATION_VALUES_PER_PIXEL,
    PROPAINTER_ALONE_SUBVIDEO_LENGTH,
    RAFT_CLIP_LENGTHS,
    RAFT_CLIP_LENGTH_LARGEST,
    RAFT_FILE,
    RAFT_VALUES_PER_PIXEL,
    RUN_DIFFUERASER_MASK_DILATION,
    SIZE_MULTIPLE,
    STAGE,
    TRANSFORMER_VALUES_PER_PIXEL,
    PriorResult,
    PriorSink,
    ProPainterNets,
    ProPainterSettings,
    get_ref_index,
    working_size,
)
from .video import resize_frames

log = logging.getLogger(__name__)


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


def pre_propagation_index(n: int, settings: ProPainterSettings) -> List[int]:
    """The frames long videos pre-propagate (every ``n // (chunk // 2)``-th, reference rule); empty when the rule
    does not apply (a video within one propagation chunk, or ``pre_propagation`` off)."""
    chunk = settings.propagation_chunk
    if not settings.pre_propagation or n <= chunk:
        return []
    return list(range(0, n, n // (chunk // 2)))


def propagate_sample(sample_frames, sample_masks, size, nets, settings, dtype, runtime, progress):
    """Flow-guided propagation of the sampled working-size frames (uint8 ``[k,h,w,3]``, dilated masks bool
    ``[k,h,w]``) as a video of their own: fp16 ``[k,3,h,w]`` frames and bool ``[k,h,w]`` masks."""
    k = int(sample_frames.shape[0])
    sample = _FlowGuidedVideo(
        k, size, lambda a, b: sample_frames[a:b], sample_masks, lambda a, b: sample_masks[a:b], {}, nets,
        settings, dtype, runtime, progress,
    )
    sample.ensure_propagated(k)
    return sample.updated.get(0, k), sample.updated_masks.get(0, k)


def _pre_propagate(frames_of, work_masks, size, nets, settings, dtype, runtime, progress):
    """Long videos: propagate a sparse sample of frames first (reference rule); their results replace those
    input frames (fp16 [3,h,w]) and image masks (bool [h,w]) for the main propagation.

    Returns ``(frame overrides, mask overrides)`` by frame index, both empty when the rule does not apply.
    """
    index = pre_propagation_index(int(work_masks.shape[0]), settings)
    if not index:
        return {}, {}
    log.info("%s: pre-propagating %d sampled frames (every %d-th)", STAGE, len(index),
             index[1] - index[0] if len(index) > 1 else len(work_masks))
    sample_frames = torch.cat([frames_of(i, i + 1) for i in index])
    updated, updated_masks = propagate_sample(sample_frames, work_masks[index], size, nets, settings, dtype, runtime,
                                              progress)
    return ({i: updated[k].clone() for k, i in enumerate(index)},
            {i: updated_masks[k].clone() for k, i in enumerate(index)})


def image_masks(work_masks, mask_overrides, start: int, stop: int) -> torch.Tensor:
    """The image masks of frames ``[start, stop)``: the flow (dilated) masks, except for frames pre-propagation
    already filled (``mask_overrides``: bool ``[h,w]`` by frame index)."""
    part = work_masks[start:stop]
    replaced = [i for i in mask_overrides if start <= i < stop]
    if replaced:
        part = part.clone()
        for i in replaced:
            part[i - start] = mask_overrides[i]
    return part


@dataclass(frozen=True)
class TransformerStep:
    """One transformer step: it fills ``neighbor_ids`` (consecutive frames around ``frame``), also reading
    ``ref_ids`` and the flow pairs ``pair_ids`` between neighbours; ``next_frame`` is where the next step starts."""

    frame: int
    neighbor_ids: List[int]
    ref_ids: List[int]
    next_frame: int

    @property
    def ids(self) -> List[int]:
        return self.neighbor_ids + self.ref_ids

    @property
    def pair_ids(self) -> List[int]:
        return self.neighbor_ids[:-1]


def transformer_steps(n: int, settings: ProPainterSettings) -> List[TransformerStep]:
    """The reference's steps over ``n`` frames: every ``neighbor_length // 2`` frames, with its neighbours and
    reference frames (all of them for a video within ``subvideo_length``)."""
    stride = settings.neighbor_length // 2
    ref_num = settings.subvideo_length // settings.ref_stride if n > settings.subvideo_length else -1
    steps = []
    for f in range(0, n, stride):
        neighbor_ids = list(range(max(0, f - stride), min(n, f + stride + 1)))
        steps.append(TransformerStep(f, neighbor_ids, get_ref_index(f, neighbor_ids, n, settings.ref_stride, ref_num),
                                     f + stride))
    return steps


def transformer_reach(n: int, settings: ProPainterSettings) -> Optional[int]:
    """How far before a step its reference frames reach (None: a video within ``subvideo_length`` reads every
    frame at every step); what is held for later steps follows from it."""
    if n <= settings.subvideo_length:
        return None
    stride = settings.neighbor_length // 2
    return max(stride, settings.ref_stride * ((settings.subvideo_length // settings.ref_stride) // 2))


def _transformer(video: _FlowGuidedVideo, work_masks, masks_in_of, writer, nets, settings, dtype, runtime,
                 progress) -> None:
    """Feature propagation + transformer over neighbour windows, composited into ``writer``.

    Each step pulls the propagated frames it reads from ``video``; afterwards everything before the earliest
    frame a later step or a pending chunk can still read is dropped. For a video longer than
    ``subvideo_length`` the reference frames stay within ``ref_stride * (ref_num // 2)`` of the step, so what is
    held does not grow with the video; a shorter video keeps every frame (each step sees all its references).
    """
    n, h, w = video.count, video.h, video.w
    reach = transformer_reach(n, settings)
    for step in transformer_steps(n, settings):
        runtime.check_interrupt()
        video.ensure_propagated(max(step.ids) + 1)
        video.ensure_completed(max(step.pair_ids, default=-1) + 1)
        runtime.check_interrupt()
        inputs = (
            video.updated.pick(step.ids),
            torch.cat([masks_in_of(i, i + 1) for i in step.ids]),
            video.updated_masks.pick(step.ids),
            (video.flows_f.pick(step.pair_ids), video.flows_b.pick(step.pair_ids)),
        )
        composite = transformer_chunk(inputs, step, (h, w), nets, dtype, runtime, work_masks[step.neighbor_ids],
                                      video.frames_at(step.neighbor_ids))
        del inputs
        for k, index in enumerate(step.neighbor_ids):
            writer.add(index, composite[k])
        # The next step starts at frame f, so everything before f is final.
        writer.flush(step.frame)
        progress.step(1)
        # the writer reads the input and work_masks, never these stores
        video.drop_read(first_frame=0 if reach is None else step.next_frame - reach, first_pair=step.frame)
    writer.flush(n, force=True)


def transformer_chunk(inputs, step: TransformerStep, size, nets, dtype, runtime, holes, frames_u8) -> torch.Tensor:
    """One step's transformer on its inputs (propagated frames, image masks, their masks after propagation, the
    neighbours' flows), quantised and composited over the working-size neighbour frames ``frames_u8`` inside
    ``holes``: uint8 ``[len(neighbor_ids),h,w,3]``.

    Out of memory: one step cannot be split without changing its result, so the cache is freed and the step
    retried once, then the error is raised.
    """
    pred = None
    for attempt in range(2):
        out_of_memory = False
        try:
            pred = _transformer_step(inputs, len(step.neighbor_ids), size, nets, dtype)
        except Exception as exc:  # noqa: BLE001 - only the host's out-of-memory errors are handled
            if not runtime.is_oom(exc) or attempt == 1:
                raise
            out_of_memory = True
        if out_of_memory:
            runtime.empty_cache()
            log.warning("%s: out of memory in the transformer at frame %d; retrying once", STAGE, step.frame)
            continue
        break
    pred = quantise_output(pred, dtype).permute(0, 2, 3, 1)
    return torch.where(holes.unsqueeze(-1), pred, frames_u8)


def quantise_output(pred: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The transformer's [-1, 1] output -> uint8 as the reference: ``(x + 1) / 2`` then ``* 255``, truncated.

    In an fp16 run every step is rounded to fp16, as the reference computes it (``(x + 1) / 2`` on the GPU in
    fp16, then numpy's fp16 ``* 255``); otherwise (fp32, and bf16, which the reference never runs) in fp32.
    Clamped to 0..255 before the truncation (numpy's cast of out-of-range values is undefined).
    """
    work = torch.float16 if dtype == torch.float16 else torch.float32
    x = (pred.to(work) + 1) / 2
    x = x * 255
    return x.clamp_(0, 255).to(torch.uint8)


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
    if tuple(masks.shape[1:]) != (height, width) and not same_aspect(tuple(masks.shape[1:]), (height, width)):
        raise InputError(
            f"{STAGE}: masks are {masks.shape[2]}x{masks.shape[1]} but the frames are {width}x{height}: another "
            "aspect ratio; masks are not stretched"
        )
    # a mask of another resolution stays at its size: resized once to each size the stage works at
    return masks.expand(count, *masks.shape[1:])


def checked_working_size(height: int, width: int, settings: ProPainterSettings):
    """The prior's working size ``(h, w)``, or an error naming the sizes when RAFT cannot run at it."""
    h, w = working_size(height, width, settings)
    if min(h, w) < MIN_WORKING_SIDE:
        raise InputError(
            f"{STAGE}: the working size {w}x{h} (from {width}x{height}, resize_ratio {settings.resize_ratio}) is "
            f"below the {MIN_WORKING_SIDE}-pixel minimum of RAFT; use a video at least {MIN_WORKING_SIDE} pixels a side"
        )
    return h, w


def progress_units(count: int, settings: ProPainterSettings) -> int:
    """The prior's progress units: RAFT pairs + completed flows + propagated frames (+ the same for the
    pre-propagated sample) + transformer steps."""
    sample = len(pre_propagation_index(count, settings))
    return 3 * count - 2 + len(range(0, count, settings.neighbor_length // 2)) + (3 * sample - 2 if sample else 0)


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
    native = _check_inputs(frames, masks)
    count, height, width = frames.shape[:3]
    masks = resize_masks_nearest(native, (height, width))  # the composite's size (no copy when it is the same)
    if not bool(masks.any()):
        if sink is None:
            return PriorResult(frames=frames, masks=masks.contiguous())
        for start in range(0, count, OUTPUT_FLUSH_FRAMES):
            stop = min(start + OUTPUT_FLUSH_FRAMES, count)
            sink(start, stop, frames[start:stop])
        return PriorResult(frames=None, masks=None)
    h, w = checked_working_size(height, width, settings)
    if count == 1:
        # Flow needs a pair: run the frame twice (zero motion) and keep the first result.
        pair_frames, pair_masks = frames.expand(2, height, width, 3), native.expand(2, *native.shape[1:])
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
    work_masks = dilate_cross(resize_masks_nearest(native, (h, w)), settings.mask_dilation)
    writer = _OutputWriter(frames, masks, work_masks, sink)
    if not bool(work_masks.any()):
        log.info("%s: the mask vanishes at the working size %dx%d; nothing for the networks to fill", STAGE, w, h)
        for start in range(0, count, OUTPUT_FLUSH_FRAMES):
            stop = min(start + OUTPUT_FLUSH_FRAMES, count)
            writer.write_range(start, stop, frames_of(start, stop))
        return writer.finish()

    # progress units: RAFT pairs + completed flows + propagated frames (+ the same for pre-propagation) + steps
    progress = _Progress(runtime, progress_units(count, settings))
    log.info("%s: %d frames at %dx%d (input %dx%d), %s", STAGE, count, w, h, width, height, dtype)

    try:
        frame_overrides, mask_overrides = _pre_propagate(
            frames_of, work_masks, (h, w), nets, settings, dtype, runtime, progress
        )

        def masks_in_of(start: int, stop: int) -> torch.Tensor:
            return image_masks(work_masks, mask_overrides, start, stop)

        video = _FlowGuidedVideo(count, (h, w), frames_of, work_masks, masks_in_of, frame_overrides, nets,
                                 settings, dtype, runtime, progress)
        _transformer(video, work_masks, masks_in_of, writer, nets, settings, dtype, runtime, progress)
    finally:
        # Also after a cancel or an error, so the host can offload the networks.
        for handle in (nets.raft, nets.flow_completion, nets.generator):
            handle.release()
    return writer.finish()
