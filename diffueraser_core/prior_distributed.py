"""The ProPainter prior split across Ray workers, with the single-process result bit for bit.

``run_propainter_prior`` pulls its stages through streaming cursors on one machine. Here the driver schedules the
same chunks, on the same grids, as tasks on the workers (``ray_worker.PipelineWorker``; the task bodies are in
``prior_tasks``), and every task runs the very function the single-process cursor runs (``prior_chunks.raft_chunk`` / ``complete_chunk`` /
``propagate_chunk``, ``prior_propainter.transformer_chunk``, ``propagate_sample``) on the same inputs:

* **RAFT** on chunks of ``raft_clip_length - 1`` pairs; the task also returns the chunk's working-size frames,
  which propagation and the transformer's composite read (resizing is per frame, so any batch gives the same).
* **pre-propagation** (long videos): the sampled frames, one task, sent first; its frames and masks replace
  those of the sampled frames in the propagation chunks that hold them.
* **flow completion** on chunks of ``subvideo_length`` pairs, each reading its padded range of RAFT flows.
* **image propagation** on chunks of ``propagation_chunk`` frames, each reading its padded range.
* **transformer steps**, each reading its neighbour and reference frames; the driver merges the composites in
  step order into the same ``_OutputWriter`` (the reference's running average), which hands finished frames to
  the sink in frame order.
* **the input-size composite** of finished frames (a bicubic upscale, ``prior_chunks.composite_prior``): a task
  per flushed range, so the driver does no pixel work beyond the running average. For the diffusion run the same
  task VAE-encodes its composite (``encode_size``), on the ``FRAME_CHUNK`` ranges of ``_PriorLatentSink``, and
  only latents come back.

Intermediates never pass through the driver: a task gets the object references of the chunks it reads as
arguments, so Ray moves them worker to worker (shared memory on one machine) and frees them once no pending task
or driver entry refers to them. The driver submits chunks only as far ahead as ``STEPS_IN_FLIGHT_PER_WORKER``
transformer steps per worker need, so what the cluster holds follows the chunk lengths and the worker count,
not the video length. Each task goes to the worker with the fewest unfinished tasks; a worker runs its tasks in
the order it got them, and a task only reads chunks submitted before it, so nothing waits on a task queued
behind it.

Divergence from the single process, by design: its cursors halve a chunk that runs out of device memory (which
moves chunk boundaries and so changes frames next to them); a chunk on a worker that runs out of memory fails the
run instead, with the worker's error. Lower ``max_side``/``resize_ratio`` or ``subvideo_length`` then.

Ray is never imported here: the caller passes its ``ray`` module.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .masks import dilate_cross, resize_masks_nearest
from .prior_chunks import _OutputWriter, completion_span, propagation_span
from .prior_propainter import (
    OUTPUT_FLUSH_FRAMES,
    STAGE,
    ProPainterSettings,
    _check_inputs,
    checked_working_size,
    image_masks,
    pre_propagation_index,
    progress_units,
    transformer_reach,
    transformer_steps,
)
from .prior_tasks import _numpy, shared_tensor
from .video import FRAME_CHUNK

log = logging.getLogger(__name__)

#: transformer steps submitted ahead of the one being merged, per worker (with the chunks they read): enough to
#: keep every worker busy across a propagation chunk (``propagation_chunk / stride`` steps), few enough that the
#: chunks in flight stay a small multiple of the chunk lengths
STEPS_IN_FLIGHT_PER_WORKER = 12
#: input-size composites (``OUTPUT_FLUSH_FRAMES`` frames each) in flight per worker before the driver takes the
#: oldest: what the driver holds of the result stays a few ranges, whatever the video length
COMPOSITES_IN_FLIGHT_PER_WORKER = 2




@dataclass
class _Chunk:
    """A submitted chunk: its grid start and length, and the references of its outputs."""

    start: int
    count: int
    refs: Tuple


class _Scheduler:
    """Submits tasks to the worker with the fewest unfinished tasks and counts finished progress units."""

    def __init__(self, ray, workers, progress: Callable[[int], None]):
        self.ray, self.workers, self.progress = ray, list(workers), progress
        self.unfinished: List[List] = [[] for _ in self.workers]
        self.tracked: List[Tuple[object, int]] = []  # (a reference of a task, its progress units)

    def _least_busy(self) -> int:
        for k, refs in enumerate(self.unfinished):
            if refs:
                _, self.unfinished[k] = self.ray.wait(refs, num_returns=len(refs), timeout=0)
        return min(range(len(self.workers)), key=lambda k: len(self.unfinished[k]))

    def submit(self, method: str, returns: int, units: int, *args):
        k = self._least_busy()
        call = getattr(self.workers[k], method)
        refs = call.options(num_returns=returns).remote(*args) if returns > 1 else call.remote(*args)
        refs = tuple(refs) if returns > 1 else (refs,)
        self.unfinished[k].append(refs[0])
        if units:
            self.tracked.append((refs[0], units))
        return refs

    def count_finished(self) -> None:
        if not self.tracked:
            return
        refs = [r for r, _ in self.tracked]
        ready, _ = self.ray.wait(refs, num_returns=len(refs), timeout=0)
        ready = set(ready)
        done = [units for r, units in self.tracked if r in ready]
        self.tracked = [(r, units) for r, units in self.tracked if r not in ready]
        if done:
            self.progress(sum(done))


class _ClusterPrior:
    """The driver's bookkeeping for one video: which chunks are submitted, pulled in order as the transformer steps
    need them (the single-process cursors' order), and dropped once no later submission reads them."""

    def __init__(self, scheduler: _Scheduler, frames, work_masks, masks_in_of, sample, size, settings):
        self.scheduler = scheduler
        self.frames, self.work_masks, self.masks_in_of = frames, work_masks, masks_in_of
        self.sample = sample  # (sampled frame indices, reference of the sample's frames) or None
        self.count = int(work_masks.shape[0])
        self.h, self.w = size
        self.settings = settings
        pairs = self.count - 1
        self.raft_grid = max(1, settings.raft_clip_length(max(self.h, self.w)) - 1)
        self.grids = {"raft": (pairs, self.raft_grid), "completion": (pairs, settings.subvideo_length),
                      "propagation": (self.count, settings.propagation_chunk)}
        self.chunks: Dict[str, Dict[int, _Chunk]] = {name: {} for name in self.grids}
        self.submitted = {name: 0 for name in self.grids}  # where each stage's next chunk starts

    # -- which chunks hold what
    def _covering(self, stage: str, first: int, stop: int, extra_row: bool = False) -> List[_Chunk]:
        """The chunks of ``stage`` holding rows ``[first, stop)`` (``extra_row``: RAFT's frames, one more than its
        pairs, so the last frame is in the last chunk)."""
        found = []
        for start in sorted(self.chunks[stage]):
            chunk = self.chunks[stage][start]
            end = chunk.start + chunk.count + (1 if extra_row else 0)
            if chunk.start < stop and end > first:
                found.append(chunk)
        return found

    def _layout(self, wanted):
        """``[(name, stage, output k, first, stop, extra_row)]`` -> (layout, flat references)."""
        layout, refs = [], []
        for name, stage, k, first, stop, extra_row in wanted:
            chunks = self._covering(stage, first, stop, extra_row) if stop > first else []
            layout.append((name, [c.start for c in chunks]))
            refs.extend(c.refs[k] for c in chunks)
        return layout, refs

    # -- submitting, as far as needed
    def _advance(self, stage: str, target: int) -> None:
        length, grid = self.grids[stage]
        while self.submitted[stage] < min(target, length):
            start = self.submitted[stage]
            count = min(grid, length - start)
            self.chunks[stage][start] = _Chunk(start, count, getattr(self, f"_submit_{stage}")(start, count))
            self.submitted[stage] = start + count

    def _submit_raft(self, start, count):
        frames = self.frames[start : start + count + 1].clone().numpy()
        return self.scheduler.submit("prior_raft", 3, count, frames, (self.h, self.w), self.settings)

    def _submit_completion(self, start, count):
        s, e = completion_span(start, count, self.count, self.settings)
        self._advance("raft", e)
        layout, refs = self._layout([("raw_f", "raft", 1, s, e, False), ("raw_b", "raft", 2, s, e, False)])
        meta = dict(span=(s, e), head=start - s, count=count, h=self.h, w=self.w, layout=layout,
                    settings=self.settings, flow_masks=self.work_masks[s : e + 1].clone())
        return self.scheduler.submit("prior_complete", 2, count, meta, *refs)

    def _submit_propagation(self, start, count):
        s, e = propagation_span(start, count, self.count, self.settings)
        self._advance("completion", e - 1)
        self._advance("raft", e - 1)  # the frames of [s, e): RAFT's chunks hold them
        wanted = [("frames", "raft", 0, s, e, True), ("flows_f", "completion", 0, s, e - 1, False),
                  ("flows_b", "completion", 1, s, e - 1, False)]
        layout, refs = self._layout(wanted)
        sample = []
        if self.sample is not None:
            index, sample_ref = self.sample
            sample = [(k, i) for k, i in enumerate(index) if s <= i < e]
            if sample:
                layout.append(("sample_frames", [0]))
                refs.append(sample_ref)
        meta = dict(span=(s, e), head=start - s, count=count, h=self.h, w=self.w, layout=layout, sample=sample,
                    settings=self.settings, masks_in=self.masks_in_of(s, e).clone())
        return self.scheduler.submit("prior_propagate", 2, count, meta, *refs)

    def advance_flows(self, pairs: int) -> None:
        self._advance("completion", pairs)

    def submit_step(self, step):
        self._advance("propagation", max(step.ids) + 1)
        self._advance("completion", max(step.pair_ids, default=-1) + 1)
        ids, pair_ids = step.ids, step.pair_ids
        wanted = [("updated", "propagation", 0, min(ids), max(ids) + 1, False),
                  ("updated_masks", "propagation", 1, min(ids), max(ids) + 1, False),
                  ("flows_f", "completion", 0, min(pair_ids, default=0), max(pair_ids, default=-1) + 1, False),
                  ("flows_b", "completion", 1, min(pair_ids, default=0), max(pair_ids, default=-1) + 1, False),
                  ("frames", "raft", 0, min(step.neighbor_ids), max(step.neighbor_ids) + 1, True)]
        layout, refs = self._layout(wanted)
        meta = dict(step=step, h=self.h, w=self.w, layout=layout, settings=self.settings,
                    masks_in=torch.cat([self.masks_in_of(i, i + 1) for i in ids]),
                    holes=self.work_masks[step.neighbor_ids].clone())
        return self.scheduler.submit("prior_transformer", 1, 0, meta, *refs)[0]  # counted when merged

    def drop_read(self, first_frame: int, first_pair: int) -> None:
        """Forget the chunks no later submission reads (the tasks already given them keep them alive in Ray):
        later steps read propagated frames from ``first_frame``, flows and frames from ``first_pair``; the stages'
        own next chunks read their padding."""
        s = self.settings
        next_propagation = self.submitted["propagation"] - s.propagation_padding
        limits = {
            "propagation": first_frame,
            "completion": min(first_pair, next_propagation),
            "raft": min(first_pair, next_propagation, self.submitted["completion"] - s.flow_completion_padding),
        }
        for stage, low in limits.items():
            extra = 1 if stage == "raft" else 0
            for start in [k for k, c in self.chunks[stage].items() if c.start + c.count + extra <= low]:
                del self.chunks[stage][start]


class _Regroup:
    """What ``_PriorLatentSink`` needs of a runtime, for the regrouping alone: no progress (the latents are
    reported as they come back)."""

    @staticmethod
    def progress(*args) -> None:
        pass


class _ClusterOutputWriter(_OutputWriter):
    """``_OutputWriter`` whose input-size composites (a bicubic upscale of every finished frame: the driver's one
    costly step otherwise) run as tasks on the workers, a few ranges in flight; the results are delivered in
    frame order.

    With ``encode_size`` the tasks also VAE-encode their composite at that size and only the latents come back:
    ``_PriorLatentSink`` itself regroups the finished frames into the ``FRAME_CHUNK`` ranges it encodes (its
    ``_encode`` submits the task instead), so every VAE call sees the single-process batch by construction."""

    def __init__(self, frames, masks, work_masks, sink, ray, scheduler: _Scheduler, in_flight: int,
                 encode_size=None, progress=None):
        from .pipeline import _PriorLatentSink

        self.encoder = None
        if encode_size is not None:
            writer = self

            class Encoder(_PriorLatentSink):
                def _encode(self, start, stop, generated):
                    writer._submit(start, stop, generated, "prior_encode")

            self.encoder = Encoder(int(frames.shape[0]), encode_size, None, _Regroup())
            sink = self.encoder  # it takes the working-size frames: nothing input-size is kept on the driver
        super().__init__(frames, masks, work_masks, sink)
        self.ray, self.scheduler, self.in_flight = ray, scheduler, max(1, int(in_flight))
        self.queue = deque()
        self.encode_size, self.progress = encode_size, progress

    def _composite(self, start, stop, generated):
        if self.encoder is not None:
            self.encoder(start, stop, generated)
        else:
            self._submit(start, stop, generated, "prior_composite")

    def _submit(self, start, stop, generated, method):
        args = [_numpy(generated), self.frames[start:stop].contiguous().numpy(),
                self.masks[start:stop].contiguous().numpy(), self.work_masks[start:stop].contiguous().numpy()]
        if method == "prior_encode":
            args.append(tuple(self.encode_size))
        self.queue.append((start, stop, self.scheduler.submit(method, 1, 0, *args)[0]))
        while len(self.queue) > self.in_flight:
            self._deliver_oldest()

    def _deliver_oldest(self):
        start, stop, ref = self.queue.popleft()
        result = shared_tensor(self.ray.get(ref))
        if self.encoder is not None:
            self.encoder.latent[start:stop] = result
            if self.progress is not None:
                self.progress("encode", stop, int(self.frames.shape[0]))
            return
        hole = None
        if self.sink is None:  # the returned masks: cheap (nearest), so made here rather than shipped back
            hole = resize_masks_nearest(self.work_masks[start:stop], tuple(self.frames.shape[1:3]))
            hole |= self.masks[start:stop]
        self._deliver(start, stop, result, hole)

    def finish(self):
        while self.queue:
            self._deliver_oldest()
        result = super().finish()  # checks that every frame was written
        return self.encoder.result() if self.encoder is not None else result.frames


def run_prior_on_cluster(ray, workers, frames: torch.Tensor, masks: torch.Tensor,
                         settings: Optional[ProPainterSettings] = None, sink=None,
                         progress: Optional[Callable[[str, int, int], None]] = None, encode_size=None):
    """``run_propainter_prior(frames, masks, settings, sink=sink).frames`` computed by ``workers`` (Ray actors of
    ``ray_worker.PipelineWorker``). Returns the uint8 result frames, or None when ``sink`` takes them.

    ``encode_size`` (h, w): return instead the prior's VAE latents at that size, float32 ``[T,4,h/8,w/8]``, bit
    for bit what ``pipeline._PriorLatentSink`` makes of the frames (the workers encode where they composite).
    ``progress(stage, done, total)`` gets the ``prior`` count as chunks finish (and ``encode`` with
    ``encode_size``)."""
    settings = settings if settings is not None else ProPainterSettings()
    settings.validate()
    native = _check_inputs(frames, masks)
    count, height, width = (int(x) for x in frames.shape[:3])
    full_masks = resize_masks_nearest(native, (height, width))
    h, w = checked_working_size(height, width, settings)
    work_masks = None if count == 1 else dilate_cross(resize_masks_nearest(native, (h, w)), settings.mask_dilation)
    if count == 1 or not bool(work_masks.any()):
        # nothing to split (a single frame, or a mask that vanishes at the working size): one worker's whole run
        whole = workers[0].prior_frames.remote(frames.numpy(), native.contiguous().numpy(), settings)
        out = shared_tensor(ray.get(whole))
        if encode_size is not None:
            return _encode_frames_on(ray, workers, out, encode_size, progress)
        if sink is None:
            return out
        for start in range(0, count, OUTPUT_FLUSH_FRAMES):
            sink(start, min(start + OUTPUT_FLUSH_FRAMES, count), out[start : start + OUTPUT_FLUSH_FRAMES])
        return None

    total = progress_units(count, settings)
    done = [0]

    def advance(units: int) -> None:
        done[0] = min(total, done[0] + units)
        if progress is not None:
            progress("prior", done[0], total)

    advance(0)
    scheduler = _Scheduler(ray, workers, advance)
    index = pre_propagation_index(count, settings)
    sample = None
    mask_overrides: Dict[int, torch.Tensor] = {}
    if index:
        log.info("%s: pre-propagating %d sampled frames on the cluster", STAGE, len(index))
        sample_frames, sample_masks = scheduler.submit(
            "prior_sample", 2, 3 * len(index) - 2, frames[index].clone().numpy(), work_masks[index].clone(), (h, w),
            settings,
        )
        sample = (index, sample_frames)

    def masks_in_of(start: int, stop: int) -> torch.Tensor:
        if sample is not None and not mask_overrides:
            # the sampled frames' image masks come from the sample: wait for it when a chunk first needs them
            updated_masks = torch.from_numpy(ray.get(sample_masks).copy())
            mask_overrides.update({i: updated_masks[k] for k, i in enumerate(index)})
        return image_masks(work_masks, mask_overrides, start, stop)

    video = _ClusterPrior(scheduler, frames, work_masks, masks_in_of, sample, (h, w), settings)
    writer = _ClusterOutputWriter(frames, full_masks, work_masks, sink, ray, scheduler,
                                  COMPOSITES_IN_FLIGHT_PER_WORKER * len(workers), encode_size, progress)
    reach = transformer_reach(count, settings)
    in_flight = deque()
    limit = STEPS_IN_FLIGHT_PER_WORKER * len(workers)
    if sample is not None:
        # flows do not depend on the sample: give the workers RAFT and flow completion to do while it runs
        video.advance_flows(limit * (settings.neighbor_length // 2))

    def merge_oldest() -> None:
        step, ref = in_flight.popleft()
        composite = shared_tensor(ray.get(ref))
        for k, i in enumerate(step.neighbor_ids):
            writer.add(i, composite[k])
        writer.flush(step.frame)  # as the single process: the next step starts at this one's frame
        advance(1)
        scheduler.count_finished()

    for step in transformer_steps(count, settings):
        in_flight.append((step, video.submit_step(step)))
        video.drop_read(first_frame=0 if reach is None else step.next_frame - reach, first_pair=step.frame)
        while len(in_flight) > limit:
            merge_oldest()
    while in_flight:
        merge_oldest()
    writer.flush(count, force=True)
    return writer.finish()


def _encode_frames_on(ray, workers, frames, size, progress):
    """VAE latents of whole prior frames in ``FRAME_CHUNK`` ranges, a range per task round robin (the few-frame
    cases that are not split)."""
    num = int(frames.shape[0])
    ranges = [(a, min(a + FRAME_CHUNK, num)) for a in range(0, num, FRAME_CHUNK)]
    refs = [workers[k % len(workers)].encode_frames.remote(frames[a:b].clone(), tuple(size))
            for k, (a, b) in enumerate(ranges)]
    latent = torch.empty((num, 4, int(size[0]) // 8, int(size[1]) // 8), dtype=torch.float32)
    for (a, b), ref in zip(ranges, refs):
        latent[a:b] = shared_tensor(ray.get(ref))
        if progress is not None:
            progress("encode", b, num)
    return latent
