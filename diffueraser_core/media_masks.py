"""Mask files -> bool masks matched to a video's frames, at the mask file's own resolution.

Conventions (True = hole = remove):

* **Alpha first.** A mask file with an alpha channel that is not fully opaque is read from its alpha alone: opaque
  (> 127 of 255) = remove, transparent = keep, whatever the colour (alpha-only masks, and RGBA masks on a white
  transparent background).
* **Otherwise colour, channel-independent.** A pixel is a hole when its brightest channel is above 127 of 255
  (16-bit files: the same level, scaled): white, red, green or blue marks all work, black is kept; for gray masks
  this is the reference's luma threshold. 127 rather than the reference's ``> 0`` because lossy codecs put small
  non-zero values into black areas.
* **Which mask for which frame.** One mask image: every frame. A mask with as many frames as the video: frame by
  frame. A mask *video* with another frame count (another frame rate): matched by time, each video frame taking the
  mask frame shown at its timestamp; the mask must last as long as the video. Any other count is an error.
* **Size.** The mask may have another resolution but must have the video's aspect ratio (within one pixel); it is
  returned at its own size and each stage resizes it once, with nearest, straight to the size it works at. Another
  aspect ratio is an error, not a stretch. Rotated (phone) mask videos are turned upright like the video.
* **Coverage.** An empty mask and a mask that covers most of the frame (more than ``NEARLY_FULL`` on average; an
  inverted mask?) are reported by ``check_mask_coverage``; the CLI warns for the first and refuses the second unless
  told otherwise.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import List, Optional, Union

import numpy as np
import torch

from .clip import ClipInfo
from .errors import InputError
from .masks import same_aspect
from .media_in import IMAGE_SUFFIXES, FrameSequence, decode_video, read_image_array, scan_frame_folder, to_uint8

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

#: 8-bit level above which a mask pixel is a hole (alpha or the brightest colour channel)
MASK_FILE_THRESHOLD = 127
#: average fraction of the frame above which a mask looks inverted
NEARLY_FULL = 0.9
#: timestamps closer than this (seconds) count as the same instant when matching a mask video by time
TIME_TOLERANCE = 1e-3


def mask_from_array(array: np.ndarray) -> torch.Tensor:
    """One mask image (uint8/uint16, gray / RGB / RGBA) -> bool ``[H,W]`` by the conventions above."""
    array = to_uint8(array)
    if array.ndim == 3 and array.shape[2] == 4 and bool((array[:, :, 3] != 255).any()):
        return torch.from_numpy(array[:, :, 3] > MASK_FILE_THRESHOLD)
    if array.ndim == 3:
        array = array[:, :, :3].max(axis=2)
    return torch.from_numpy(np.ascontiguousarray(array > MASK_FILE_THRESHOLD))


def warn_if_guessed(array: np.ndarray, where: str, node: str) -> None:
    """A warning when the convention had to choose: an alpha channel that is used while the colour also draws a
    different shape."""
    array = to_uint8(array)
    if array.ndim != 3 or array.shape[2] != 4 or not bool((array[:, :, 3] != 255).any()):
        return
    by_alpha = array[:, :, 3] > MASK_FILE_THRESHOLD
    by_colour = array[:, :, :3].max(axis=2) > MASK_FILE_THRESHOLD
    if by_colour.any() and not by_colour.all() and (by_colour != by_alpha).any():
        log.warning("%s: mask %s has both an alpha channel and a coloured shape that differ; the alpha is used "
                    "(opaque = remove, transparent = keep, colour ignored)", node, where)


def check_aspect(mask_hw, video_hw, where: str, node: str) -> None:
    mh, mw = int(mask_hw[0]), int(mask_hw[1])
    vh, vw = int(video_hw[0]), int(video_hw[1])
    if not same_aspect((mh, mw), (vh, vw)):
        raise InputError(
            f"{node}: mask {where} is {mw}x{mh} but the video is {vw}x{vh}: another aspect ratio "
            f"({mw / mh:.3f} vs {vw / vh:.3f}); masks are not stretched, give a mask of the video's shape"
        )


def _match_by_time(video: ClipInfo, mask: ClipInfo, node: str) -> List[int]:
    v_times, m_times = video.times(), mask.times()
    if video.times()[-1] > mask.end_time() + TIME_TOLERANCE:
        raise InputError(
            f"{node}: mask '{mask.path}' lasts {mask.end_time():.3f} s ({mask.num_frames} frames at "
            f"{float(mask.fps):g} fps) but the video's last frame is at {v_times[-1]:.3f} s"
        )
    out, j = [], 0
    for t in v_times:
        while j + 1 < len(m_times) and m_times[j + 1] <= t + TIME_TOLERANCE:
            j += 1
        out.append(j)
    return out


def mask_frame_indices(video: ClipInfo, mask: ClipInfo, node: str = "DiffuEraser") -> List[int]:
    """For each video frame, the index of its mask frame (see the module docstring)."""
    n, m = video.num_frames, mask.num_frames
    if m == 1:
        return [0] * n
    if m == n:
        if mask.kind == "video" and video.kind == "video" and mask.fps != video.fps:
            log.info("%s: mask '%s' has the video's %d frames but another frame rate (%g vs %g fps); matched frame "
                     "by frame", node, mask.path, n, float(mask.fps), float(video.fps))
        return list(range(n))
    if mask.kind == "video" and video.kind == "video":
        log.info("%s: mask video '%s' has %d frames at %g fps, the video %d at %g fps; matching them by time",
                 node, mask.path, m, float(mask.fps), n, float(video.fps))
        return _match_by_time(video, mask, node)
    if m > n:
        log.info("%s: mask '%s' has more frames (%d) than the video (%d); the extra masks are ignored", node,
                 mask.path, m, n)
        return list(range(n))
    raise InputError(
        f"{node}: mask '{mask.path}' has {m} frames but the video has {n}; give one mask per frame, a single mask "
        "for all frames, or a mask video covering the video's duration"
    )


def read_masks_for(path: PathLike, video: ClipInfo, node: str = "DiffuEraser") -> torch.Tensor:
    """Mask video / folder / single image -> bool ``[T,h,w]`` for the video's ``T`` frames at the mask's own size."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{node}: mask '{path}' does not exist")
    video_hw = (video.height, video.width)
    if path.is_dir() or path.suffix.lower() in IMAGE_SUFFIXES:
        seq = scan_frame_folder(path, node) if path.is_dir() else FrameSequence([path], None, None)
        info = ClipInfo(path=path, kind="folder", width=0, height=0, pts=list(range(len(seq.files))))
        indices = mask_frame_indices(video, info, node)
        wanted = sorted(set(indices))
        loaded = {}
        for k in wanted:
            hole = mask_from_array(read_image_array(seq.files[k], node))
            if loaded and tuple(hole.shape) != tuple(next(iter(loaded.values())).shape):
                raise InputError(f"{node}: mask '{seq.files[k].name}' has another size than the first mask")
            check_aspect(hole.shape, video_hw, f"'{seq.files[k].name}'", node)
            if not loaded:
                warn_if_guessed(read_image_array(seq.files[k], node), f"'{seq.files[k].name}'", node)
            loaded[k] = hole
        out = torch.stack([loaded[k] for k in indices]) if len(wanted) > 1 else loaded[wanted[0]].unsqueeze(0).expand(
            len(indices), *loaded[wanted[0]].shape)
        return out.contiguous()
    # with alpha the RGBA frames come back as ``original``, else the RGB frames only
    info, frames, original = decode_video(path, node, keep_original=True, mask_mode=True)
    indices = mask_frame_indices(video, info, node)
    source = original if original is not None else frames
    check_aspect(source.shape[1:3], video_hw, f"'{path.name}'", node)
    warn_if_guessed(source[0].numpy(), f"'{path.name}'", node)
    holes = {k: mask_from_array(source[k].numpy()) for k in sorted(set(indices))}
    return torch.stack([holes[k] for k in indices])


def check_mask_coverage(masks: torch.Tensor, where: str, allow_large: bool = False) -> float:
    """The mean fraction of the frame the masks cover; logs an empty mask, refuses a nearly full one (unless
    ``allow_large``, then warns)."""
    covered = float(masks.float().mean()) if masks.numel() else 0.0
    if covered == 0.0:
        log.warning("%s: the mask is empty (no pixel above %d): nothing will be removed and the output is the input",
                    where, MASK_FILE_THRESHOLD)
    elif covered > NEARLY_FULL:
        message = (f"{where}: the mask covers {covered:.0%} of the frame on average; it may be inverted (white or "
                   "opaque = remove)")
        if not allow_large:
            raise InputError(message + "; invert it with --invert-mask, or pass --allow-large-mask if that is meant")
        log.warning(message)
    return covered


def read_masks(path: PathLike, num_frames: int, size, node: str = "DiffuEraser",
               video: Optional[ClipInfo] = None) -> torch.Tensor:
    """Masks for ``num_frames`` frames resized (once, nearest) to ``size`` = ``(h, w)``."""
    from .masks import resize_masks_nearest

    if num_frames < 1:
        raise InputError(f"{node}: masks are needed for at least 1 frame, got num_frames={num_frames}")
    h, w = int(size[0]), int(size[1])
    if video is None:
        video = ClipInfo(path=Path("."), kind="folder", width=w, height=h, pts=list(range(num_frames)))
    return resize_masks_nearest(read_masks_for(path, video, node), (h, w))
