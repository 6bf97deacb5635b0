"""Media out: checks the output target before anything is read, then writes a clip the way ``ClipInfo`` describes it.

Targets: ``.mp4``/``.m4v``/``.mov``/``.mkv`` video files, a folder of PNG frames (a path without a suffix), or one
image file for a single frame. Every write goes to a temporary name next to the target and is moved into place only
when complete; an input is never overwritten.

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
import shutil
import tempfile
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path
from typing import List, Optional, Sequence, Union

import numpy as np
import torch

from .clip import DEFAULT_IMAGE_FPS, AudioStream, ClipInfo, as_fps_fraction
from .errors import InputError
from .media_codecs import (  # noqa: F401  (DEFAULT_* re-exported for the CLI)
    AUDIO_COPY,
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


def _temp_path(target: Path, suffix: str) -> Path:
    fd, name = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=f".partial{suffix}", dir=target.parent)
    os.close(fd)
    return Path(name)


def _source_array(i: int, frames: torch.Tensor, original: Optional[torch.Tensor], want_depth: int,
                  want_alpha: bool):
    """Frame ``i`` as (numpy array, PyAV rgb format) at the depth/alpha the encoding wants."""
    if original is not None and (want_alpha or (want_depth > 8 and original.dtype == torch.uint16)):
        array = original[i].numpy()
        if not want_alpha and array.shape[2] == 4:
            array = array[:, :, :3]
        if array.dtype == np.uint16:
            return np.ascontiguousarray(array), "rgba64le" if array.shape[2] == 4 else "rgb48le"
        return np.ascontiguousarray(array), "rgba" if array.shape[2] == 4 else "rgb24"
    return np.ascontiguousarray(frames[i].numpy()), "rgb24"


def _audio_writers(output, info: ClipInfo, suffix: str, node: str):
    """Adds ``info``'s audio streams to ``output``; returns the functions that write their packets."""
    import av

    if not info.audio or info.kind != "video":
        return None, []
    writers = []
    for audio in info.audio:
        source = open_input(info.path, node)
        in_audio = next(s for s in source.streams.audio if s.index == audio.index)
        copy = suffix == ".mkv" or audio.codec in AUDIO_COPY.get(suffix, set())
        if copy:
            out_audio = output.add_stream_from_template(in_audio)
        else:
            log.warning("%s: %s audio cannot be stored in %s as it is; re-encoding it to AAC (use .mov or .mkv to "
                        "copy it unchanged)", node, audio.codec, suffix)
            out_audio = output.add_stream("aac", rate=in_audio.codec_context.sample_rate)
            layout = in_audio.codec_context.layout
            if layout.name.endswith("channels"):  # AAC rejects 'unspecified order' layouts (e.g. from PCM)
                layout = av.AudioLayout(f"{in_audio.codec_context.channels}c")
            out_audio.layout = layout
        writers.append((source, in_audio, out_audio, copy))

    def write_all():
        for source, in_audio, out_audio, copy in writers:
            try:
                if copy:
                    for packet in source.demux(in_audio):
                        if packet.dts is None:
                            continue
                        packet.stream = out_audio
                        output.mux(packet)
                else:
                    for frame in source.decode(in_audio):
                        frame.pts = None
                        output.mux(out_audio.encode(frame))
                    output.mux(out_audio.encode(None))
            finally:
                source.close()

    return write_all, [w[0] for w in writers]


def _write_video_file(tmp: Path, suffix: str, frames, original, info: ClipInfo, enc: Encoding, node: str,
                      progress=None) -> None:
    import av

    t = int(frames.shape[0])
    h, w = int(frames.shape[1]), int(frames.shape[2])
    container_options = {"movflags": "+faststart"} if suffix in (".mp4", ".m4v", ".mov") else {}
    colour = info.colour
    with av.open(str(tmp), mode="w", options=container_options) as output:
        stream = output.add_stream(enc.codec, rate=info.fps)
        stream.width, stream.height, stream.pix_fmt = w, h, enc.pix_fmt
        cc = stream.codec_context
        cc.time_base = info.time_base
        stream.time_base = info.time_base
        if colour.tagged:
            cc.color_range, cc.colorspace = colour.range, colour.matrix
            cc.color_primaries, cc.color_trc = colour.primaries, colour.transfer
        opts = {}
        if enc.crf is not None:
            opts["crf"] = str(int(enc.crf))
        if enc.codec == "libvpx-vp9":
            opts["b"] = "0"
        stream.options = opts
        write_audio, sources = _audio_writers(output, info, suffix, node)
        try:
            for i in range(t):
                array, fmt = _source_array(i, frames, original, enc.depth, enc.alpha)
                frame = av.VideoFrame.from_ndarray(array, format=fmt)
                frame = frame.reformat(
                    format=enc.pix_fmt,
                    dst_colorspace=colour.matrix if colour.matrix not in (0, 2) else None,
                    dst_color_range=colour.range or None,
                )
                if colour.tagged:
                    frame.color_primaries, frame.color_trc = colour.primaries, colour.transfer
                    frame.colorspace, frame.color_range = colour.matrix, colour.range
                frame.pts = int(info.pts[i])
                frame.time_base = info.time_base
                output.mux(stream.encode(frame))
                if progress is not None:
                    progress("write", i + 1, t)
            output.mux(stream.encode(None))
            if write_audio is not None:
                write_audio()
        finally:
            for source in sources:
                source.close()


def _png_name(info: Optional[ClipInfo], i: int, count: int) -> str:
    if info is not None and info.name_pattern is not None and len(info.frame_numbers) == count:
        prefix, width, _ = info.name_pattern
        return f"{prefix}{info.frame_numbers[i]:0{width}d}.png"
    return f"{i:0{max(5, len(str(count - 1)))}d}.png"


def _encode_png(array: np.ndarray, node: str, name: str) -> np.ndarray:
    import cv2

    if array.ndim == 3:
        order = [2, 1, 0, 3][: array.shape[2]]
        array = np.ascontiguousarray(array[:, :, order])
    ok, data = cv2.imencode(".png", array)
    if not ok:
        raise InputError(f"{node}: PNG encoding failed for {name}")
    return data


def _png_array(i, frames, original, keep_full: bool):
    if keep_full and original is not None:
        return original[i].numpy()
    return frames[i].numpy()


def _write_png_folder(target: Path, frames, original, info: Optional[ClipInfo], keep_full: bool, node: str,
                      progress=None) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        count = int(frames.shape[0])
        for i in range(count):
            name = _png_name(info, i, count)
            _encode_png(_png_array(i, frames, original, keep_full), node, name).tofile(str(tmp / name))
            if progress is not None:
                progress("write", i + 1, count)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            os.replace(target, old / target.name)
            os.replace(tmp, target)
            shutil.rmtree(old)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_clip(
    target: Union[OutputTarget, PathLike],
    frames: torch.Tensor,
    info: ClipInfo,
    original: Optional[torch.Tensor] = None,
    node: str = "DiffuEraser",
    progress=None,
) -> Path:
    """Write uint8 RGB ``frames`` ``[T,H,W,3]`` (and ``original``, the full-depth / alpha frames, when given) as
    ``info`` describes; returns the path. ``target`` comes from ``check_output_target`` (or is a path)."""
    if not isinstance(target, OutputTarget):
        target = check_output_target(target, node=node)
    if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise InputError(f"{node}: frames to write must be uint8 [T,H,W,3], got {tuple(frames.shape)} {frames.dtype}")
    frames = frames.cpu()
    if original is not None and tuple(original.shape[:3]) != tuple(frames.shape[:3]):
        raise InputError(f"{node}: internal error, original {tuple(original.shape)} vs frames {tuple(frames.shape)}")
    if len(info.pts) != frames.shape[0]:
        raise InputError(f"{node}: internal error, {len(info.pts)} timestamps for {frames.shape[0]} frames")
    info = replace(info, height=int(frames.shape[1]), width=int(frames.shape[2]))
    path = target.path
    if target.kind != "video" and info.audio and info.kind == "video":
        log.warning("%s: '%s' holds no audio; the source's %d audio stream(s) are not written (use a video file "
                    "name to keep them)", node, path.name, len(info.audio))
    try:
        if target.kind == "folder":
            keep_full = target.options.pix_fmt not in ("rgb24",)
            _write_png_folder(path, frames, original, info, keep_full, node, progress)
            return path
        if target.kind == "image":
            if frames.shape[0] != 1:
                raise InputError(
                    f"{node}: '{path.name}' is an image name but there are {frames.shape[0]} frames; give a video "
                    "name (.mp4) or a folder name without a suffix"
                )
            import cv2

            array = _png_array(0, frames, original, path.suffix.lower() in (".png", ".tif", ".tiff"))
            if array.ndim == 3:
                array = np.ascontiguousarray(array[:, :, [2, 1, 0, 3][: array.shape[2]]])
            ok, data = cv2.imencode(path.suffix.lower(), array)
            if not ok:
                raise InputError(f"{node}: cannot encode '{path.name}'")
            tmp = _temp_path(path, path.suffix)
            try:
                data.tofile(str(tmp))
                os.replace(tmp, path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            return path
        enc = choose_encoding(target, info, node)
        suffix = path.suffix.lower()
        tmp = _temp_path(path, suffix)
        try:
            _write_video_file(tmp, suffix, frames, original, info, enc, node, progress)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return path
    except (OSError, _ffmpeg_error()) as exc:  # permissions, a full disk, an encoder refusing: one line
        import av

        if isinstance(exc, av.error.FFmpegError):
            raise InputError(f"{node}: FFmpeg could not write '{path.name}': {exc}") from exc
        raise InputError(f"{node}: cannot write the output '{path}': {exc.strerror or exc}") from exc


def _ffmpeg_error():
    import av

    return av.error.FFmpegError


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


__all__: List[str] = ["OutputOptions", "OutputTarget", "check_output_target", "choose_encoding", "write_clip",
                      "write_video", "DEFAULT_CODEC", "DEFAULT_CRF", "DEFAULT_PIX_FMT"]
