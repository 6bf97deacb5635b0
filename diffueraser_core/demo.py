"""``python -m diffueraser_core demo DIR``: the whole removal on a synthetic clip with tiny random weights.

Proves an installation end to end without downloading anything: it writes DIR/input.mp4 (a moving square over a
textured background), DIR/masks/ (one PNG per frame), a ComfyUI-style DIR/models/ folder with random weights in
the official layouts, then runs the same command a user runs on real files and prints it. The output is noise
inside the mask (random weights); every pixel outside the mask equals the input's.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from fractions import Fraction

import torch

DEMO_FRAMES = 30
DEMO_SIZE = (96, 160)  # height, width
DEMO_FPS = Fraction(24000, 1001)
SQUARE = 24


def synthetic_clip(num_frames: int = DEMO_FRAMES, size=DEMO_SIZE):
    """Frames uint8 [T,H,W,3] with a square moving left to right, and its masks bool [T,H,W]."""
    h, w = size
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    background = torch.stack(
        [
            127 + 100 * torch.sin(xx / 7.0),
            127 + 100 * torch.cos(yy / 5.0),
            127 + 60 * torch.sin((xx + yy) / 11.0),
        ],
        dim=-1,
    )
    frames = background.round().clamp(0, 255).to(torch.uint8).repeat(num_frames, 1, 1, 1)
    masks = torch.zeros(num_frames, h, w, dtype=torch.bool)
    for t in range(num_frames):
        x0 = int((w - SQUARE) * t / max(1, num_frames - 1))
        y0 = int((h - SQUARE) / 2 + 10 * math.sin(t / 4.0))
        frames[t, y0:y0 + SQUARE, x0:x0 + SQUARE] = torch.tensor([230, 30, 30], dtype=torch.uint8)
        masks[t, y0:y0 + SQUARE, x0:x0 + SQUARE] = True
    return frames, masks


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffueraser_core demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", nargs="?", default="demo_out")
    args = parser.parse_args(argv)

    from . import cli
    from .random_weights import make_models_folder
    from .media_out import write_video

    out = os.path.abspath(args.directory)
    os.makedirs(out, exist_ok=True)
    frames, masks = synthetic_clip()
    video_path = os.path.join(out, "input.mp4")
    masks_path = os.path.join(out, "masks")
    write_video(video_path, frames, DEMO_FPS)
    write_video(masks_path, masks.to(torch.uint8).mul(255)[..., None].expand(-1, -1, -1, 3).contiguous(), DEMO_FPS)
    models = os.path.join(out, "models")
    if not os.path.isdir(os.path.join(models, "diffueraser")):
        print(f"writing tiny random models to {models}", file=sys.stderr)
        make_models_folder(models, size="tiny")
    output = os.path.join(out, "output.mp4")
    command = [video_path, masks_path, output, "--models", models, "--seed", "0"]
    print("python -m diffueraser_core remove " + " ".join(command), file=sys.stderr)
    return cli.main(command)


if __name__ == "__main__":
    sys.exit(main())
