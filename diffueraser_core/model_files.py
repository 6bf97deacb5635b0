"""Every model file the pack needs: where it goes in a ComfyUI ``models`` folder, which names are accepted, which
family it must be, and where it is published. Used by the CLI, the nodes and the doctor.

Layout (``models`` = ComfyUI's models folder, or ``--models DIR``)::

    diffueraser/diffuEraser/unet_main/  (or diffueraser/unet_main/)   config.json + diffusion_pytorch_model.*
    diffueraser/diffuEraser/brushnet/   (or diffueraser/brushnet/)    config.json + diffusion_pytorch_model.*
    diffueraser/pcm_sd15_*_converted.safetensors                      (loras/ is searched too)
    propainter/ProPainter.pth, recurrent_flow_completion.pth, raft-things.pth
    vae/vae-ft-mse-840000-ema-pruned.safetensors                      (or the diffusers folder vae/sd-vae-ft-mse/)
    text_encoders/ or clip/  clip_l.safetensors                       (SD1.5 text encoder = CLIP-L text model)
    checkpoints/v1-5-pruned-emaonly.safetensors                       (an SD1.5 checkpoint holds VAE + text encoder)

Only names are matched here (cheap); the doctor validates contents.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple


@dataclass(frozen=True)
class ModelFile:
    key: str
    description: str
    family: str  # what checkpoints.detect_family must say about it
    subfolder: str  # the ComfyUI models subfolder it belongs in
    # Accepted places, relative to the models folder, in order of preference; glob patterns allowed.
    candidates: Tuple[str, ...]
    kind: str  # "folder" (diffusers/transformers folder), "file", or "file_or_folder"
    published: str  # where to download it
    required: bool = True
    # Another registry key whose file can stand in for this one (an SD1.5 checkpoint holds the VAE and text encoder).
    fallback: Optional[str] = None
    # How to fetch the official file(s) when the user allows downloads: {"hf_repo", "hf_files", "hf_prefix"} for
    # Hugging Face, {"http"} for a plain HTTPS asset. None: not downloaded by the pack (ComfyUI loads it).
    download: Optional[dict] = None


HF_DIFFUERASER_REPO = "lixiaowen/diffuEraser"
HF_PCM_REPO = "wangfuyun/PCM_Weights"
PROPAINTER_RELEASE = "https://github.com/sczhou/ProPainter/releases/download/v0.1.0/"

# The reference pipeline runs the 2-step PCM LoRA (run_diffueraser ckpt="2-Step"); preferred among several.
DEFAULT_PCM_LORA = "pcm_sd15_smallcfg_2step_converted.safetensors"
PCM_LORA_PATTERN = "pcm_sd15_*_converted.safetensors"

MODEL_FILES: Tuple[ModelFile, ...] = (
    ModelFile(
        key="unet_main",
        description="DiffuEraser motion UNet (unet_main folder)",
        family="unet_main",
        subfolder="diffueraser",
        candidates=("diffueraser/diffuEraser/unet_main", "diffueraser/diffueraser/unet_main", "diffueraser/unet_main",
                    "diffueraser/diffuEraser_unet_main.safetensors", "diffueraser/unet_main.safetensors"),
        kind="file_or_folder",
        published="https://huggingface.co/lixiaowen/diffuEraser (folder unet_main/: config.json + "
                  "diffusion_pytorch_model.safetensors) -> models/diffueraser/diffuEraser/unet_main/",
        download={"hf_repo": HF_DIFFUERASER_REPO, "hf_prefix": "unet_main",
                  "hf_files": ("unet_main/config.json", "unet_main/diffusion_pytorch_model.safetensors")},
    ),
    ModelFile(
        key="brushnet",
        description="DiffuEraser BrushNet (brushnet folder)",
        family="brushnet",
        subfolder="diffueraser",
        candidates=("diffueraser/diffuEraser/brushnet", "diffueraser/diffueraser/brushnet", "diffueraser/brushnet",
                    "diffueraser/diffuEraser_brushnet.safetensors", "diffueraser/brushnet.safetensors"),
        kind="file_or_folder",
        published="https://huggingface.co/lixiaowen/diffuEraser (folder brushnet/: config.json + "
                  "diffusion_pytorch_model.safetensors) -> models/diffueraser/diffuEraser/brushnet/",
        download={"hf_repo": HF_DIFFUERASER_REPO, "hf_prefix": "brushnet",
                  "hf_files": ("brushnet/config.json", "brushnet/diffusion_pytorch_model.safetensors")},
    ),
    ModelFile(
        key="pcm_lora",
        description="PCM SD1.5 LoRA (few-step sampling)",
        family="pcm_lora",
        subfolder="diffueraser",
        candidates=(f"diffueraser/{DEFAULT_PCM_LORA}", f"diffueraser/{PCM_LORA_PATTERN}",
                    f"loras/{DEFAULT_PCM_LORA}", f"loras/{PCM_LORA_PATTERN}"),
        kind="file",
        published=f"https://huggingface.co/wangfuyun/PCM_Weights (sd15/{DEFAULT_PCM_LORA}, or another "
                  f"{PCM_LORA_PATTERN}) -> models/diffueraser/",
        download={"hf_repo": HF_PCM_REPO, "hf_prefix": "sd15", "hf_files": (f"sd15/{DEFAULT_PCM_LORA}",)},
    ),
    ModelFile(
        key="raft",
        description="RAFT optical flow",
        family="raft",
        subfolder="propainter",
        candidates=("propainter/raft-things.pth", "propainter/raft-things.safetensors"),
        kind="file",
        published="https://github.com/sczhou/ProPainter/releases/tag/v0.1.0 (raft-things.pth) -> models/propainter/",
        download={"http": PROPAINTER_RELEASE + "raft-things.pth"},
    ),
    ModelFile(
        key="flow_completion",
        description="ProPainter recurrent flow completion",
        family="flow_completion",
        subfolder="propainter",
        candidates=("propainter/recurrent_flow_completion.pth", "propainter/recurrent_flow_completion.safetensors"),
        kind="file",
        published="https://github.com/sczhou/ProPainter/releases/tag/v0.1.0 (recurrent_flow_completion.pth) "
                  "-> models/propainter/",
        download={"http": PROPAINTER_RELEASE + "recurrent_flow_completion.pth"},
    ),
    ModelFile(
        key="propainter",
        description="ProPainter InpaintGenerator",
        family="propainter",
        subfolder="propainter",
        candidates=("propainter/ProPainter.pth", "propainter/ProPainter.safetensors"),
        kind="file",
        published="https://github.com/sczhou/ProPainter/releases/tag/v0.1.0 (ProPainter.pth) -> models/propainter/",
        download={"http": PROPAINTER_RELEASE + "ProPainter.pth"},
    ),
    ModelFile(
        key="vae",
        description="SD1.5 VAE (sd-vae-ft-mse)",
        family="vae",
        subfolder="vae",
        # Known names only: vae/ usually also holds SDXL or Flux VAEs that must not be picked up by accident.
        candidates=("vae/vae-ft-mse-840000-ema-pruned.safetensors", "vae/vae-ft-mse-840000-ema-pruned.ckpt",
                    "vae/sd-vae-ft-mse", "vae/sd-vae-ft-mse*.safetensors", "vae/vae-ft-mse-*.safetensors",
                    "vae/vae-ft-ema-560000-ema-pruned.safetensors"),
        kind="file_or_folder",
        published="https://huggingface.co/stabilityai/sd-vae-ft-mse-original "
                  "(vae-ft-mse-840000-ema-pruned.safetensors) -> models/vae/",
        fallback="sd15_checkpoint",
    ),
    ModelFile(
        key="text_encoder",
        description="SD1.5 text encoder (CLIP-L text model)",
        family="clip_text",
        subfolder="text_encoders",
        candidates=("text_encoders/clip_l.safetensors", "clip/clip_l.safetensors", "text_encoders/clip_l*.safetensors",
                    "clip/clip_l*.safetensors", "text_encoders/sd15_text_encoder", "clip/sd15_text_encoder"),
        kind="file_or_folder",
        published="https://huggingface.co/comfyanonymous/flux_text_encoders (clip_l.safetensors) or "
                  "https://huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5 (text_encoder/) "
                  "-> models/text_encoders/",
        fallback="sd15_checkpoint",
    ),
    ModelFile(
        key="sd15_checkpoint",
        description="SD1.5 checkpoint (only needed when the VAE or text encoder is not kept separately)",
        family="sd15_checkpoint",
        subfolder="checkpoints",
        candidates=("checkpoints/v1-5-pruned-emaonly.safetensors", "checkpoints/v1-5-pruned-emaonly-fp16.safetensors",
                    "checkpoints/v1-5-pruned*.safetensors", "checkpoints/*sd15*.safetensors",
                    "checkpoints/*sd-v1-5*.safetensors", "checkpoints/*v1-5*.safetensors"),
        kind="file",
        published="https://huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5 "
                  "(v1-5-pruned-emaonly.safetensors) -> models/checkpoints/",
        required=False,
    ),
)

MODEL_FILES_BY_KEY: Dict[str, ModelFile] = {entry.key: entry for entry in MODEL_FILES}


def _matches(models_dir: str, pattern: str, kind: str) -> List[str]:
    full = os.path.join(models_dir, pattern)
    paths = sorted(glob.glob(full)) if glob.has_magic(pattern) else ([full] if os.path.exists(full) else [])
    if kind == "folder":
        return [p for p in paths if os.path.isdir(p)]
    if kind == "file":
        return [p for p in paths if os.path.isfile(p)]
    return paths


def find_candidates(models_dir: str, key: str) -> List[str]:
    """Every path that fits ``key``'s accepted names, best first (no duplicates)."""
    entry = MODEL_FILES_BY_KEY[key]
    found: List[str] = []
    for pattern in entry.candidates:
        for path in _matches(os.fspath(models_dir), pattern, entry.kind):
            if path not in found:
                found.append(path)
    return found


def find_model_file(models_dir: str, key: str, use_fallback: bool = True) -> Optional[str]:
    """The preferred path for ``key``; the fallback entry's path (an SD1.5 checkpoint) when there is none."""
    found = find_candidates(models_dir, key)
    if found:
        return found[0]
    fallback = MODEL_FILES_BY_KEY[key].fallback
    if use_fallback and fallback:
        return find_model_file(models_dir, fallback, use_fallback=False)
    return None


def find_model_files(models_dir: str) -> Dict[str, Optional[str]]:
    """``{key: path or None}`` for every registry entry. ``vae`` and ``text_encoder`` point at the SD1.5 checkpoint
    when they are not kept separately (the loaders in models/sd15_components.py read them from it)."""
    return {entry.key: find_model_file(models_dir, entry.key) for entry in MODEL_FILES}


def list_pcm_loras(models_dir: str) -> List[str]:
    """File names of the PCM LoRAs present (for a node's choice list), the reference default first."""
    return [os.path.basename(p) for p in find_candidates(models_dir, "pcm_lora")]


def expected_location(key: str) -> str:
    """The first accepted place, for messages."""
    return MODEL_FILES_BY_KEY[key].candidates[0]
