"""Inputs of the recorded-reference run: the synthetic clip, the settings and the random weights.

Shared by the recorder (``record.py``, run once in a separate environment with the official code) and by
``tests/test_reference_fidelity.py`` (run in CI with our code). Everything here is deterministic: the clip is
a closed-form function of the frame number and the weights come from the project's own generator with a fixed
seed, so CI rebuilds bit for bit what the recorder used.

The clip reaches every branch of both stages: 60 frames (> 2 x 22, so pre-inference runs, and 60 is a length where
``int(i * (N / 22))`` differs from ``i * N // 22``), more than ``SUBVIDEO_LENGTH`` frames (chunked flow completion,
pre-propagation of sampled frames, chunked image propagation, a limited reference-frame count in the transformer),
four sampling windows per step with both window lists. 256x64 keeps DiffuEraser's 256-pixel minimum and RAFT's
64-pixel minimum at ``RESIZE_RATIO`` 1, so no resize runs anywhere and every stage can be compared pixel for pixel.
"""

from __future__ import annotations

import json
import math
import os
from typing import Dict, Tuple

import torch

NUM_FRAMES = 60
HEIGHT, WIDTH = 64, 256
FPS = 10
SEED = 1234
#: the square the mask covers, moving left to right on a sine path
SQUARE = 14

# ProPainter settings (small, non-default, so the chunked branches run on a short clip)
RESIZE_RATIO = 1.0
MASK_DILATION = 4  # run_diffueraser passes one dilation to both stages
REF_STRIDE = 10
NEIGHBOR_LENGTH = 10
SUBVIDEO_LENGTH = 20
RAFT_ITER = 4
# DiffuEraser settings (run_diffueraser's: 2-Step PCM, guidance 0, 22-frame windows)
STEPS = 2
WINDOW_LENGTH = 22
MAX_IMG_SIZE = 960
PCM_CHECKPOINT = "2-Step"

#: the official folder layouts the reference loads, under the weights root
OFFICIAL_BASE = os.path.join("official", "stable-diffusion-v1-5")
OFFICIAL_VAE = os.path.join("official", "sd-vae-ft-mse")
OFFICIAL_PCM_DIR = os.path.join("official", "weights", "PCM_Weights", "sd15")  # the reference's cwd is "official"

# The SD1.5 scheduler config (stable-diffusion-v1-5/scheduler/scheduler_config.json); the reference uses its betas.
SD15_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}


def synthetic_clip() -> Tuple[torch.Tensor, torch.Tensor]:
    """Frames uint8 ``[60,64,256,3]`` (a background panning 2 px a frame, a square crossing it) and masks bool
    ``[60,64,256]`` (the square)."""
    t = torch.arange(NUM_FRAMES, dtype=torch.float64).view(-1, 1, 1)
    yy = torch.arange(HEIGHT, dtype=torch.float64).view(1, -1, 1)
    xx = torch.arange(WIDTH, dtype=torch.float64).view(1, 1, -1)
    x = xx + 2.0 * t
    background = torch.stack(
        [
            127 + 90 * torch.sin(x / 9.0) + 20 * torch.cos(yy / 4.0),
            127 + 80 * torch.cos(yy / 6.0 + x / 23.0),
            127 + 60 * torch.sin((x + 2 * yy) / 13.0),
        ],
        dim=-1,
    )
    frames = background.round().clamp(0, 255).to(torch.uint8).contiguous()
    masks = torch.zeros(NUM_FRAMES, HEIGHT, WIDTH, dtype=torch.bool)
    for i in range(NUM_FRAMES):
        x0 = 20 + int(200 * i / (NUM_FRAMES - 1))
        y0 = int((HEIGHT - SQUARE) / 2 + 12 * math.sin(i / 5.0))
        frames[i, y0 : y0 + SQUARE, x0 : x0 + SQUARE] = torch.tensor([220, 40, 200], dtype=torch.uint8)
        masks[i, y0 : y0 + SQUARE, x0 : x0 + SQUARE] = True
    return frames, masks


# The prior stage is checked on its own smaller clip: the 64-pixel-high main clip gives RAFT a 1-pixel coarsest
# correlation level, where the reference's sampler divides by (width - 1) = 0 and every flow is NaN (its prior is
# then black inside the hole; ours stays finite on purpose). 128x128 keeps two pixels there.
PRIOR_FRAMES = 16
PRIOR_HEIGHT, PRIOR_WIDTH = 128, 128
PRIOR_SUBVIDEO_LENGTH = 6  # 15 flows > 6: chunked completion; 16 frames > 6: pre-propagation, chunked propagation
PRIOR_NEIGHBOR_LENGTH = 6
PRIOR_REF_STRIDE = 3


def prior_clip() -> Tuple[torch.Tensor, torch.Tensor]:
    """Frames uint8 ``[16,128,128,3]`` and masks bool ``[16,128,128]``: the main clip's recipe on a square frame
    (background panning 2 px a frame, a 24-pixel square moving diagonally)."""
    t = torch.arange(PRIOR_FRAMES, dtype=torch.float64).view(-1, 1, 1)
    yy = torch.arange(PRIOR_HEIGHT, dtype=torch.float64).view(1, -1, 1)
    xx = torch.arange(PRIOR_WIDTH, dtype=torch.float64).view(1, 1, -1)
    x = xx + 2.0 * t
    background = torch.stack(
        [
            127 + 90 * torch.sin(x / 9.0) + 20 * torch.cos(yy / 4.0),
            127 + 80 * torch.cos(yy / 6.0 + x / 23.0),
            127 + 60 * torch.sin((x + 2 * yy) / 13.0),
        ],
        dim=-1,
    )
    frames = background.round().clamp(0, 255).to(torch.uint8).contiguous()
    masks = torch.zeros(PRIOR_FRAMES, PRIOR_HEIGHT, PRIOR_WIDTH, dtype=torch.bool)
    side = 24
    for i in range(PRIOR_FRAMES):
        x0 = 10 + 5 * i
        y0 = 20 + 4 * i
        frames[i, y0 : y0 + side, x0 : x0 + side] = torch.tensor([220, 40, 200], dtype=torch.uint8)
        masks[i, y0 : y0 + side, x0 : x0 + side] = True
    return frames, masks


def _write_json(path: str, data) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)


def write_weights(root: str, official: bool = False) -> Dict[str, str]:
    """Random tiny weights (seed ``SEED``) in ComfyUI's layout under ``root``; with ``official`` also the folders
    the official code loads (diffusers VAE folder, SD1.5 base folder with tokenizer, text encoder and scheduler,
    the PCM LoRA under weights/PCM_Weights/sd15), built from the same seeds so both sides hold the same numbers."""
    from diffueraser_core.random_weights import PCM_LORA_FILE, make_models_folder, sd15

    # the generator writes the official config keys and the safetensors "format" tag the official code needs
    paths = make_models_folder(root, size="tiny", seed=SEED)
    if not official:
        return paths
    # make_models_folder's seeds: VAE seed + 2, text encoder seed + 3
    vae_dir = os.path.join(root, OFFICIAL_VAE)
    sd15.save_vae(vae_dir, seed=SEED + 2, layout="diffusers")
    base = os.path.join(root, OFFICIAL_BASE)
    sd15.save_text_encoder(os.path.join(base, "text_encoder"), seed=SEED + 3, layout="folder")
    _write_json(os.path.join(base, "scheduler", "scheduler_config.json"), SD15_SCHEDULER_CONFIG)
    # The empty prompt only needs the two special tokens (SD1.5's ids); the slow CLIP tokenizer reads these files.
    _write_json(os.path.join(base, "tokenizer", "vocab.json"), {"<|startoftext|>": 49406, "<|endoftext|>": 49407})
    with open(os.path.join(base, "tokenizer", "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
    _write_json(os.path.join(base, "tokenizer", "tokenizer_config.json"),
                {"model_max_length": 77, "tokenizer_class": "CLIPTokenizer", "do_lower_case": True})
    _write_json(
        os.path.join(base, "model_index.json"),
        {
            "_class_name": "StableDiffusionPipeline",
            "feature_extractor": [None, None],
            "safety_checker": [None, None],
            "requires_safety_checker": False,
            "scheduler": ["diffusers", "PNDMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        },
    )
    pcm_dir = os.path.join(root, OFFICIAL_PCM_DIR)
    os.makedirs(pcm_dir, exist_ok=True)
    os.link(os.path.join(root, PCM_LORA_FILE), os.path.join(pcm_dir, os.path.basename(PCM_LORA_FILE)))
    paths.update(official_base=base, official_vae=vae_dir, official_cwd=os.path.join(root, "official"))
    return paths


def main(argv=None) -> int:
    """``python -m tests.reference_run.inputs DIR``: write the clip (clip.pt) and the weights for the recorder."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("directory")
    args = parser.parse_args(argv)
    out = os.path.abspath(args.directory)
    os.makedirs(out, exist_ok=True)
    frames, masks = synthetic_clip()
    torch.save({"frames": frames, "masks": masks, "fps": FPS}, os.path.join(out, "clip.pt"))
    frames, masks = prior_clip()
    torch.save({"frames": frames, "masks": masks, "fps": FPS}, os.path.join(out, "prior_clip.pt"))
    paths = write_weights(os.path.join(out, "models"), official=True)
    _write_json(os.path.join(out, "paths.json"), paths)
    print(json.dumps(paths, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
