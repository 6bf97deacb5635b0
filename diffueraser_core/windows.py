"""Staggered frame windows and how their results are merged (reference section 5).

The motion UNet sees ``length`` frames at a time (22 in DiffuEraser, its training clip length). Each denoising
step walks the video in overlapping windows and merges the windows' results into one latent per frame. Two window
lists alternate between steps so the seams of one step fall inside the windows of the next:

* list A (even steps): ``[k, k+length)`` for ``k = 0, stride, 2*stride, ...`` while ``k < n - length``, then the
  tail ``[n-length, n)``;
* list B (odd steps): ``[0, length)``, then ``k = length//2, length//2 + stride, ...`` while ``k < n - length``,
  then the tail ``[n-length, n)`` (list A's windows shifted by half a window);

with ``overlap = length // 4`` (5) and ``stride = length - overlap`` (17). A video of at most ``length`` frames is
one window ``[0, n)`` on every step (down to a single frame).

Merging (``WindowAccumulator``): windows are added in list order. The frames of a new window that earlier windows
already produced are always a prefix of length ``m`` of the window; there the result is a linear crossfade
``old*(1-r_q) + new*r_q`` with ``r = linspace(0, 1, m+2)[1:-1]``; the rest of the window is written as is.

Quirks, decided here:

* List B's tail uses a loop variable that, when list B's own loop is empty, still holds list A's last start.
  In every case that variable is ``< n - length``, so the reference always appends the tail and every frame is
  covered on every step; ``window_lists`` simply always appends it (identical lists). A window that would repeat
  the first one (``length == 1``, where ``length//2 == 0``) is skipped instead of being run twice.
* The reference blends the overlap and then overwrites the window from the last overlapped frame on with the new
  result, so that frame takes weight 1 instead of ``m/(m+1)``. ``overwrite_last_overlap=True`` (default)
  reproduces this for results identical to the reference; ``False`` blends the whole overlap.
* With ``overlap = 0`` the reference would fail on a window with no covered prefix; here such a window is written.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from .errors import InputError

#: frames per window: DiffuEraser's training clip length (``nframes``)
DEFAULT_WINDOW_LENGTH = 22
# motion_max_seq_length of the official unet_main: the temporal attention's positional table has 32 entries,
# so no window can be longer.
MAX_WINDOW_LENGTH = 32
#: default overlap = length // OVERLAP_DIVISOR (22 // 4 = 5 in the reference)
OVERLAP_DIVISOR = 4

Window = Tuple[int, int]


def default_overlap(length: int) -> int:
    return length // OVERLAP_DIVISOR


def _check(num_frames: int, length: int, overlap: Optional[int]) -> Tuple[int, int, int]:
    if int(num_frames) != num_frames or num_frames < 1:
        raise InputError(f"Frame windows: the video needs at least 1 frame, got {num_frames}")
    if int(length) != length or length < 1:
        raise InputError(f"Frame windows: window length must be an integer >= 1, got {length}")
    if overlap is None:
        overlap = default_overlap(int(length))
    if int(overlap) != overlap or not 0 <= overlap < length:
        raise InputError(
            f"Frame windows: overlap must be an integer in 0..{int(length) - 1} (window length {length}), got {overlap}"
        )
    return int(num_frames), int(length), int(overlap)


def window_lists(
    num_frames: int, length: int = DEFAULT_WINDOW_LENGTH, overlap: Optional[int] = None
) -> Tuple[List[Window], List[Window]]:
    """Window lists A and B as ``(start, stop)`` pairs (stop exclusive); see the module docstring."""
    n, length, overlap = _check(num_frames, length, overlap)
    if n <= length:
        return [(0, n)], [(0, n)]
    stride = length - overlap
    last_start = n - length
    list_a = [(k, k + length) for k in range(0, last_start, stride)]
    list_b = [(0, length)] + [(k, k + length) for k in range(length // 2, last_start, stride) if k > 0]
    # Both loops stop before last_start, so the tail always adds frames (the reference always appends it too).
    list_a.append((last_start, n))
    list_b.append((last_start, n))
    return list_a, list_b


def windows_for_step(
    step: int, num_frames: int, length: int = DEFAULT_WINDOW_LENGTH, overlap: Optional[int] = None
) -> List[Window]:
    """The windows of denoising step ``step`` (0-based): list A on even steps, list B on odd steps."""
    list_a, list_b = window_lists(num_frames, length, overlap)
    return list_a if step % 2 == 0 else list_b


def crossfade_weights(overlap_frames: int, overwrite_last_overlap: bool = True) -> torch.Tensor:
    """Weights of the NEW window on its ``m`` already-covered leading frames (float32 ``[m]``).

    ``linspace(0, 1, m+2)[1:-1]``; with ``overwrite_last_overlap`` (reference) the last one is 1.
    """
    m = int(overlap_frames)
    if m <= 0:
        return torch.zeros(0, dtype=torch.float32)
    ratio = torch.linspace(0, 1, m + 2, dtype=torch.float32)[1:-1].clone()
    if overwrite_last_overlap:
        ratio[-1] = 1.0
    return ratio


class WindowAccumulator:
    """Merges the per-window results of one denoising step into one tensor per frame (kept on the CPU).

    ``add(start, stop, latents)`` in list order, then ``result()``. Storage is allocated on the first ``add``
    with the window's per-frame shape, in ``dtype`` (default: the first window's dtype).
    """

    def __init__(
        self,
        num_frames: int,
        overwrite_last_overlap: bool = True,
        dtype: Optional[torch.dtype] = None,
        device: torch.device | str = "cpu",
    ):
        if int(num_frames) != num_frames or num_frames < 1:
            raise InputError(f"Frame windows: the video needs at least 1 frame, got {num_frames}")
        self.num_frames = int(num_frames)
        self.overwrite_last_overlap = overwrite_last_overlap
        self.dtype = dtype
        self.device = torch.device(device)
        self.value: Optional[torch.Tensor] = None
        self.covered = torch.zeros(self.num_frames, dtype=torch.bool)

    def add(self, start: int, stop: int, latents: torch.Tensor) -> None:
        if not 0 <= start < stop <= self.num_frames:
            raise InputError(
                f"Frame windows: window [{start}, {stop}) is outside the video of {self.num_frames} frames"
            )
        if latents.shape[0] != stop - start:
            raise InputError(
                f"Frame windows: window [{start}, {stop}) has {stop - start} frames but got {latents.shape[0]} results"
            )
        if self.value is None:
            dtype = self.dtype or latents.dtype
            self.value = torch.zeros((self.num_frames, *latents.shape[1:]), dtype=dtype, device=self.device)
        new = latents.to(device=self.device, dtype=self.value.dtype)
        covered = self.covered[start:stop]
        m = int(covered.sum())
        if m and not bool(covered[:m].all()):
            raise InputError(
                f"Frame windows: window [{start}, {stop}) overlaps earlier windows outside its leading frames; "
                "add windows in list order"
            )
        # frames [start, start+blended) are crossfaded, the rest of the window is written as is
        blended = m - 1 if (m and self.overwrite_last_overlap) else m
        if blended:
            ratio = crossfade_weights(m, self.overwrite_last_overlap)[:blended]
            shape = (blended, *([1] * (new.dim() - 1)))
            keep = (1 - ratio).to(self.value.dtype).view(shape)
            take = ratio.to(self.value.dtype).view(shape)
            old = self.value[start : start + blended]
            self.value[start : start + blended] = old * keep + new[:blended] * take
        self.value[start + blended : stop] = new[blended:]
        self.covered[start:stop] = True

    def result(self) -> torch.Tensor:
        if self.value is None or not bool(self.covered.all()):
            missing = int((~self.covered).sum())
            raise InputError(f"Frame windows: {missing} of {self.num_frames} frames were not covered by any window")
        return self.value
