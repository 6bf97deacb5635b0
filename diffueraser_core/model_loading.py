"""The networks a removal needs, found in a ComfyUI-style models folder and loaded for the standalone runtime: shared
by the CLI (``remove``, ``batch``), the engines in ``jobs.py`` and each Ray worker. Below all of them, so none of
them imports another to load a network."""

from __future__ import annotations

import logging
import os
from typing import Optional

log = logging.getLogger(__name__)

PROG = "python -m diffueraser_core remove"
DIFFUSION_MODEL_KEYS = ("unet_main", "brushnet", "pcm_lora", "vae", "text_encoder")
PROPAINTER_MODEL_KEYS = ("raft", "flow_completion", "propainter")


def auto_device():
    from .runtime import default_device

    return default_device()


def default_models_dir() -> str:
    return os.environ.get("COMFYUI_MODELS_DIR") or os.path.join(os.getcwd(), "models")


def missing_line(key: str) -> str:
    from .model_files import MODEL_FILES_BY_KEY, expected_location

    entry = MODEL_FILES_BY_KEY[key]
    return f"  {key} ({entry.description}): missing; put it at {expected_location(key)}; published at {entry.published}"


def resolve_lora(found: dict, models_dir: str, lora: Optional[str]) -> Optional[str]:
    if lora is not None and lora.lower() == "none":
        return None
    if lora is None:
        return found.get("pcm_lora")
    for candidate in (lora, os.path.join(models_dir, "diffueraser", lora)):
        if os.path.isfile(candidate):
            return candidate
    from .errors import ModelFileError

    raise ModelFileError(f"{PROG}: --lora {lora!r} not found as a path nor in {os.path.join(models_dir, 'diffueraser')!r}")


def check_models(models_dir: str, prior_only: bool, lora: Optional[str]) -> dict:
    from .errors import ModelFileError
    from .model_files import find_model_files

    if not os.path.isdir(models_dir):
        raise ModelFileError(f"{PROG}: models folder {models_dir!r} does not exist (use --models DIR)")
    found = find_model_files(models_dir)
    needed = list(PROPAINTER_MODEL_KEYS)
    if not prior_only:
        needed += [k for k in DIFFUSION_MODEL_KEYS if not (k == "pcm_lora" and lora is not None)]
    missing = [k for k in needed if not found.get(k)]
    if missing:
        lines = [missing_line(key) for key in missing]
        raise ModelFileError(
            f"{PROG}: {len(missing)} model file(s) missing in {models_dir!r}:\n" + "\n".join(lines)
        )
    return found


def load_diffusion(found: dict, models_dir: str, args, runtime):
    return load_diffusion_models(found, resolve_lora(found, models_dir, args.lora), args.lora_strength, runtime)


def load_diffusion_models(found: dict, lora_path: Optional[str], lora_strength: float, runtime):
    """unet_main (+ PCM LoRA), BrushNet, the empty-prompt embedding and the VAE codec from resolved file paths
    (also each Ray worker's loader, diffueraser_core/distributed.py)."""
    from .models.checkpoints import load_brushnet, load_unet_main, network_file_bytes
    from .models.sd15_components import encode_prompt, load_text_encoder, load_vae
    from .pipeline import DiffuEraserModels, DiffusersVaeCodec
    from .schedule import scheduler_for_lora

    def device_for(family):
        # Built straight on the GPU when it fits: the weights then never take host RAM (the host-RAM budget
        # is the input video plus a few GB, and unet_main alone is 2.6 GB in half precision).
        return runtime.placement_device(network_file_bytes(found[family], family, runtime.dtype))

    unet = load_unet_main(found["unet_main"], dtype=runtime.dtype, device=device_for("unet_main"))
    if lora_path is not None:
        from .models.lora import apply_lora, read_lora

        apply_lora(unet, read_lora(lora_path), lora_strength)
        log.info("PCM LoRA %s applied at strength %g", lora_path, lora_strength)
    else:
        log.warning("no PCM LoRA: a few-step schedule without it gives poor results")
    brushnet = load_brushnet(found["brushnet"], dtype=runtime.dtype, device=device_for("brushnet"))
    text_encoder = load_text_encoder(found["text_encoder"])
    text_encoder.to(runtime.device, runtime.dtype_for(text_encoder))
    text = encode_prompt(text_encoder, "", runtime.device)
    del text_encoder
    vae = load_vae(found["vae"])
    models = DiffuEraserModels(unet=runtime.wrap(unet, "diffueraser_unet_main"),
                               brushnet=runtime.wrap(brushnet, "diffueraser_brushnet"),
                               scheduler=scheduler_for_lora(lora_path))
    codec = DiffusersVaeCodec(runtime.wrap(vae, "sd15_vae"), runtime)
    return models, codec, text


def load_propainter(found: dict, runtime):
    from .prior_propainter import load_propainter_nets

    return load_propainter_nets(None, runtime, found["raft"], found["flow_completion"], found["propainter"])
