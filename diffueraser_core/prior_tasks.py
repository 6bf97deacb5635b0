"""The worker side of the split prior (``prior_distributed``): each task rebuilds its inputs from the chunks it was
given (object references that Ray resolved to arrays) and runs the single-process chunk function on them.
Results go back as numpy arrays, which workers on the same machine read without a copy."""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch

from .prior_settings import STAGE
from .video import resize_frames


def shared_tensor(array) -> torch.Tensor:
    """A tensor over a numpy array from Ray's object store without copying it (on the same machine the array is
    shared memory, read-only: readers never write to it); tensors pass through."""
    import warnings

    if isinstance(array, torch.Tensor):
        return array
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "The given NumPy array is not writable"
        return torch.from_numpy(array)


def _numpy(t: torch.Tensor):
    # numpy results are read without a copy by workers on the same machine (Ray's shared-memory object store)
    return t.contiguous().numpy()


def _groups(layout: Sequence[Tuple[str, Sequence[int]]], parts) -> Dict[str, List[Tuple[int, torch.Tensor]]]:
    """``parts`` (the chunks a task got, flat, in ``layout`` order) -> by name, ``(first index, rows)`` each."""
    out, k = {}, 0
    for name, starts in layout:
        out[name] = [(int(s), shared_tensor(parts[k + i])) for i, s in enumerate(starts)]
        k += len(starts)
    if k != len(parts):
        raise RuntimeError(f"{STAGE}: internal error, a task got {len(parts)} chunks for a layout of {k}")
    return out


def _pick(chunks: List[Tuple[int, torch.Tensor]], ids, shape: Tuple[int, ...], dtype) -> torch.Tensor:
    """Rows ``ids`` from chunks given as ``(first index, rows)``; always a new tensor (never the shared input)."""
    found = []
    for i in ids:
        for start, rows in chunks:
            if start <= i < start + rows.shape[0]:
                found.append(rows[i - start])
                break
        else:
            raise RuntimeError(f"{STAGE}: internal error, row {i} is in none of the chunks {[s for s, _ in chunks]}")
    return torch.stack(found) if found else torch.empty((0, *shape), dtype=dtype)


def raft_task(nets, frames_in, size, settings):
    """A RAFT chunk from its input-size frames: (working-size uint8 frames, forward, backward fp16 flows)."""
    from .prior_chunks import raft_chunk

    frames = resize_frames(shared_tensor(frames_in), size, mode="bicubic")
    forward, backward = raft_chunk(nets, frames, settings)
    return _numpy(frames), _numpy(forward), _numpy(backward)


def sample_task(nets, frames_in, masks, size, settings, dtype, runtime):
    """Pre-propagation of the sampled input-size frames with their working-size dilated masks."""
    from .prior_chunks import _Progress
    from .prior_propainter import propagate_sample

    frames = resize_frames(shared_tensor(frames_in), size, mode="bicubic")
    masks = shared_tensor(masks)
    progress = _Progress(runtime, max(1, 3 * int(frames.shape[0]) - 2))
    updated, updated_masks = propagate_sample(frames, masks, size, nets, settings, dtype, runtime, progress)
    return _numpy(updated), _numpy(updated_masks)


def complete_task(nets, meta, parts, dtype):
    from .prior_chunks import complete_chunk

    (s, e), head, count, h, w = meta["span"], meta["head"], meta["count"], meta["h"], meta["w"]
    got = _groups(meta["layout"], parts)
    pairs = range(s, e)
    raw_f = _pick(got["raw_f"], pairs, (2, h, w), torch.float16)
    raw_b = _pick(got["raw_b"], pairs, (2, h, w), torch.float16)
    forward, backward = complete_chunk(nets, raw_f, raw_b, shared_tensor(meta["flow_masks"]), head, count, dtype)
    return _numpy(forward), _numpy(backward)


def propagate_task(nets, meta, parts, dtype):
    from .prior_chunks import propagate_chunk

    (s, e), head, count, h, w = meta["span"], meta["head"], meta["count"], meta["h"], meta["w"]
    got = _groups(meta["layout"], parts)
    frames = _pick(got["frames"], range(s, e), (h, w, 3), torch.uint8)
    flows = (_pick(got["flows_f"], range(s, e - 1), (2, h, w), torch.float16),
             _pick(got["flows_b"], range(s, e - 1), (2, h, w), torch.float16))
    overrides = {}
    if meta["sample"]:
        sample_frames = got["sample_frames"][0][1]
        overrides = {i - s: sample_frames[k].clone() for k, i in meta["sample"]}
    updated, updated_masks = propagate_chunk(nets, frames, overrides, shared_tensor(meta["masks_in"]), flows, head,
                                             count, dtype)
    return _numpy(updated), _numpy(updated_masks)


def transformer_task(nets, meta, parts, dtype, runtime):
    from .prior_propainter import transformer_chunk

    step, h, w = meta["step"], meta["h"], meta["w"]
    got = _groups(meta["layout"], parts)
    inputs = (
        _pick(got["updated"], step.ids, (3, h, w), torch.float16),
        shared_tensor(meta["masks_in"]).clone(),
        _pick(got["updated_masks"], step.ids, (h, w), torch.bool),
        (_pick(got["flows_f"], step.pair_ids, (2, h, w), torch.float16),
         _pick(got["flows_b"], step.pair_ids, (2, h, w), torch.float16)),
    )
    frames = _pick(got["frames"], step.neighbor_ids, (h, w, 3), torch.uint8)
    composite = transformer_chunk(inputs, step, (h, w), nets, dtype, runtime, shared_tensor(meta["holes"]), frames)
    return _numpy(composite)


def composite_task(generated, frames, masks, work_masks, codec=None, encode_size=None):
    """The input-size composite of finished frames (``prior_chunks.composite_prior``): uint8 ``[t,H,W,3]``; with
    ``encode_size``, its VAE latents at that size instead (``_PriorLatentSink``'s computation on one of its
    ``FRAME_CHUNK`` ranges), so the composite never travels."""
    from .prior_chunks import composite_prior

    composite, _ = composite_prior(shared_tensor(generated), shared_tensor(frames), shared_tensor(masks),
                                   shared_tensor(work_masks))
    if encode_size is None:
        return _numpy(composite)
    return _numpy(codec.encode(resize_frames(composite, tuple(encode_size))))
