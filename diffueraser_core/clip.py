"""One description of a clip, made by the reader (``media_in``) and followed by the writer (``media_out``).

Everything a removal must not lose travels here: the frame size and the rotation that was undone, each frame's
timestamp, the colour tags, the bit depth, the alpha channel, the audio streams and, for frame folders, each frame's
file name and number. The frames themselves travel separately (``ClipData``): ``frames`` is the 8-bit RGB copy the
networks work on; ``original`` is the full-depth (uint16) and/or RGBA copy when the file holds more than 8-bit RGB,
which the final composite writes into so that untouched pixels keep every bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
import math
from typing import List, Optional, Tuple, Union

import torch

from .errors import InputError

#: frame rate given to image folders / single images, which carry none
DEFAULT_IMAGE_FPS = Fraction(24)


@dataclass
class ColourTags:
    """FFmpeg's colour description of a stream (the AVCOL_* integers; 2 = unspecified for all but range 0)."""

    range: int = 0
    matrix: int = 2
    primaries: int = 2
    transfer: int = 2

    @property
    def tagged(self) -> bool:
        return self.range != 0 or self.matrix != 2 or self.primaries != 2 or self.transfer != 2


@dataclass
class AudioStream:
    """An audio stream of the source file (copied by index from ``ClipInfo.path``)."""

    index: int
    codec: str
    sample_rate: int
    channels: int


@dataclass
class ClipInfo:
    """What a clip is, apart from its pixels. Sizes are of the frames as handed out (upright)."""

    path: Path
    #: "video", "folder" or "image"
    kind: str
    width: int
    height: int
    #: the counter-clockwise rotation (degrees, 0/90/180/270) that was applied to the stored frames to make them
    #: upright (the display matrix of phone videos); the frames handed out are already upright
    rotation: int = 0
    fps: Fraction = DEFAULT_IMAGE_FPS
    fps_from_file: bool = False
    #: per-frame presentation timestamps in ``time_base`` units (variable frame rates and gaps kept)
    time_base: Fraction = field(default_factory=lambda: 1 / DEFAULT_IMAGE_FPS)
    pts: List[int] = field(default_factory=list)
    colour: ColourTags = field(default_factory=ColourTags)
    #: bits per sample of the source (8, 10, 12, 16)
    bit_depth: int = 8
    has_alpha: bool = False
    codec: str = ""
    pix_fmt: str = ""
    audio: List[AudioStream] = field(default_factory=list)
    #: frame folders: each frame's file name, and the numbering pattern (prefix, digits, number, suffix)
    frame_names: List[str] = field(default_factory=list)
    frame_numbers: List[int] = field(default_factory=list)
    name_pattern: Optional[Tuple[str, int, str]] = None

    @property
    def num_frames(self) -> int:
        return len(self.pts)

    @property
    def has_audio(self) -> bool:
        return bool(self.audio)

    def times(self) -> List[float]:
        """Each frame's time in seconds from the first frame."""
        if not self.pts:
            return []
        first = self.pts[0]
        return [float((p - first) * self.time_base) for p in self.pts]

    def end_time(self) -> float:
        """Seconds from the first frame to the end of the last one."""
        times = self.times()
        if not times:
            return 0.0
        last = times[-1] - times[-2] if len(times) > 1 else float(1 / self.fps)
        return times[-1] + max(last, 0.0)


@dataclass
class ClipData:
    """A decoded clip: ``frames`` uint8 ``[T,H,W,3]`` (upright, RGB) for processing; ``original`` the frames at
    their full depth / with alpha (uint16 or uint8 ``[T,H,W,3|4]``), or None when ``frames`` already holds every
    bit (8-bit RGB sources)."""

    frames: torch.Tensor
    info: ClipInfo
    original: Optional[torch.Tensor] = None

    # the older ``VideoData`` names
    @property
    def fps(self) -> Fraction:
        return self.info.fps

    @property
    def has_audio(self) -> bool:
        return self.info.has_audio

    @property
    def path(self) -> Path:
        return self.info.path

    @property
    def fps_from_file(self) -> bool:
        return self.info.fps_from_file


_NTSC_BASES = (24, 30, 48, 60, 120)


def as_fps_fraction(fps: Union[Fraction, int, float], node: str = "DiffuEraser") -> Fraction:
    """An exact frame rate; floats near an NTSC rate (23.976, 29.97, ...) become ``n*1000/1001``."""
    if isinstance(fps, Fraction):
        value = fps
    elif isinstance(fps, int):
        value = Fraction(fps)
    else:
        fps = float(fps)
        if not math.isfinite(fps):
            raise InputError(f"{node}: frame rate must be a positive number, got {fps}")
        value = Fraction(fps).limit_denominator(1001)
        for base in _NTSC_BASES:
            ntsc = Fraction(base * 1000, 1001)
            if abs(fps - float(ntsc)) < 1e-3:
                value = ntsc
    if value <= 0:
        raise InputError(f"{node}: frame rate must be positive, got {fps}")
    return value
