"""Small test media made with real encoders through PyAV (64x48, a few frames): the media test matrix's inputs."""

from __future__ import annotations

from fractions import Fraction
from typing import Optional, Sequence

import av
import numpy as np

W, H = 64, 48


def pattern(t: int, h: int = H, w: int = W, depth: int = 8, alpha: bool = False, seed: int = 0) -> np.ndarray:
    """Smooth moving colour gradients plus a little noise, uint8 or uint16 ``[t,h,w,3|4]``."""
    rng = np.random.default_rng(seed)
    ys, xs = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    out = np.empty((t, h, w, 4 if alpha else 3), np.float64)
    for i in range(t):
        out[i, ..., 0] = 0.15 + 0.7 * ((xs + 0.05 * i) % 1.0)
        out[i, ..., 1] = 0.15 + 0.7 * ys
        out[i, ..., 2] = 0.5 + 0.3 * np.sin(6 * xs + i)
        if alpha:
            out[i, ..., 3] = 0.2 + 0.8 * ys
    out += rng.uniform(-0.01, 0.01, out.shape)
    top = 65535 if depth > 8 else 255
    return np.clip(np.round(out * top), 0, top).astype(np.uint16 if depth > 8 else np.uint8)


def write_media(
    path,
    frames: np.ndarray,
    codec: str = "libx264",
    pix_fmt: str = "yuv420p",
    fps=25,
    pts: Optional[Sequence[int]] = None,
    time_base: Optional[Fraction] = None,
    rotation: int = 0,
    colour: Optional[dict] = None,
    audio: Optional[str] = None,
    audio_seconds: Optional[float] = None,
    options: Optional[dict] = None,
    container_options: Optional[dict] = None,
):
    """Encode ``frames`` (uint8 rgb24/rgba or uint16 rgb48/rgba64) with ``codec``; optional per-frame ``pts`` in
    ``time_base``, a display-matrix ``rotation`` (counter-clockwise degrees), colour tags and a tone in ``audio``."""
    fps = Fraction(fps)
    time_base = time_base or 1 / fps
    pts = list(pts) if pts is not None else [int(round(i / fps / time_base)) for i in range(len(frames))]
    with av.open(str(path), "w", options=container_options or {}) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        stream.codec_context.time_base = time_base
        stream.time_base = time_base
        if options:
            stream.options = options
        if rotation:
            stream.set_display_rotation(rotation)
        if colour:
            for key, value in colour.items():
                setattr(stream.codec_context, key, value)
        astream = None
        if audio is not None:
            astream = out.add_stream(audio, rate=16000)
            astream.layout = "stereo" if audio.startswith("pcm") else "mono"
        fmt = {(False, 3): "rgb24", (False, 4): "rgba", (True, 3): "rgb48le", (True, 4): "rgba64le"}[
            (frames.dtype == np.uint16, frames.shape[3])
        ]
        for i, array in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format=fmt)
            if colour:
                frame = frame.reformat(format=pix_fmt, dst_colorspace=colour.get("colorspace"),
                                       dst_color_range=colour.get("color_range"))
                for key, value in colour.items():
                    setattr(frame, key, value)
            frame.pts = pts[i]
            frame.time_base = time_base
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
        if astream is not None:
            seconds = audio_seconds if audio_seconds is not None else float((pts[-1] - pts[0]) * time_base) + 1 / fps
            total = int(seconds * 16000)
            for start in range(0, total, 1024):
                n = min(1024, total - start)
                tone = 0.2 * np.sin(2 * np.pi * 440 * np.arange(start, start + n) / 16000)
                if audio.startswith("pcm"):
                    data = np.repeat((tone * 32767).astype(np.int16), 2)[None]
                    af = av.AudioFrame.from_ndarray(data, format="s16", layout="stereo")
                else:
                    af = av.AudioFrame.from_ndarray(tone.astype(np.float32)[None], format="fltp", layout="mono")
                af.sample_rate, af.pts = 16000, start
                out.mux(astream.encode(af))
            out.mux(astream.encode(None))
    return path


def stream_info(path):
    """(codec, pix_fmt, colour tags, display rotation of the first frame, pts list, audio codecs)."""
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        cc = v.codec_context
        tags = dict(color_range=int(cc.color_range), colorspace=int(cc.colorspace),
                    color_primaries=int(cc.color_primaries), color_trc=int(cc.color_trc))
        frames = list(c.decode(v))
        pts = [f.pts * v.time_base for f in frames]
        rotation = frames[0].rotation if frames else 0
        audio = [a.codec_context.name for a in c.streams.audio]
        pix_fmt = frames[0].format.name
        profile = v.profile
    return dict(codec=cc.name, pix_fmt=pix_fmt, tags=tags, rotation=rotation, pts=pts, audio=audio,
                profile=profile)


def audio_packets(path):
    with av.open(str(path)) as c:
        a = c.streams.audio[0]
        return [(bytes(p), p.pts * a.time_base if p.pts is not None else None) for p in c.demux(a) if p.size]
