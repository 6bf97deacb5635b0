"""Media out: checks the output target before anything is read, then writes a clip the way ``ClipInfo`` describes it.

Targets: ``.mp4``/``.m4v``/``.mov``/``.mkv`` video files, a folder of PNG frames (a path without a suffix), or one
image file for a single frame. Frames are written in order as they complete (``open_clip_writer``: a removal hands
over each finished chunk; ``write_clip`` the whole clip at once, through the same writer, ``media_writer``). Every
write goes to a temporary name next to the target and is moved into place only when every frame is in; a failure or
an interrupt removes it, an existing file under the final name stays untouched and an input is never overwritten.

Defaults (``OutputOptions``):

* **Video files:** H.264 (libx264), crf 18, yuv420p (4:2:0 8-bit, High profile): plays in browsers, QuickTime and
  phones. 4:2:0 needs even sides: an odd-sized clip is refused before processing with the choices that keep its size
  (``--pix-fmt yuv444p``, ``--codec ffv1`` in .mkv, a PNG folder) rather than silently written in a format many
  players cannot show. mp4/mov are written with the index at the front (``faststart``).
* **Lossless / high depth:** ``--codec ffv1`` (.mkv) defaults to RGB (bgr0, bgra, rgb48, rgba64 as the source
  needs): bit-exact to the processed frames, at the source's depth and with its alpha. ``--codec prores_ks`` (.mov)
  defaults to yuv422p10le, or yuva444p10le (4444) when the source has alpha. ``--codec png`` (.mov) keeps
  depth and alpha. PNG folders always keep the source's depth (16-bit PNG for sources above 8 bits) and alpha.
* **match the input** (``--match-input``): the source's codec and pixel format when the container can hold them.
* Colour: the source's range, matrix, primaries and transfer are tagged on the output, and RGB is converted back
  with the same matrix the reader used (untagged in -> untagged out, both through FFmpeg's default BT.601).
* Timestamps: each frame keeps its source timestamp (variable frame rates kept; folder gaps kept as time gaps).
* Audio: every audio stream of the source is copied packet for packet when the container accepts its codec;
  otherwise (e.g. PCM into .mp4) it is re-encoded to AAC with a warning.
* Frame folders: the source folder's names and numbers (``shot.1001.png`` ...), else ``00000.png`` ...
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path
from typing import List, Optional, Sequence, Union

import torch

from .clip import DEFAULT_IMAGE_FPS, AudioStream, ClipInfo, as_fps_fraction
from .errors import InputError
from .media_codecs import (  # noqa: F401  (DEFAULT_* re-exported for the CLI)
    DEFAULT_CODEC,
    DEFAULT_CRF,
    DEFAULT_PIX_FMT,
    WRITABLE_VIDEO_SUFFIXES,
    Encoding,
    OutputOptions,
    check_codec_options,
    choose_codec,
)
from .media_in import IMAGE_SUFFIXES, open_input
from .media_writer import ClipWriter

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

_FRAME_FILE = re.compile(r"^.*\d+\.png$", re.IGNORECASE)


@dataclass
class OutputTarget:
    path: Path
    #: "video", "folder" or "image"
    kind: str
    options: OutputOptions


def _same_path(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return os.path.abspath(a) == os.path.abspath(b)


def _inside(child: Path, folder: Path) -> bool:
    try:
        return Path(os.path.abspath(child)).is_relative_to(Path(os.path.abspath(folder)))
    except ValueError:
        return False


def check_output_target(
    path: PathLike, inputs: Sequence[PathLike] = (), options: Optional[OutputOptions] = None,
    node: str = "DiffuEraser",
) -> OutputTarget:
    """Everything about the output that can be checked before reading the input; raises InputError otherwise.

    Refuses: the path of an input (or a folder holding one), an unsupported suffix or codec for it, an existing
    folder holding files other than PNG frames, a missing or unwritable parent folder.
    """
    target = Path(path)
    options = options or OutputOptions()
    for item in inputs:
        item = Path(item)
        if _same_path(target, item) or (item.is_dir() and _inside(target, item)) or (
            target.is_dir() and _inside(item, target)
        ):
            raise InputError(f"{node}: output '{target}' is (or holds) the input '{item}'; choose another output "
                             "(inputs are never overwritten)")
    suffix = target.suffix.lower()
    if suffix == "":
        kind = "folder"
    elif suffix in IMAGE_SUFFIXES:
        kind = "image"
    elif suffix in WRITABLE_VIDEO_SUFFIXES:
        kind = "video"
    else:
        raise InputError(
            f"{node}: cannot write '{target.name}': use {', '.join(sorted(WRITABLE_VIDEO_SUFFIXES))} or a folder "
            "name without a suffix (PNG frames)"
        )
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"{node}: the folder of the output '{target}' does not exist: '{parent}'")
    if target.exists():
        if kind == "folder":
            if not target.is_dir():
                raise InputError(f"{node}: output '{target}' exists and is not a folder")
            foreign = sorted(p.name for p in target.iterdir() if not _FRAME_FILE.match(p.name))
            if foreign:
                raise InputError(
                    f"{node}: output folder '{target}' holds other files ({', '.join(foreign[:3])}"
                    f"{' ...' if len(foreign) > 3 else ''}); choose a new or empty folder"
                )
        elif target.is_dir():
            raise InputError(f"{node}: output '{target}' is an existing folder, not a file")
    try:  # a real probe: permissions, read-only file systems, quotas
        fd, probe = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".probe", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise InputError(f"{node}: cannot write in '{parent}' for the output '{target.name}': {exc.strerror or exc}")
    if kind == "video":
        check_codec_options(options, suffix, node)
    elif options.codec or options.crf is not None:
        log.warning("%s: --codec/--crf apply to video files; '%s' is written as PNG", node, target.name)
    return OutputTarget(target, kind, options)


def choose_encoding(target: OutputTarget, info: ClipInfo, node: str = "DiffuEraser") -> Encoding:
    """The codec and pixel format ``target`` gets for ``info``'s frames (``media_codecs.choose_codec``)."""
    return choose_codec(target.options, target.path.suffix, info, node)


# --------------------------------------------------------------------------------------------------------------
# writing


def open_clip_writer(
    target: Union[OutputTarget, PathLike],
    info: ClipInfo,
    node: str = "DiffuEraser",
    progress=None,
) -> ClipWriter:
    """A ``media_writer.ClipWriter`` for ``info``'s frames to ``target`` (from ``check_output_target``, or a path):
    ``write(start, frames, original)`` consecutive ranges as they complete, then ``close()``; as a context manager
    an exception aborts it and leaves no output. ``info`` must give the size of the frames written."""
    if not isinstance(target, OutputTarget):
        target = check_output_target(target, node=node)
    enc = choose_encoding(target, info, node) if target.kind == "video" else None
    return ClipWriter(target, info, enc, node=node, progress=progress)


def write_clip(
    target: Union[OutputTarget, PathLike],
    frames: torch.Tensor,
    info: ClipInfo,
    original: Optional[torch.Tensor] = None,
    node: str = "DiffuEraser",
    progress=None,
) -> Path:
    """Write uint8 RGB ``frames`` ``[T,H,W,3]`` (and ``original``, the full-depth / alpha frames, when given) as
    ``info`` describes; returns the path. ``target`` comes from ``check_output_target`` (or is a path). The whole
    clip in one ``open_clip_writer`` range: the same code path as a removal writing chunk by chunk."""
    if not isinstance(target, OutputTarget):
        target = check_output_target(target, node=node)
    if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise InputError(f"{node}: frames to write must be uint8 [T,H,W,3], got {tuple(frames.shape)} {frames.dtype}")
    if original is not None and tuple(original.shape[:3]) != tuple(frames.shape[:3]):
        raise InputError(f"{node}: internal error, original {tuple(original.shape)} vs frames {tuple(frames.shape)}")
    if len(info.pts) != frames.shape[0]:
        raise InputError(f"{node}: internal error, {len(info.pts)} timestamps for {frames.shape[0]} frames")
    info = replace(info, height=int(frames.shape[1]), width=int(frames.shape[2]))
    with open_clip_writer(target, info, node=node, progress=progress) as writer:
        writer.write(0, frames, original)
    return target.path


def constant_rate_info(count: int, fps, path: Optional[Path] = None, node: str = "DiffuEraser",
                       audio_from: Optional[PathLike] = None, height: int = 0, width: int = 0) -> ClipInfo:
    """A ``ClipInfo`` for frames at a constant rate (frames that do not come from a file), with the audio streams
    of ``audio_from`` when it is a video file."""
    fps = as_fps_fraction(fps, node)
    info = ClipInfo(path=Path(audio_from) if audio_from else (path or Path(".")), kind="video", width=width,
                    height=height, fps=fps, fps_from_file=True, time_base=1 / fps, pts=list(range(count)))
    if audio_from is not None:
        source = Path(audio_from)
        if source.is_file() and source.suffix.lower() not in IMAGE_SUFFIXES:
            container = open_input(source, node)
            try:
                info.audio = [AudioStream(s.index, s.codec_context.name, int(s.codec_context.sample_rate or 0),
                                          int(s.codec_context.channels or 0)) for s in container.streams.audio]
            finally:
                container.close()
    return info


def write_video(
    path: PathLike,
    frames: torch.Tensor,
    fps: Union[Fraction, int, float] = DEFAULT_IMAGE_FPS,
    audio_from: Optional[PathLike] = None,
    crf: Optional[int] = None,
    node: str = "DiffuEraser",
    options: Optional[OutputOptions] = None,
) -> Path:
    """Frames at a constant ``fps`` (uint8 ``[T,H,W,3]``) -> a video file, PNG folder or image; the audio of
    ``audio_from`` (a video file) is copied. Defaults as in the module docstring."""
    options = options or OutputOptions(crf=crf)
    target = check_output_target(path, options=options, node=node)
    if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise InputError(f"{node}: frames to write must be uint8 [T,H,W,3], got {tuple(frames.shape)} {frames.dtype}")
    info = constant_rate_info(int(frames.shape[0]), fps, target.path, node, audio_from if target.kind == "video"
                              else None, int(frames.shape[1]), int(frames.shape[2]))
    return write_clip(target, frames, info, node=node)


__all__: List[str] = ["ClipWriter", "OutputOptions", "OutputTarget", "check_output_target", "choose_encoding",
                      "open_clip_writer", "write_clip", "write_video", "DEFAULT_CODEC", "DEFAULT_CRF", "DEFAULT_PIX_FMT"]
