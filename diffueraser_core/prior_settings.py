"""The ProPainter prior's settings, reference constants, working size and reference-frame rule.

The lowest layer of the prior: ``prior_chunks`` (the chunk stores and cursors) and ``prior_propainter`` (the
stages) both read these. See ``prior_propainter`` for what the prior does and where it differs from the reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch

from .errors import InputError

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
# Frames per flow-completion / transformer sub-video. DiffuEraser's run_diffueraser passes 50 to the prior, and
# that changes pre-propagation, the transformer's reference frames and the chunking of every video over 50
# frames, so 50 is the default wherever the prior feeds DiffuEraser (the core, the CLI, the node). ProPainter's
# own forward (and sczhou/ProPainter) defaults to 80: set it to get ProPainter-alone results.
DEFAULT_SUBVIDEO_LENGTH = 50
PROPAINTER_ALONE_SUBVIDEO_LENGTH = 80
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
    """Every parameter of the reference prior, with the reference default (ProPainter's forward defaults, except
    ``subvideo_length``: run_diffueraser's 50, see ``DEFAULT_SUBVIDEO_LENGTH``).

    ``mask_dilation``: iterations of the cross-shaped dilation for both the flow mask and the image mask (the
    forward's default is 4; run_diffueraser passes ``RUN_DIFFUERASER_MASK_DILATION`` = 8).
    ``raft_clip_lengths``: ``(max longer side, frames per RAFT call)`` rows, first match wins, else
    ``raft_clip_length_largest``. ``pre_propagation``: the reference always pre-propagates sampled frames when
    the video is longer than ``min(propagation_chunk_cap, subvideo_length)``; False skips it.
    ``compute_dtype``: None = the runtime's (fp16 on CUDA by default, fp32 on CPU); RAFT always runs in fp32.
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


def working_size(height: int, width: int, settings: ProPainterSettings) -> Tuple[int, int]:
    """The reference's processing size ``(h, w)``: ratio (reduced so the longer side <= max_side), int(), /8 down.

    The reduced ratio is ``resize_ratio * (max_side / longer)`` in double precision, in that order, as the
    reference: ``0.6 * 960 / longer`` rounds differently and moves the grid by 8 pixels for ~18% of sizes above
    960 (1280x960 -> 576x424 in the reference, 576x432 the other way).

    Documented fallback: when that would make the shorter side smaller than RAFT's 64-pixel minimum (small
    clips at ratio 0.6), the ratio is raised just enough to keep 64 pixels, up to the input size itself.
    """
    ratio = settings.resize_ratio
    longer, shorter = max(height, width), min(height, width)
    if longer > settings.max_side:
        ratio = ratio * (settings.max_side / longer)
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
