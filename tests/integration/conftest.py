"""Session fixture: one real ComfyUI server on 127.0.0.1 with this pack in custom_nodes and random weights.

Skipped unless COMFYUI_DIR points at a ComfyUI checkout (a folder with main.py). COMFYUI_PYTHON selects the
interpreter that runs it (default: the one running pytest). Nothing heavy happens at import or collection time.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil
import sys
from typing import Dict

import numpy as np
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
COMFYUI_DIR_ENV = "COMFYUI_DIR"
COMFYUI_PYTHON_ENV = "COMFYUI_PYTHON"

# Input clips (even sides for yuv420p; ProPainter's RAFT needs 64 px after the workflows' resize_ratio 0.6, so
# >= 112; the hole leaves room for kept pixels outside every dilation + feather). SHORT runs each shipped workflow
# as shipped. MEDIUM is longer than two windows of the smaller window_length the pre-inference test sets (the
# shipped 22-frame windows would need > 44 frames: minutes of full-size VAE work on a shared CPU).
SHORT_CLIP = dict(num_frames=8, height=112, width=144)
MEDIUM_CLIP = dict(num_frames=14, height=112, width=112)


def comfyui_dir() -> str:
    return os.environ.get(COMFYUI_DIR_ENV, "")


def comfyui_available() -> bool:
    path = comfyui_dir()
    return bool(path) and os.path.isfile(os.path.join(path, "main.py"))


@dataclasses.dataclass
class Clip:
    """Input files written into <base>/input and what they contain."""

    video: str  # file name inside the input folder (what LoadVideo's widget takes)
    mask_video: str
    mask_png: str  # one mask for every frame: the hole of frame 0
    frames: np.ndarray  # uint8 [T,H,W,3] as written
    holes: np.ndarray  # bool [T,H,W]


@dataclasses.dataclass
class ComfyHost:
    server: object  # comfyui_harness.ComfyServer
    base_dir: str
    input_dir: str
    output_dir: str
    pack_dir: str
    clips: Dict[str, Clip]
    object_info: dict


def _write_clip(input_dir: str, name: str, num_frames: int, height: int, width: int) -> Clip:
    import comfyui_harness as harness

    frames = harness.make_frames(num_frames, height, width)
    holes = harness.make_holes(num_frames, height, width)
    clip = Clip(video=f"{name}_video.mp4", mask_video=f"{name}_mask.mp4", mask_png=f"{name}_mask.png",
                frames=frames, holes=holes)
    harness.write_video(os.path.join(input_dir, clip.video), frames)
    white = np.repeat((holes * 255).astype(np.uint8)[..., None], 3, axis=-1)
    harness.write_video(os.path.join(input_dir, clip.mask_video), white)
    harness.write_mask_png(os.path.join(input_dir, clip.mask_png), holes[0])
    # Every frame of the still-mask clip has the hole of frame 0: the PNG mask then says what the video shows.
    return clip


@pytest.fixture(scope="session")
def comfy_host(tmp_path_factory):
    if not comfyui_available():
        pytest.skip(f"{COMFYUI_DIR_ENV} does not point at a ComfyUI checkout (a folder with main.py)")
    import comfyui_harness as harness

    base = tmp_path_factory.mktemp("comfyui_base")
    custom_nodes, models, input_dir, output_dir = (base / "custom_nodes", base / "models", base / "input",
                                                   base / "output")
    for folder in (custom_nodes, models, input_dir, output_dir, base / "temp", base / "user"):
        folder.mkdir(parents=True, exist_ok=True)
    pack_dir = custom_nodes / harness.PACK_DIR_NAME
    os.symlink(REPO_ROOT, pack_dir, target_is_directory=True)
    harness.build_models(str(models))
    clips = {
        "short": _write_clip(str(input_dir), "short", **SHORT_CLIP),
        "medium": _write_clip(str(input_dir), "medium", **MEDIUM_CLIP),
    }
    server = harness.ComfyServer(comfyui_dir(), os.environ.get(COMFYUI_PYTHON_ENV) or sys.executable, str(base),
                                 str(base / "comfyui.log"))
    try:
        server.start()
        host = ComfyHost(server=server, base_dir=str(base), input_dir=str(input_dir), output_dir=str(output_dir),
                         pack_dir=str(pack_dir), clips=clips, object_info=server.get_json("/object_info"))
        yield host
    finally:
        server.stop()
        # ~1 GB of random weights: not kept with the log and outputs in pytest's retained temp folders.
        shutil.rmtree(models, ignore_errors=True)
