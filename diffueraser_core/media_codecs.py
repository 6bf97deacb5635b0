"""Output codecs: what each container takes, the defaults, and the codec / pixel format chosen for a clip.

See ``media_out`` for the defaults in words; ``OutputOptions`` is what ``--codec``, ``--crf``, ``--pix-fmt`` and
``--match-input`` set.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

from .clip import ClipInfo
from .errors import InputError

log = logging.getLogger(__name__)

DEFAULT_CODEC = "libx264"
#: x264/x265 constant rate factor (18 ~ visually lossless)
DEFAULT_CRF = 18
DEFAULT_PIX_FMT = "yuv420p"
#: video encoders each container accepts here
CONTAINER_CODECS = {
    ".mp4": {"libx264", "libx265", "libvpx-vp9"},
    ".m4v": {"libx264"},
    ".mov": {"libx264", "libx265", "prores_ks", "png", "qtrle"},
    ".mkv": {"libx264", "libx265", "prores_ks", "ffv1", "libvpx-vp9"},
}
WRITABLE_VIDEO_SUFFIXES = set(CONTAINER_CODECS)
#: codecs whose quality is set by crf, and its range
CRF_CODECS = {"libx264": (0, 51), "libx265": (0, 51), "libvpx-vp9": (0, 63)}
#: decoder name -> the encoder that writes it ("match the input")
ENCODER_FOR = {"h264": "libx264", "hevc": "libx265", "prores": "prores_ks", "ffv1": "ffv1", "png": "png",
               "vp9": "libvpx-vp9", "libvpx-vp9": "libvpx-vp9", "qtrle": "qtrle"}
#: audio codecs each container takes as they are (stream copy); Matroska takes any. FFmpeg's mp4 muxer would take
#: PCM too, but few players play PCM in mp4, so it is re-encoded to AAC there (.mov keeps it)
AUDIO_COPY = {
    ".mp4": {"aac", "mp3", "alac", "ac3", "eac3", "opus", "flac"},
    ".m4v": {"aac", "mp3", "alac", "ac3", "eac3"},
    ".mov": {"aac", "mp3", "alac", "ac3", "eac3", "pcm_s16le", "pcm_s16be", "pcm_s24le", "pcm_s24be", "pcm_s32le",
             "pcm_f32le", "pcm_f32be", "pcm_u8"},
}
#: codecs that refuse odd sides in chroma-subsampled formats
EVEN_SIDE_CODECS = {"libx264", "libx265"}


@dataclass
class OutputOptions:
    """How to encode: ``codec``/``crf``/``pix_fmt`` None = the default for the container and source (module doc)."""

    codec: Optional[str] = None
    crf: Optional[int] = None
    pix_fmt: Optional[str] = None
    match_input: bool = False


@dataclass
class Encoding:
    codec: str
    pix_fmt: str
    crf: Optional[int]
    depth: int
    alpha: bool


def check_codec_options(options: OutputOptions, suffix: str, node: str) -> None:
    import av

    if options.codec is not None:
        if options.codec not in av.codecs_available:
            raise InputError(f"{node}: --codec {options.codec!r} is not available in this FFmpeg build")
        if options.codec not in CONTAINER_CODECS[suffix]:
            raise InputError(
                f"{node}: --codec {options.codec!r} cannot be written to {suffix}; {suffix} takes "
                f"{', '.join(sorted(CONTAINER_CODECS[suffix]))}"
            )
    codec = options.codec or DEFAULT_CODEC
    if options.crf is not None:
        if codec not in CRF_CODECS:
            raise InputError(f"{node}: --crf applies to {', '.join(sorted(CRF_CODECS))}, not {codec}")
        lo, hi = CRF_CODECS[codec]
        if not lo <= int(options.crf) <= hi:
            raise InputError(f"{node}: --crf must be in {lo}..{hi} for {codec}, got {options.crf}")
    if options.pix_fmt is not None and not options.match_input:
        formats = {f.name for f in (av.codec.Codec(codec, "w").video_formats or [])}
        if options.pix_fmt not in formats:
            raise InputError(f"{node}: --pix-fmt {options.pix_fmt!r} is not one {codec} writes; it writes "
                             f"{', '.join(sorted(formats))}")


# --------------------------------------------------------------------------------------------------------------
# choosing the encoding


def _format_depth_alpha(name: str):
    import av

    fmt = av.VideoFormat(name)
    return max(c.bits for c in fmt.components), any(c.is_alpha for c in fmt.components), fmt


def _default_pix_fmt(codec: str, depth: int, alpha: bool) -> str:
    high = depth > 8
    if codec == "ffv1":
        return ("rgba64le" if high else "bgra") if alpha else ("rgb48le" if high else "bgr0")
    if codec == "prores_ks":
        return "yuva444p10le" if alpha else "yuv422p10le"
    if codec == "png":
        return ("rgba64be" if high else "rgba") if alpha else ("rgb48be" if high else "rgb24")
    if codec == "qtrle":
        return "argb" if alpha else "rgb24"
    if codec == "libvpx-vp9":
        return "yuva420p" if alpha else "yuv420p"
    return DEFAULT_PIX_FMT


def choose_codec(options: OutputOptions, suffix: str, info: ClipInfo, node: str = "DiffuEraser") -> Encoding:
    """The codec and pixel format for ``info``'s frames in a ``suffix`` file; warns when depth or alpha cannot be
    kept, refuses odd sides in 4:2:0 H.264/HEVC."""
    import av

    suffix = suffix.lower()
    codec = options.codec
    pix_fmt = options.pix_fmt
    if options.match_input:
        source = ENCODER_FOR.get(info.codec)
        if codec is None:
            if source is None or source not in CONTAINER_CODECS[suffix] or source not in av.codecs_available:
                raise InputError(
                    f"{node}: --match-input: the source codec {info.codec!r} cannot be written to {suffix}; give "
                    f"--codec (one of {', '.join(sorted(CONTAINER_CODECS[suffix]))})"
                )
            codec = source
        formats = {f.name for f in (av.codec.Codec(codec, "w").video_formats or [])}
        if pix_fmt is None and info.pix_fmt in formats and info.kind == "video":
            pix_fmt = info.pix_fmt
    codec = codec or DEFAULT_CODEC
    pix_fmt = pix_fmt or _default_pix_fmt(codec, info.bit_depth, info.has_alpha)
    depth, alpha, fmt = _format_depth_alpha(pix_fmt)
    if info.bit_depth > depth:
        log.warning("%s: the source has %d bits per sample but %s %s keeps %d; --codec ffv1 (.mkv) or a PNG "
                    "folder keeps them", node, info.bit_depth, codec, pix_fmt, depth)
    if info.has_alpha and not alpha:
        log.warning("%s: the source has an alpha channel that %s %s cannot hold; it is dropped (use --match-input, "
                    "--codec prores_ks/png/ffv1 in .mov/.mkv, or a PNG folder to keep it)", node, codec, pix_fmt)
    odd = info.width % 2 or info.height % 2
    if odd and codec in EVEN_SIDE_CODECS and any(tag in fmt.name for tag in ("420", "422", "411", "410", "440", "nv")):
        raise InputError(
            f"{node}: frames of {info.width}x{info.height} have an odd side, which {codec} {pix_fmt} cannot hold; "
            "to keep the exact size choose --pix-fmt yuv444p (some players cannot show it), --codec ffv1 with a "
            ".mkv output, or a PNG folder"
        )
    crf = options.crf if options.crf is not None else (DEFAULT_CRF if codec in CRF_CODECS else None)
    return Encoding(codec, pix_fmt, crf, max(depth, 8), alpha and info.has_alpha)
