"""The ordered clip writer behind ``media_out``: frames are encoded as they arrive, in frame order, so a removal can
write each finished chunk while the next is still being computed and never hold a second copy of the video.

``ClipWriter`` takes consecutive ranges of frames (``write(start, frames, original)``) and encodes them right away:
a video file is encoded and muxed frame by frame, a PNG folder gets one file per frame, a single image is encoded
on ``close``. Everything goes to a temporary name next to the target (``.NAME.*.partial*``); ``close`` checks that
every frame of the clip arrived, finishes the file (encoder flush, the source's audio streams) and only then moves
it over the target. Any failure, or ``abort``, removes the temporary file or folder: an existing file under the
final name is never touched and no partial output is left behind. The defaults and rules are ``media_out``'s.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .clip import ClipInfo
from .errors import InputError
from .media_codecs import AUDIO_COPY, choose_codec
from .media_in import open_input

log = logging.getLogger(__name__)


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
    """Adds ``info``'s audio streams to ``output``; returns the function that writes their packets and the source
    containers it reads (to close)."""
    import av

    if not info.audio or info.kind != "video":
        return None, []
    writers = []
    try:
        for audio in info.audio:
            source = open_input(info.path, node)
            writers.append((source, None, None, False))  # listed at once: closed below if anything fails
            in_audio = next(s for s in source.streams.audio if s.index == audio.index)
            copy = suffix == ".mkv" or audio.codec in AUDIO_COPY.get(suffix, set())
            if copy:
                out_audio = output.add_stream_from_template(in_audio)
            else:
                log.warning("%s: %s audio cannot be stored in %s as it is; re-encoding it to AAC (use .mov or .mkv "
                            "to copy it unchanged)", node, audio.codec, suffix)
                out_audio = output.add_stream("aac", rate=in_audio.codec_context.sample_rate)
                layout = in_audio.codec_context.layout
                if layout.name.endswith("channels"):  # AAC rejects 'unspecified order' layouts (e.g. from PCM)
                    layout = av.AudioLayout(f"{in_audio.codec_context.channels}c")
                out_audio.layout = layout
            writers[-1] = (source, in_audio, out_audio, copy)
    except BaseException:
        for source, *_ in writers:
            source.close()
        raise

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


def _png_name(info: Optional[ClipInfo], i: int, count: int) -> str:
    if info is not None and info.name_pattern is not None and len(info.frame_numbers) == count:
        prefix, width, _ = info.name_pattern
        return f"{prefix}{info.frame_numbers[i]:0{width}d}.png"
    return f"{i:0{max(5, len(str(count - 1)))}d}.png"


def _encode_image(array: np.ndarray, suffix: str):
    """(ok, encoded bytes) of an RGB(A) frame in the format of ``suffix`` (OpenCV)."""
    import cv2

    if array.ndim == 3:  # OpenCV wants BGR(A)
        array = np.ascontiguousarray(array[:, :, [2, 1, 0, 3][: array.shape[2]]])
    return cv2.imencode(suffix, array)


def _ffmpeg_error():
    import av

    return av.error.FFmpegError


class _VideoFile:
    """One video stream encoded frame by frame into ``tmp``, the source's audio streams added at the start (the
    muxer needs every stream before the first packet) and muxed at the end."""

    def __init__(self, tmp: Path, info: ClipInfo, enc, node: str):
        import av

        suffix = tmp.suffix.lower()
        self.info, self.enc = info, enc
        self.sources = []
        container_options = {"movflags": "+faststart"} if suffix in (".mp4", ".m4v", ".mov") else {}
        self.output = av.open(str(tmp), mode="w", options=container_options)
        try:
            colour = info.colour
            stream = self.output.add_stream(enc.codec, rate=info.fps)
            stream.width, stream.height, stream.pix_fmt = info.width, info.height, enc.pix_fmt
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
            self.stream = stream
            self.write_audio, self.sources = _audio_writers(self.output, info, suffix, node)
        except BaseException:
            self.discard()
            raise

    def write(self, index: int, array: np.ndarray, fmt: str) -> None:
        import av

        colour = self.info.colour
        frame = av.VideoFrame.from_ndarray(array, format=fmt)
        frame = frame.reformat(
            format=self.enc.pix_fmt,
            dst_colorspace=colour.matrix if colour.matrix not in (0, 2) else None,
            dst_color_range=colour.range or None,
        )
        if colour.tagged:
            frame.color_primaries, frame.color_trc = colour.primaries, colour.transfer
            frame.colorspace, frame.color_range = colour.matrix, colour.range
        frame.pts = int(self.info.pts[index])
        frame.time_base = self.info.time_base
        self.output.mux(self.stream.encode(frame))

    def finish(self) -> None:
        try:
            self.output.mux(self.stream.encode(None))
            if self.write_audio is not None:
                self.write_audio()
            self.output.close()  # writes the trailer (and moves the mp4 index to the front)
        finally:
            self._close_sources()

    def discard(self) -> None:
        try:
            self.output.close()
        except Exception:  # the file is deleted next; a half-written trailer does not matter
            pass
        self._close_sources()

    def _close_sources(self) -> None:
        for source in self.sources:
            source.close()


class ClipWriter:
    """Writes a clip's frames to ``target`` (a checked ``media_out.OutputTarget``) in order as they arrive.

    ``info``: the clip being written (frame count, size, timestamps, colour, audio, folder names); ``enc``: its
    encoding for a video file (``media_out.choose_encoding``; chosen here when not given). Use it as a context
    manager: leaving the block normally closes it (the file appears under its final name), an exception aborts it
    (nothing appears and nothing is left). ``progress("write", done, total)`` follows every frame.
    """

    def __init__(self, target, info: ClipInfo, enc=None, node: str = "DiffuEraser", progress=None):
        self.target, self.info, self.node, self.progress = target, info, node, progress
        self.path: Path = target.path
        self.total = len(info.pts)
        self.written = 0
        self.state = "open"
        self._with_original: Optional[bool] = None
        self._tmp: Optional[Path] = None
        self.enc = enc
        self._video: Optional[_VideoFile] = None
        self._image: Optional[np.ndarray] = None
        kind = target.kind
        if kind != "video" and info.audio and info.kind == "video":
            log.warning("%s: '%s' holds no audio; the source's %d audio stream(s) are not written (use a video file "
                        "name to keep them)", node, self.path.name, len(info.audio))
        if kind == "image" and self.total != 1:
            raise InputError(
                f"{node}: '{self.path.name}' is an image name but there are {self.total} frames; give a video "
                "name (.mp4) or a folder name without a suffix"
            )
        if self.total < 1:
            raise InputError(f"{node}: internal error, a clip to write needs at least one frame")
        # PNG keeps the source's depth and alpha unless 8-bit RGB was asked for; other image formats are 8-bit
        self._keep_full = target.options.pix_fmt not in ("rgb24",) if kind == "folder" else (
            self.path.suffix.lower() in (".png", ".tif", ".tiff"))
        with self._guard():
            if kind == "folder":
                self._tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", suffix=".partial",
                                                  dir=self.path.parent))
            elif kind == "video":
                self.enc = self.enc or choose_codec(target.options, self.path.suffix, info, node)
                self._tmp = _temp_path(self.path, self.path.suffix.lower())
                self._video = _VideoFile(self._tmp, info, self.enc, node)

    def __enter__(self) -> "ClipWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False

    def write(self, start: int, frames: torch.Tensor, original: Optional[torch.Tensor] = None) -> None:
        """Frames ``start .. start + len(frames)`` (uint8 RGB ``[n,H,W,3]``; ``original``: the same frames at full
        depth / with alpha when the source has them), right after the frames written so far."""
        with self._guard():
            self._check_range(start, frames, original)
            frames = frames.cpu()
            original = original.cpu() if original is not None else None
            for i in range(int(frames.shape[0])):
                index = start + i
                if self._video is not None:
                    self._video.write(index, *_source_array(i, frames, original, self.enc.depth, self.enc.alpha))
                else:
                    array = original[i].numpy() if self._keep_full and original is not None else frames[i].numpy()
                    if self._tmp is not None:
                        name = _png_name(self.info, index, self.total)
                        ok, data = _encode_image(array, ".png")
                        if not ok:
                            raise InputError(f"{self.node}: PNG encoding failed for {name}")
                        data.tofile(str(self._tmp / name))
                    else:  # a single image: encoded on close, when it is known to be the only frame
                        self._image = array.copy()
                self.written = index + 1
                if self.progress is not None:
                    self.progress("write", self.written, self.total)

    def close(self) -> Path:
        """Finish the file once every frame has been written and move it over the target; returns its path."""
        if self.state == "closed":
            return self.path
        with self._guard():
            if self.written != self.total:
                raise InputError(
                    f"{self.node}: internal error, {self.written} of the clip's {self.total} frames were given to "
                    f"the writer; '{self.path.name}' was not written"
                )
            if self._video is not None:
                self._video.finish()
                os.replace(self._tmp, self.path)
            elif self._tmp is not None:
                self._replace_folder()
            else:
                ok, data = _encode_image(self._image, self.path.suffix.lower())
                if not ok:
                    raise InputError(f"{self.node}: cannot encode '{self.path.name}'")
                self._tmp = _temp_path(self.path, self.path.suffix)
                data.tofile(str(self._tmp))
                os.replace(self._tmp, self.path)
            self.state = "closed"
        return self.path

    def abort(self) -> None:
        """Drop everything written so far: the temporary file or folder goes, the target stays as it was."""
        if self.state != "open":
            return
        self.state = "aborted"
        if self._video is not None:
            self._video.discard()
        if self._tmp is not None:
            if self._tmp.is_dir():
                shutil.rmtree(self._tmp, ignore_errors=True)
            else:
                self._tmp.unlink(missing_ok=True)
        self._image = None

    # ----------------------------------------------------------------------------------------------------------

    @contextmanager
    def _guard(self):
        """Any failure aborts the writer; file-system and encoder errors become one-line InputErrors."""
        if self.state != "open":
            raise InputError(f"{self.node}: internal error, the writer of '{self.path.name}' is already {self.state}")
        try:
            yield
        except BaseException as exc:
            self.abort()
            if isinstance(exc, _ffmpeg_error()):
                raise InputError(f"{self.node}: FFmpeg could not write '{self.path.name}': {exc}") from exc
            if isinstance(exc, OSError):
                raise InputError(f"{self.node}: cannot write the output '{self.path}': {exc.strerror or exc}") from exc
            raise

    def _check_range(self, start: int, frames, original) -> None:
        node = self.node
        if not isinstance(frames, torch.Tensor) or frames.dtype != torch.uint8 or frames.dim() != 4 or (
                frames.shape[-1] != 3 or frames.shape[0] < 1):
            desc = f"{tuple(frames.shape)} {frames.dtype}" if isinstance(frames, torch.Tensor) else type(frames).__name__
            raise InputError(f"{node}: frames to write must be uint8 [T,H,W,3], got {desc}")
        stop = start + int(frames.shape[0])
        # ranges are taken strictly in order: reordering or dropping frames here would hide a bug upstream
        if start != self.written:
            raise InputError(f"{node}: internal error, frames {start}..{stop} given to the writer after frames "
                             f"0..{self.written}; each range must start where the last one ended")
        if stop > self.total:
            raise InputError(f"{node}: internal error, frames {start}..{stop} given to the writer of a clip of "
                             f"{self.total} frames")
        if (int(frames.shape[1]), int(frames.shape[2])) != (self.info.height, self.info.width):
            raise InputError(f"{node}: internal error, frames of {frames.shape[2]}x{frames.shape[1]} for a clip of "
                             f"{self.info.width}x{self.info.height}")
        if original is not None and tuple(original.shape[:3]) != tuple(frames.shape[:3]):
            raise InputError(f"{node}: internal error, original {tuple(original.shape)} vs frames {tuple(frames.shape)}")
        if self._with_original is None:
            self._with_original = original is not None
        elif self._with_original != (original is not None):
            raise InputError(f"{node}: internal error, the full-depth original was given for some frames only")

    def _replace_folder(self) -> None:
        target = self.path
        if target.exists():  # the old folder is moved aside first, so the new one takes its name in one rename
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            os.replace(target, old / target.name)
            os.replace(self._tmp, target)
            shutil.rmtree(old)
        else:
            os.replace(self._tmp, target)
