"""Media in: video files (every codec through PyAV), frame folders and single images -> ``ClipData``.

What the reader keeps (see ``clip.ClipInfo``) and the decisions it makes:

* **Orientation.** A display matrix (phone videos) is undone: frames are returned upright, so masks are drawn on
  what the user sees. ``info.rotation`` records the rotation applied; the writer writes upright frames without a
  rotation tag (plays upright in every player, including those that ignore display matrices). Mirroring display
  matrices are not undone (rare; the rotation part is).
* **Time.** Each frame's presentation timestamp is kept (``info.pts`` in ``info.time_base``), so variable frame
  rates and the audio sync survive. Frame folders get ``pts = frame number - first number`` at 24 fps, so gaps in
  the numbering stay gaps in time.
* **Colour.** Frames are converted to RGB with the matrix and range the stream is tagged with (FFmpeg's BT.601 when
  untagged); the tags travel to the writer, which converts back with the same matrix.
* **Depth and alpha.** Sources above 8 bits, or with alpha, are also kept as ``original`` (uint16 on a 0..65535
  scale for depth > 8, uint8 RGBA for 8-bit alpha); ``frames`` is their 8-bit RGB for the networks.
* **Frame folders.** Files are grouped by numbering pattern (``shot.1001.png``: prefix ``shot.``, number 1001,
  suffix ``.png``); the largest group is the sequence, ordered by number. Other image files (a stray thumbnail) are
  left out with a warning naming them; gaps in the numbering are reported. Names and numbers travel to the writer.
* **Truncation.** When a file decodes to fewer frames than its index lists (an mp4 cut short), a warning says so
  with both counts; a decoding error is an ``InputError`` naming the frame it stopped at.
"""

from __future__ import annotations

import logging
import math
import os
import re
from fractions import Fraction
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import torch

from .clip import DEFAULT_IMAGE_FPS, AudioStream, ClipData, ClipInfo, ColourTags
from .errors import InputError

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

VIDEO_SUFFIXES = {".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v", ".gif", ".mpg", ".mpeg", ".wmv", ".flv", ".mxf"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
#: a frame file name: prefix, frame number, image suffix (``shot.1001.png``, ``frame_07.jpg``, ``00012.png``)
_NUMBERED = re.compile(r"^(.*?)(\d+)(\.[A-Za-z0-9]+)$")


def _natural_key(name: str):
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


# --------------------------------------------------------------------------------------------------------------
# frame folders


class FrameSequence:
    """The frames of a folder: ``files`` in order, their ``numbers`` (None when unnumbered) and naming pattern."""

    def __init__(self, files: List[Path], numbers: Optional[List[int]], pattern: Optional[Tuple[str, int, str]]):
        self.files = files
        self.numbers = numbers
        self.pattern = pattern


def scan_frame_folder(folder: PathLike, node: str = "DiffuEraser") -> FrameSequence:
    """The image sequence of a folder; strays and gaps are logged as warnings (see module docstring)."""
    folder = Path(folder)
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise InputError(f"{node}: folder '{folder}' contains no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    groups: Dict[Tuple[str, str], List[Tuple[int, Path, int]]] = {}
    unnumbered: List[Path] = []
    for path in files:
        match = _NUMBERED.match(path.name)
        if match is None:
            unnumbered.append(path)
            continue
        prefix, digits, suffix = match.groups()
        groups.setdefault((prefix, suffix.lower()), []).append((int(digits), path, len(digits)))
    if not groups:
        # nothing numbered: natural order of every image, no numbers to keep
        return FrameSequence(sorted(files, key=lambda p: _natural_key(p.name)), None, None)
    key = max(groups, key=lambda k: (len(groups[k]), -len(k[0])))
    members = sorted(groups[key])
    strays = sorted([p.name for k, g in groups.items() if k != key for _, p, _ in g] + [p.name for p in unnumbered])
    if strays:
        log.warning(
            "%s: folder '%s': %d file(s) do not belong to the sequence %s####%s and are left out: %s",
            node, folder, len(strays), key[0], key[1], ", ".join(strays[:5]) + (" ..." if len(strays) > 5 else ""),
        )
    numbers = [n for n, _, _ in members]
    if len(set(numbers)) != len(numbers):
        dupes = sorted({n for n in numbers if numbers.count(n) > 1})
        raise InputError(f"{node}: folder '{folder}' has several files for frame number(s) {dupes[:5]}")
    gaps = [(a, b) for a, b in zip(numbers, numbers[1:]) if b != a + 1]
    if gaps:
        missing = sum(b - a - 1 for a, b in gaps)
        shown = ", ".join(f"{a + 1}-{b - 1}" if b - a > 2 else f"{a + 1}" for a, b in gaps[:5])
        log.warning(
            "%s: folder '%s': the numbering has %d gap(s), %d frame number(s) missing (%s); the gaps are kept as gaps "
            "in time", node, folder, len(gaps), missing, shown,
        )
    width = min(d for _, _, d in members)  # the padding: the shortest spelling of a number
    return FrameSequence([p for _, p, _ in members], numbers, (key[0], width, key[1]))


def list_image_files(folder: PathLike, node: str = "DiffuEraser") -> List[Path]:
    """The frame files of a folder in sequence order (see ``scan_frame_folder``)."""
    return scan_frame_folder(folder, node).files


def read_image_array(path: Path, node: str) -> np.ndarray:
    """An image file as stored: uint8 or uint16, ``[H,W]`` (gray), ``[H,W,3]`` (RGB) or ``[H,W,4]`` (RGBA)."""
    import cv2

    data = np.fromfile(str(path), dtype=np.uint8)  # fromfile + imdecode also handles non-ASCII paths
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if image is None:
        raise InputError(f"{node}: cannot decode image '{path}'")
    if image.dtype not in (np.uint8, np.uint16):
        raise InputError(f"{node}: image '{path}' has unsupported sample type {image.dtype} (use 8 or 16 bit)")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 3 and image.shape[2] == 2:  # gray + alpha
        image = np.concatenate([np.repeat(image[:, :, :1], 3, axis=2), image[:, :, 1:]], axis=2)
    elif image.ndim == 3:
        order = [2, 1, 0, 3][: image.shape[2]]
        image = np.ascontiguousarray(image[:, :, order])  # BGR(A) -> RGB(A)
    return image


def to_uint8(array: np.ndarray) -> np.ndarray:
    """uint16 (0..65535) -> uint8 rounded; uint8 unchanged."""
    if array.dtype == np.uint16:
        return ((array.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    return array


def original_to_uint8(original: torch.Tensor, out: Optional[torch.Tensor] = None, chunk: int = 16) -> torch.Tensor:
    """Full-depth / RGBA frames ``[T,H,W,3|4]`` -> their 8-bit RGB ``[T,H,W,3]`` (into ``out`` when given)."""
    if out is None:
        out = torch.empty((*original.shape[:3], 3), dtype=torch.uint8)
    for s in range(0, original.shape[0], chunk):
        part = original[s : s + chunk, ..., :3]
        if part.dtype == torch.uint16:
            part = ((part.to(torch.int64) * 255 + 32767) // 65535).to(torch.uint8)
        out[s : s + chunk] = part
    return out


def _rgb(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    return image[:, :, :3]


class _FrameBuffer:
    """Frames appended one by one into a tensor preallocated from an estimate (overflow goes to a side list)."""

    def __init__(self, estimate: int):
        self.estimate = max(int(estimate), 1)
        self.buffer: Optional[torch.Tensor] = None
        self.extra: List[torch.Tensor] = []
        self.count = 0

    def append(self, array: np.ndarray, what: str) -> None:
        if self.buffer is None:
            self.buffer = torch.empty((self.estimate, *array.shape), dtype=torch.from_numpy(np.ascontiguousarray(array[:1])).dtype)
        elif tuple(array.shape) != tuple(self.buffer.shape[1:]):
            raise InputError(
                f"{what} is {array.shape[1]}x{array.shape[0]} but earlier frames are "
                f"{self.buffer.shape[2]}x{self.buffer.shape[1]}; all frames must have the same size"
            )
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        if self.count < self.buffer.shape[0]:
            self.buffer[self.count] = tensor
        else:
            self.extra.append(tensor)
        self.count += 1

    def result(self) -> Optional[torch.Tensor]:
        if self.buffer is None:
            return None
        if self.extra:
            return torch.cat([self.buffer[: self.count - len(self.extra)], torch.stack(self.extra)])
        return self.buffer[: self.count]


def _read_images(files: List[Path], node: str) -> Tuple[torch.Tensor, Optional[torch.Tensor], int, bool]:
    """Image files -> (uint8 RGB frames, full-depth/alpha original or None, bit depth, has alpha)."""
    first = read_image_array(files[0], node)
    depth = 16 if first.dtype == np.uint16 else 8
    alpha = first.ndim == 3 and first.shape[2] == 4
    keep = depth > 8 or alpha
    frames = _FrameBuffer(len(files))
    original = _FrameBuffer(len(files)) if keep else None
    for file in files:
        image = first if file is files[0] else read_image_array(file, node)
        if (image.dtype == np.uint16) != (depth > 8) or (image.ndim == 3 and image.shape[2] == 4) != alpha:
            raise InputError(
                f"{node}: '{file.name}' is {image.dtype} with shape {image.shape} but '{files[0].name}' is "
                f"{first.dtype} with shape {first.shape}; all frames must have the same format"
            )
        what = f"{node}: '{file.name}'"
        frames.append(to_uint8(_rgb(image)), what)
        if original is not None:
            original.append(_rgb(image) if not alpha else image, what)
    return frames.result(), original.result() if original is not None else None, depth, alpha


# --------------------------------------------------------------------------------------------------------------
# video files


def video_fps(stream) -> Optional[Fraction]:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate:
            return Fraction(rate)
    return None


def open_input(path: Path, node: str):
    import av

    try:
        return av.open(str(path))
    except (av.error.FFmpegError, UnicodeDecodeError) as exc:
        raise InputError(f"{node}: cannot open video '{path}': {exc}") from exc


def _frame_count_estimate(container, stream, fps) -> int:
    import av

    estimate = int(stream.frames or 0)
    if not estimate and fps:
        # Matroska/WebM give no frame count: estimate from a duration (only sizes the first buffer).
        if stream.duration and stream.time_base:
            estimate = int(math.ceil(float(stream.duration * stream.time_base * fps)))
        elif container.duration:
            estimate = int(math.ceil(container.duration / av.time_base * float(fps)))
    return estimate


def _index_truncation(container, path: Path) -> Optional[str]:
    """Why the file looks cut short by its own index (mp4/mov keep one), or None."""
    counts, extent = [], 0
    for stream in container.streams:
        try:
            entries = stream.index_entries
            counts.append(len(entries))
            for entry in entries:
                extent = max(extent, int(entry.pos) + int(entry.size))
        except Exception:  # containers without an index (Matroska, raw streams): nothing to compare
            return None
    size = path.stat().st_size
    if extent > size:
        return f"its index reaches byte {extent} but the file has {size} bytes"
    if any(counts) and not all(counts):
        return "one of its streams has lost its index entries"
    return None


def _alpha_decoder(stream):
    """VP9 keeps alpha in side data that FFmpeg's own decoder skips; libvpx's decoder reads it (WebM/MKV mark such
    streams with ``alpha_mode=1``). None when the stream's default decoder is right."""
    import av

    if stream.codec_context.name != "vp9" or str(stream.metadata.get("alpha_mode", "0")) != "1":
        return None
    if "libvpx-vp9" not in av.codecs_available:
        log.warning("VP9 stream with alpha but no libvpx-vp9 decoder in this FFmpeg: the alpha channel is not read")
        return None
    decoder = av.CodecContext.create("libvpx-vp9", "r")
    decoder.extradata = stream.codec_context.extradata
    return decoder


def _timed(frames, stream):
    for frame in frames:
        if frame.time_base is None:
            frame.time_base = stream.time_base
        yield frame


def _format_depth_alpha(fmt) -> Tuple[int, bool]:
    components = list(fmt.components)
    depth = max((c.bits for c in components), default=8)
    return depth, any(c.is_alpha for c in components)


def _colour_of(frame) -> ColourTags:
    return ColourTags(
        range=int(frame.color_range), matrix=int(frame.colorspace),
        primaries=int(frame.color_primaries), transfer=int(frame.color_trc),
    )


def _upright(array: np.ndarray, quarter_turns: int) -> np.ndarray:
    return np.rot90(array, quarter_turns, axes=(0, 1)) if quarter_turns else array


def decode_video(path: Path, node: str, limit: Optional[int] = None, keep_original: bool = True,
                 mask_mode: bool = False):
    """Decode a video file -> (ClipInfo, uint8 RGB frames, original or None).

    ``mask_mode`` keeps RGBA at 8 bits in ``original`` when the stream has alpha (masks use it) and never keeps
    depth above 8 bits.
    """
    import av

    container = open_input(path, node)
    try:
        if not container.streams.video:
            raise InputError(f"{node}: '{path}' has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        fps = video_fps(stream)
        fps_known = fps is not None
        if fps is None:
            log.warning("%s: '%s' does not state a frame rate; using %s fps", node, path, DEFAULT_IMAGE_FPS)
            fps = DEFAULT_IMAGE_FPS
        estimate = _frame_count_estimate(container, stream, fps)
        if limit is not None:
            estimate = min(estimate, limit) if estimate else limit
        audio = [
            AudioStream(s.index, s.codec_context.name, int(s.codec_context.sample_rate or 0),
                        int(s.codec_context.channels or 0))
            for s in container.streams.audio
        ]
        if limit is None and not mask_mode:
            cut = _index_truncation(container, path)
            if cut:
                log.warning("%s: '%s' looks truncated (cut short): %s; the output keeps what could be read", node,
                            path, cut)
        frames = _FrameBuffer(estimate)
        original: Optional[_FrameBuffer] = None
        pts: List[Optional[int]] = []
        info = None
        turns = 0
        depth, alpha = 8, False
        # Demux the audio too: a file cut short often loses its last audio packets while the video still decodes.
        audio_streams = [] if (limit is not None or mask_mode) else list(container.streams.audio)
        audio_packets = {s.index: 0 for s in audio_streams}

        decoder = _alpha_decoder(stream)

        def video_frames():
            for packet in container.demux(stream, *audio_streams):
                if packet.stream.type != "video":
                    if packet.size:
                        audio_packets[packet.stream.index] += 1
                    continue
                if decoder is None:
                    yield from packet.decode()
                elif packet.size:
                    yield from _timed(decoder.decode(packet), stream)
            if decoder is not None:
                yield from _timed(decoder.decode(None), stream)

        try:
            for frame in video_frames():
                if limit is not None and frames.count >= limit:
                    break
                if info is None:
                    depth, alpha = _format_depth_alpha(frame.format)
                    rotation = int(round(frame.rotation / 90.0)) * 90 % 360
                    turns = rotation // 90
                    if rotation:
                        log.info("%s: '%s' is stored rotated; turning its frames %d degrees to upright", node,
                                 path, rotation)
                    info = ClipInfo(
                        path=path, kind="video", width=0, height=0, rotation=rotation, fps=fps,
                        fps_from_file=fps_known, time_base=Fraction(stream.time_base or (1 / fps)),
                        colour=_colour_of(frame), bit_depth=depth, has_alpha=alpha,
                        codec=stream.codec_context.name, pix_fmt=frame.format.name, audio=audio,
                    )
                    if keep_original and ((depth > 8 and not mask_mode) or alpha):
                        original = _FrameBuffer(estimate)
                what = f"{node}: frame {frames.count} of '{path}'"
                if original is not None:
                    if depth > 8 and not mask_mode:
                        full = frame.to_ndarray(format="rgba64le" if alpha else "rgb48le")
                    else:
                        full = frame.to_ndarray(format="rgba")
                    full = _upright(full, turns)
                    original.append(full, what)
                    frames.append(to_uint8(full[:, :, :3]), what)
                else:
                    frames.append(_upright(frame.to_ndarray(format="rgb24"), turns), what)
                pts.append(frame.pts)
        except av.error.FFmpegError as exc:
            raise InputError(
                f"{node}: error while decoding '{path}' after {frames.count} frames: {exc}; the file may be "
                "damaged or cut short"
            ) from exc
        listed = int(stream.frames or 0)
        short_audio = [(s.index, audio_packets[s.index], int(s.frames)) for s in audio_streams
                       if s.frames and audio_packets[s.index] < s.frames]
    finally:
        container.close()
    result = frames.result()
    if result is None or info is None:
        raise InputError(f"{node}: no frames could be decoded from '{path}'")
    if limit is None and listed and frames.count < listed:
        log.warning(
            "%s: '%s' lists %d frames but only %d could be decoded: the file looks truncated (cut short); "
            "the output will have %d frames", node, path, listed, frames.count, frames.count,
        )
    for index, got, listed_packets in short_audio:
        log.warning(
            "%s: '%s': audio stream %d lists %d packets but only %d are in the file: the file looks truncated (cut "
            "short); the audio is copied as far as it goes", node, path, index, listed_packets, got,
        )
    info.height, info.width = int(result.shape[1]), int(result.shape[2])
    info.pts = _clean_pts(pts, info, node)
    kept = original.result() if original is not None else None
    if kept is not None and info.codec == "gif" and kept.dtype == torch.uint8 and bool((kept[..., 3] == 255).all()):
        # GIF decodes to BGRA even when nothing is transparent: no alpha to keep, nothing to warn about
        info.has_alpha, kept = False, None
    return info, result, kept


def _clean_pts(pts: List[Optional[int]], info: ClipInfo, node: str) -> List[int]:
    """The frames' timestamps, or evenly spaced ones at ``info.fps`` when they are missing or not increasing."""
    if pts and all(p is not None for p in pts) and all(b > a for a, b in zip(pts, pts[1:])):
        return [int(p) for p in pts]
    log.warning("%s: '%s' has missing or non-increasing frame timestamps; assuming a constant %s fps", node,
                info.path, float(info.fps))
    step = 1 / (info.fps * info.time_base)
    start = pts[0] if pts and pts[0] is not None else 0
    return [int(start + round(i * step)) for i in range(len(pts))]


# --------------------------------------------------------------------------------------------------------------
# entry point


def read_clip(path: PathLike, max_frames: Optional[int] = None, node: str = "DiffuEraser",
              keep_original: bool = True) -> ClipData:
    """A video file, a folder of frames or a single image -> ``ClipData`` (see the module docstring).

    Every frame is decoded (exact count, at most ``max_frames``).
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{node}: '{path}' does not exist")
    if max_frames is not None and max_frames < 1:
        raise InputError(f"{node}: max_frames must be >= 1, got {max_frames}")
    if path.is_dir() or path.suffix.lower() in IMAGE_SUFFIXES:
        if path.is_dir():
            seq = scan_frame_folder(path, node)
        else:
            seq = FrameSequence([path], None, None)
        files = seq.files[:max_frames] if max_frames is not None else seq.files
        frames, original, depth, alpha = _read_images(files, node)
        numbers = seq.numbers[: len(files)] if seq.numbers is not None else None
        pts = [n - numbers[0] for n in numbers] if numbers is not None else list(range(len(files)))
        info = ClipInfo(
            path=path, kind="folder" if path.is_dir() else "image", width=int(frames.shape[2]),
            height=int(frames.shape[1]), fps=DEFAULT_IMAGE_FPS, fps_from_file=False,
            time_base=1 / DEFAULT_IMAGE_FPS, pts=pts, bit_depth=depth, has_alpha=alpha,
            codec="png" if files[0].suffix.lower() == ".png" else files[0].suffix.lower().lstrip("."),
            frame_names=[f.name for f in files], frame_numbers=list(numbers or []), name_pattern=seq.pattern,
        )
        return ClipData(frames, info, original if keep_original else None)
    info, frames, original = decode_video(path, node, max_frames, keep_original)
    return ClipData(frames, info, original)


#: the older name
read_video = read_clip
