"""Frames: ComfyUI IMAGE <-> uint8, the working size, resizing, and reading/writing videos and frame folders.

Whole videos stay on the CPU as ``uint8 [T,H,W,3]``; every float conversion runs ``chunk`` frames at a time.

Decisions where the reference is silent or unsuitable:

* IMAGE -> uint8 rounds to nearest (``uint8 -> float -> uint8`` is then lossless) and clamps values slightly
  outside 0..1 (common after other nodes' arithmetic); NaN/inf is an error. 1 channel is repeated to RGB, 4
  channels (RGBA) drop the alpha channel (the hole is given by the mask, not by transparency).
* ``working_size`` follows the reference (section 7) but accepts small videos: frames need at least
  ``MIN_FRAME_SIDE`` (64) pixels a side and at most ``MAX_FRAME_SIDE`` (4096); the reference's 256 lower bound on the
  longer side is not enforced because smaller clips work fine at their own size.
* Resizing follows PIL's default ``resize`` (what the reference uses): antialiased bicubic (Keys a = -0.5), width
  then height with 8-bit rounding in between (on random noise at most 2 levels from PIL, almost all pixels equal).
  Masks use nearest on pixel centres (PIL ``NEAREST``).
* Mask files are converted to grayscale (ITU-R 601 luma, PIL ``convert("L")``) and binarised at
  ``> MASK_FILE_THRESHOLD`` (127) rather than the reference's ``> 0``: lossy codecs put small non-zero values into
  black areas, which ``> 0`` would turn into holes.
* ``write_video`` keeps the exact frame size: mp4/mov/mkv with libx264 in yuv420p when both sides are even and
  yuv444p (no chroma subsampling, so odd sizes are allowed; some players cannot show it) when one is odd. A path
  without a suffix is written as a folder of PNGs (lossless). Output is written to a temporary name next to the
  target and moved into place only when complete. Audio of ``audio_from`` is copied (re-encoded to AAC when mp4/mov
  cannot hold its codec) and cut where the video ends.
* Not handled: rotation metadata of phone videos (frames are returned as stored); a mask video's frame rate is not
  compared with the video's (the reference refuses a mismatch; here masks are matched by frame index).
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from .errors import InputError
from .masks import broadcast_masks, resize_masks_nearest

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

#: frames converted / resized at once (bounds float32 copies to a few frames)
FRAME_CHUNK = 16
#: reference default ``max_img_size`` for run_diffueraser; allowed range checked as in the reference
DEFAULT_MAX_SIDE = 960
MAX_SIDE_RANGE = (256, 1920)
#: latent factor of the SD VAE: the working size is a multiple of this
SIZE_MULTIPLE = 8
#: smallest / largest frame side accepted (the reference caps the longer side at 4096)
MIN_FRAME_SIDE = 64
MAX_FRAME_SIDE = 4096
#: 8-bit mask files: a pixel is a hole when its gray value is above this (see module docstring)
MASK_FILE_THRESHOLD = 127
#: frame rate given to image folders / single images, which carry none
DEFAULT_IMAGE_FPS = Fraction(24)
#: x264 constant rate factor of written videos (18 ~ visually lossless)
DEFAULT_CRF = 18

VIDEO_SUFFIXES = {".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v", ".gif", ".mpg", ".mpeg", ".wmv", ".flv"}
WRITABLE_VIDEO_SUFFIXES = {".mp4", ".mov", ".mkv", ".m4v"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
#: audio codecs that mp4/mov accept as they are; others are re-encoded to AAC
MP4_AUDIO_CODECS = {"aac", "mp3", "alac", "ac3", "eac3", "opus", "flac"}


# --------------------------------------------------------------------------------------------------------------
# ComfyUI IMAGE <-> uint8


def image_to_uint8(image: torch.Tensor, node: str = "DiffuEraser", chunk: int = FRAME_CHUNK) -> torch.Tensor:
    """ComfyUI IMAGE float ``[T,H,W,C]`` 0..1 -> uint8 ``[T,H,W,3]`` on the CPU (rounded, clamped).

    C = 1 is repeated to RGB, C = 4 drops alpha. NaN/inf raise InputError naming the node and the count.
    """
    if not isinstance(image, torch.Tensor) or image.dim() != 4:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise InputError(f"{node}: image must be a [T,H,W,C] tensor, got {shape}")
    t, h, w, c = image.shape
    if c not in (1, 3, 4):
        raise InputError(f"{node}: image must have 1, 3 or 4 channels (last dim), got shape {tuple(image.shape)}")
    if t == 0:
        raise InputError(f"{node}: image batch is empty (0 frames)")
    if c == 4:
        log.debug("%s: dropping the alpha channel of an RGBA image", node)
    out = torch.empty((t, h, w, 3), dtype=torch.uint8)
    if image.dtype == torch.uint8:
        for s in range(0, t, chunk):
            part = image[s : s + chunk].cpu()
            out[s : s + chunk] = part[..., :3] if c != 1 else part.expand(-1, -1, -1, 3)
        return out
    nonfinite = 0
    for s in range(0, t, chunk):
        part = image[s : s + chunk].cpu()
        part = part[..., :3] if c != 1 else part.expand(-1, -1, -1, 3)
        part = part.float()
        bad = int((~torch.isfinite(part)).sum())
        if bad:
            nonfinite += bad
            continue
        out[s : s + chunk] = (part * 255.0).round_().clamp_(0, 255).to(torch.uint8)
    if nonfinite:
        raise InputError(f"{node}: image contains {nonfinite} NaN/inf values (counted over RGB channels)")
    return out


def uint8_to_image(frames: torch.Tensor, chunk: int = FRAME_CHUNK) -> torch.Tensor:
    """uint8 ``[T,H,W,C]`` -> ComfyUI IMAGE float32 ``[T,H,W,C]`` in 0..1 (the node's output, so a full copy)."""
    if frames.dtype != torch.uint8:
        raise InputError(f"uint8_to_image: expected uint8 frames, got {frames.dtype}")
    out = torch.empty(frames.shape, dtype=torch.float32)
    for s in range(0, frames.shape[0], chunk):
        out[s : s + chunk] = frames[s : s + chunk].cpu().to(torch.float32) / 255.0
    return out


# --------------------------------------------------------------------------------------------------------------
# sizes and resizing


def check_frame_size(height: int, width: int, node: str = "DiffuEraser") -> None:
    if min(height, width) < MIN_FRAME_SIDE:
        raise InputError(
            f"{node}: frames of {width}x{height} are too small; each side needs at least {MIN_FRAME_SIDE} pixels"
        )
    if max(height, width) > MAX_FRAME_SIDE:
        raise InputError(
            f"{node}: frames of {width}x{height} are too large; sides must be at most {MAX_FRAME_SIDE} pixels "
            "(downscale the video first)"
        )


def working_size(
    height: int, width: int, max_side: int = DEFAULT_MAX_SIDE, node: str = "DiffuEraser"
) -> Tuple[int, int]:
    """The size DiffuEraser works at, as ``(h, w)`` (reference section 7).

    If the longer side exceeds ``max_side``: ``ratio = longer / max_side`` and each side becomes ``int(side /
    ratio)``; then (in every case) each side is rounded down to a multiple of 8.
    """
    lo, hi = MAX_SIDE_RANGE
    if int(max_side) != max_side or not lo <= max_side <= hi:
        raise InputError(f"{node}: max side must be an integer in {lo}..{hi}, got {max_side}")
    height, width = int(height), int(width)
    check_frame_size(height, width, node)
    longer = max(height, width)
    if longer > max_side:
        ratio = longer / max_side
        height, width = int(height / ratio), int(width / ratio)
    return height - height % SIZE_MULTIPLE, width - width % SIZE_MULTIPLE


def resize_frames(
    frames: torch.Tensor, size: Tuple[int, int], mode: str = "bicubic", chunk: int = FRAME_CHUNK
) -> torch.Tensor:
    """uint8 ``[T,H,W,3]`` -> uint8 ``[T,h,w,3]`` (antialiased, rounded, clamped); returns ``frames`` if same size."""
    if frames.dtype != torch.uint8 or frames.dim() != 4:
        raise InputError(f"resize_frames: expected uint8 [T,H,W,C], got {tuple(frames.shape)} {frames.dtype}")
    h, w = int(size[0]), int(size[1])
    if tuple(frames.shape[1:3]) == (h, w):
        return frames
    if mode not in ("bicubic", "bilinear", "nearest"):
        raise InputError(f"resize_frames: mode must be bicubic, bilinear or nearest, got {mode!r}")
    out = torch.empty((frames.shape[0], h, w, frames.shape[3]), dtype=torch.uint8, device=frames.device)
    for s in range(0, frames.shape[0], chunk):
        part = frames[s : s + chunk].to(torch.float32).permute(0, 3, 1, 2)
        if mode == "nearest":
            part = F.interpolate(part, size=(h, w), mode="nearest-exact")
        else:
            # Like PIL: width pass, rounded to 8 bits, then height pass (matches PIL to +-1 level, also on
            # high-frequency content where a single 2-D pass differs because PIL clips the intermediate).
            if part.shape[3] != w:
                part = F.interpolate(part, size=(part.shape[2], w), mode=mode, align_corners=False, antialias=True)
                part = part.round_().clamp_(0, 255)
            if part.shape[2] != h:
                part = F.interpolate(part, size=(h, w), mode=mode, align_corners=False, antialias=True)
        out[s : s + chunk] = part.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    return out


def resize_masks(masks: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """bool ``[T,H,W]`` -> bool ``[T,h,w]``, nearest on pixel centres (PIL ``NEAREST``)."""
    return resize_masks_nearest(masks, size)


# --------------------------------------------------------------------------------------------------------------
# reading


@dataclass
class VideoData:
    """A decoded video: ``frames`` uint8 ``[T,H,W,3]`` (CPU), exact ``fps``, whether the file has audio."""

    frames: torch.Tensor
    fps: Fraction
    has_audio: bool
    path: Path
    #: False for image folders / single images, whose ``fps`` is ``DEFAULT_IMAGE_FPS``
    fps_from_file: bool = True


def _natural_key(name: str):
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def list_image_files(folder: PathLike, node: str = "DiffuEraser") -> List[Path]:
    """Image files of a folder in natural order (``frame2.png`` before ``frame10.png``)."""
    folder = Path(folder)
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise InputError(f"{node}: folder '{folder}' contains no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return sorted(files, key=lambda p: _natural_key(p.name))


def _read_image_array(path: Path, node: str) -> np.ndarray:
    """An image file as uint8 ``[H,W]`` (gray) or ``[H,W,3]`` (RGB; alpha dropped, 16-bit scaled to 8)."""
    import cv2

    data = np.fromfile(str(path), dtype=np.uint8)  # fromfile + imdecode also handles non-ASCII paths
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if image is None:
        raise InputError(f"{node}: cannot decode image '{path}'")
    if image.dtype == np.uint16:
        image = ((image.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise InputError(f"{node}: image '{path}' has unsupported sample type {image.dtype} (use 8 or 16 bit)")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 3:
        image = np.ascontiguousarray(image[:, :, 2::-1])  # BGR(A) -> RGB, alpha dropped
    return image


def _gray_to_rgb(image: np.ndarray) -> np.ndarray:
    return np.repeat(image[:, :, None], 3, axis=2) if image.ndim == 2 else image


def _rgb_to_gray(image: np.ndarray) -> np.ndarray:
    """PIL ``convert("L")``: ITU-R 601 luma in 16-bit fixed point, rounded."""
    if image.ndim == 2:
        return image
    rgb = image.astype(np.uint32)
    gray = (rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000) >> 16
    return gray.astype(np.uint8)


def _video_fps(stream) -> Optional[Fraction]:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate:
            return Fraction(rate)
    return None


def _open_input(path: Path, node: str):
    import av

    try:
        return av.open(str(path))
    except av.error.FFmpegError as exc:
        raise InputError(f"{node}: cannot open video '{path}': {exc}") from exc


def _iter_video_rgb(path: Path, node: str, limit: Optional[int]):
    """Yields ``(frame_count_estimate, fps, has_audio)`` once, then RGB uint8 frames as numpy arrays."""
    import av

    container = _open_input(path, node)
    try:
        if not container.streams.video:
            raise InputError(f"{node}: '{path}' has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        estimate = int(stream.frames or 0)
        fps = _video_fps(stream)
        if not estimate and fps:
            # Matroska/WebM give no frame count: estimate from a duration (only sizes the first buffer).
            if stream.duration and stream.time_base:
                estimate = int(math.ceil(float(stream.duration * stream.time_base * fps)))
            elif container.duration:
                estimate = int(math.ceil(container.duration / av.time_base * float(fps)))
        yield estimate, fps, bool(container.streams.audio)
        count = 0
        try:
            for frame in container.decode(stream):
                if limit is not None and count >= limit:
                    break
                yield frame.to_ndarray(format="rgb24")
                count += 1
        except av.error.FFmpegError as exc:
            raise InputError(f"{node}: error while decoding '{path}' after {count} frames: {exc}") from exc
    finally:
        container.close()


def _read_video_file(path: Path, max_frames: Optional[int], node: str) -> VideoData:
    frames_iter = _iter_video_rgb(path, node, max_frames)
    estimate, fps, has_audio = next(frames_iter)
    if fps is None:
        log.warning("%s: '%s' does not state a frame rate; using %s fps", node, path, DEFAULT_IMAGE_FPS)
        fps = DEFAULT_IMAGE_FPS
    if max_frames is not None:
        estimate = min(estimate, max_frames) if estimate else max_frames
    buffer: Optional[torch.Tensor] = None
    extra: List[torch.Tensor] = []
    count = 0
    for array in frames_iter:
        if buffer is None:
            # Preallocate from the container's frame count; frames past it (inexact counts) go to a side list.
            buffer = torch.empty((max(estimate, 1), *array.shape), dtype=torch.uint8)
        elif array.shape != tuple(buffer.shape[1:]):
            raise InputError(
                f"{node}: frame {count} of '{path}' is {array.shape[1]}x{array.shape[0]} but earlier frames are "
                f"{buffer.shape[2]}x{buffer.shape[1]}"
            )
        if count < buffer.shape[0]:
            buffer[count] = torch.from_numpy(array)
        else:
            extra.append(torch.from_numpy(array))
        count += 1
    if buffer is None:
        raise InputError(f"{node}: no frames could be decoded from '{path}'")
    frames = torch.cat([buffer, torch.stack(extra)]) if extra else buffer[:count]
    return VideoData(frames=frames, fps=fps, has_audio=has_audio, path=path)


def _read_image_sequence(files: List[Path], node: str) -> torch.Tensor:
    first = _gray_to_rgb(_read_image_array(files[0], node))
    frames = torch.empty((len(files), *first.shape), dtype=torch.uint8)
    frames[0] = torch.from_numpy(first)
    for i, file in enumerate(files[1:], start=1):
        image = _gray_to_rgb(_read_image_array(file, node))
        if image.shape != first.shape:
            raise InputError(
                f"{node}: '{file.name}' is {image.shape[1]}x{image.shape[0]} but '{files[0].name}' is "
                f"{first.shape[1]}x{first.shape[0]}; all frames must have the same size"
            )
        frames[i] = torch.from_numpy(image)
    return frames


def read_video(path: PathLike, max_frames: Optional[int] = None, node: str = "DiffuEraser") -> VideoData:
    """A video file, a folder of PNG/JPG frames (natural order) or a single image -> ``VideoData``.

    Every frame is decoded (exact count, at most ``max_frames``); ``fps`` is the stream's exact rational rate
    (e.g. ``Fraction(24000, 1001)``), ``DEFAULT_IMAGE_FPS`` for images.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{node}: '{path}' does not exist")
    if max_frames is not None and max_frames < 1:
        raise InputError(f"{node}: max_frames must be >= 1, got {max_frames}")
    if path.is_dir():
        files = list_image_files(path, node)
        if max_frames is not None:
            files = files[:max_frames]
        return VideoData(_read_image_sequence(files, node), DEFAULT_IMAGE_FPS, False, path, fps_from_file=False)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return VideoData(_read_image_sequence([path], node), DEFAULT_IMAGE_FPS, False, path, fps_from_file=False)
    return _read_video_file(path, max_frames, node)


def read_masks(
    path: PathLike, num_frames: int, size: Tuple[int, int], node: str = "DiffuEraser"
) -> torch.Tensor:
    """Mask video / folder / single image -> bool ``[num_frames, h, w]`` at ``size`` (True = hole).

    Grayscale (luma) ``> MASK_FILE_THRESHOLD``, nearest resize to ``size``. A single mask applies to every frame;
    masks beyond ``num_frames`` are ignored (as the reference); fewer masks than frames is an error.
    """
    path = Path(path)
    h, w = int(size[0]), int(size[1])
    if not path.exists():
        raise InputError(f"{node}: mask '{path}' does not exist")
    if num_frames < 1:
        raise InputError(f"{node}: masks are needed for at least 1 frame, got num_frames={num_frames}")

    def to_mask(array: np.ndarray) -> torch.Tensor:
        hole = torch.from_numpy(_rgb_to_gray(array) > MASK_FILE_THRESHOLD)
        return resize_masks_nearest(hole.unsqueeze(0), (h, w))[0]

    out = torch.empty((num_frames, h, w), dtype=torch.bool)
    count = 0
    more = False
    if path.is_dir() or path.suffix.lower() in IMAGE_SUFFIXES:
        files = list_image_files(path, node) if path.is_dir() else [path]
        more = len(files) > num_frames
        for file in files[:num_frames]:
            out[count] = to_mask(_read_image_array(file, node))
            count += 1
    else:
        frames_iter = _iter_video_rgb(path, node, num_frames + 1)
        next(frames_iter)
        for array in frames_iter:
            if count == num_frames:
                more = True
                break
            out[count] = to_mask(array)
            count += 1
        frames_iter.close()
    if more:
        log.info(
            "%s: mask '%s' has more frames than the video (%d); the extra masks are ignored", node, path, num_frames
        )
    if count == 0:
        raise InputError(f"{node}: mask '{path}' has no frames")
    if count == 1 and num_frames > 1:
        return broadcast_masks(out[:1], num_frames, (h, w), node)
    if count < num_frames:
        raise InputError(
            f"{node}: mask '{path}' has {count} frames but the video has {num_frames}; "
            "give one mask per frame or a single mask for all frames"
        )
    return out


# --------------------------------------------------------------------------------------------------------------
# writing

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


def _temp_path(target: Path, suffix: str) -> Path:
    fd, name = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=f".partial{suffix}", dir=target.parent)
    os.close(fd)
    return Path(name)


def _add_audio(output, audio_from: Path, duration_s: float, node: str):
    """Opens ``audio_from`` and adds its first audio stream to ``output``; returns a function that writes it."""
    import av

    source = _open_input(audio_from, node)
    if not source.streams.audio:
        source.close()
        return None
    in_audio = source.streams.audio[0]
    container_format = output.format.name
    remux = "mp4" not in container_format and "mov" not in container_format
    remux = remux or (in_audio.codec_context.name in MP4_AUDIO_CODECS)
    if remux:
        out_audio = output.add_stream_from_template(in_audio)
    else:
        log.info("%s: re-encoding %s audio to AAC for %s", node, in_audio.codec_context.name, container_format)
        out_audio = output.add_stream("aac", rate=in_audio.codec_context.sample_rate)
        # the standard layout for the channel count: AAC rejects 'unspecified order' layouts (e.g. from PCM)
        layout = in_audio.codec_context.layout
        if layout.name.endswith("channels"):
            layout = av.AudioLayout(f"{in_audio.codec_context.channels}c")  # FFmpeg's default for the count
        out_audio.layout = layout
    start = in_audio.start_time or 0

    def write() -> None:
        try:
            if remux:
                for packet in source.demux(in_audio):
                    if packet.dts is None:
                        continue
                    if packet.pts is not None and float((packet.pts - start) * in_audio.time_base) >= duration_s:
                        continue
                    packet.stream = out_audio
                    output.mux(packet)
            else:
                for frame in source.decode(in_audio):
                    if frame.pts is not None and float((frame.pts - start) * in_audio.time_base) >= duration_s:
                        break
                    frame.pts = None
                    output.mux(out_audio.encode(frame))
                output.mux(out_audio.encode(None))
        finally:
            source.close()

    return write


def _write_video_file(
    tmp: Path, frames: torch.Tensor, fps: Fraction, audio_from: Optional[Path], crf: int, node: str
) -> None:
    import av

    t, h, w, _ = frames.shape
    pix_fmt = "yuv420p" if h % 2 == 0 and w % 2 == 0 else "yuv444p"
    if pix_fmt != "yuv420p":
        log.info("%s: %dx%d has an odd side; writing yuv444p to keep the exact size", node, w, h)
    with av.open(str(tmp), mode="w") as output:
        stream = output.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
        stream.codec_context.time_base = 1 / fps
        stream.options = {"crf": str(int(crf))}
        write_audio = _add_audio(output, audio_from, t / fps, node) if audio_from is not None else None
        for i in range(t):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frames[i].numpy()), format="rgb24")
            frame.pts = i
            frame.time_base = stream.codec_context.time_base
            output.mux(stream.encode(frame))
        output.mux(stream.encode(None))
        if write_audio is not None:
            write_audio()


_FRAME_FILE = re.compile(r"^\d+\.png$")


def _write_png_folder(target: Path, frames: torch.Tensor, node: str) -> None:
    import cv2

    if target.exists():
        if not target.is_dir():
            raise InputError(f"{node}: output '{target}' exists and is not a folder")
        foreign = [p.name for p in target.iterdir() if not _FRAME_FILE.match(p.name)]
        if foreign:
            raise InputError(
                f"{node}: output folder '{target}' holds other files ({', '.join(sorted(foreign)[:3])}...); "
                "choose a new or empty folder"
            )
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        digits = max(5, len(str(frames.shape[0] - 1)))
        for i in range(frames.shape[0]):
            ok, data = cv2.imencode(".png", np.ascontiguousarray(frames[i].numpy()[:, :, ::-1]))
            if not ok:
                raise InputError(f"{node}: PNG encoding failed for frame {i}")
            data.tofile(str(tmp / f"{i:0{digits}d}.png"))
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


def write_video(
    path: PathLike,
    frames: torch.Tensor,
    fps: Union[Fraction, int, float] = DEFAULT_IMAGE_FPS,
    audio_from: Optional[PathLike] = None,
    crf: int = DEFAULT_CRF,
    node: str = "DiffuEraser",
) -> Path:
    """Write uint8 ``[T,H,W,3]`` frames atomically and return the path.

    ``.mp4/.mov/.mkv/.m4v``: H.264 (libx264, ``crf``) at ``fps``, with the audio of ``audio_from`` (if it has
    any) copied, or re-encoded to AAC when the container cannot hold its codec, and cut at the video's end.
    No suffix: a folder of lossless PNGs ``00000.png, ...``. An image suffix with one frame: that image.
    """
    path = Path(path)
    if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise InputError(f"{node}: frames to write must be uint8 [T,H,W,3], got {tuple(frames.shape)} {frames.dtype}")
    frames = frames.cpu()
    if not path.parent.is_dir():
        raise InputError(f"{node}: output folder '{path.parent}' does not exist")
    suffix = path.suffix.lower()
    if suffix == "":
        _write_png_folder(path, frames, node)
        return path
    if suffix in IMAGE_SUFFIXES:
        if frames.shape[0] != 1:
            raise InputError(
                f"{node}: '{path.name}' is an image name but there are {frames.shape[0]} frames; "
                "give a video name (.mp4) or a folder name without a suffix"
            )
        import cv2

        ok, data = cv2.imencode(suffix, np.ascontiguousarray(frames[0].numpy()[:, :, ::-1]))
        if not ok:
            raise InputError(f"{node}: cannot encode '{path.name}'")
        tmp = _temp_path(path, suffix)
        try:
            data.tofile(str(tmp))
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return path
    if suffix not in WRITABLE_VIDEO_SUFFIXES:
        raise InputError(
            f"{node}: cannot write '{path.name}': use {', '.join(sorted(WRITABLE_VIDEO_SUFFIXES))} or a folder name"
        )
    fps = as_fps_fraction(fps, node)
    audio_path = Path(audio_from) if audio_from is not None else None
    if audio_path is not None and (audio_path.is_dir() or audio_path.suffix.lower() in IMAGE_SUFFIXES):
        audio_path = None  # frame folders and images carry no audio
    tmp = _temp_path(path, suffix)
    try:
        _write_video_file(tmp, frames, fps, audio_path, crf, node)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
