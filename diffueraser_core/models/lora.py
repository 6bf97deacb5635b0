"""PCM LoRA for the motion UNet: read kohya or diffusers/peft files, compute weight deltas, apply them.

DiffuEraser loads the PCM SD1.5 LoRA into unet_main only (2D modules; never motion modules, never BrushNet) as an
unfused PEFT adapter: W' = W + strength * alpha / rank * up @ down. The deltas returned by ``lora_deltas`` are what a
host patcher (ComfyUI's ModelPatcher) needs; ``apply_lora`` adds them in place.

Normalised form (``read_lora`` / ``normalise_lora``): the kohya layout with diffusers module paths flattened
(``.`` -> ``_``) and an explicit alpha for every module::

    lora_unet_<module path with . -> _>.lora_down.weight   [rank, in(, kh, kw)]
    lora_unet_<module path with . -> _>.lora_up.weight     [out, rank(, 1, 1)]
    lora_unet_<module path with . -> _>.alpha              scalar (rank when the file has none: scale 1)
"""

from __future__ import annotations

import logging
from typing import Dict, List, Mapping, Tuple

import torch
from torch import nn

from ..errors import ModelFileError
from .checkpoints import detect_family, read_state_dict

logger = logging.getLogger(__name__)

WHAT = "PCM LoRA"
KOHYA_UNET_PREFIX = "lora_unet_"
DOWN, UP, ALPHA = ".lora_down.weight", ".lora_up.weight", ".alpha"
# Modules the PCM LoRA must never touch: the AnimateDiff temporal layers inside unet_main.
EXCLUDED_MODULE_PART = "motion_modules"
# Text-encoder LoRA keys (kohya and diffusers): DiffuEraser uses no text-encoder LoRA, so they are skipped.
TEXT_ENCODER_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_", "text_encoder.", "text_encoder_2.")
# Where peft/diffusers files put the UNet module path (longest first).
PEFT_PREFIXES = ("base_model.model.unet.", "base_model.model.", "unet.")
PEFT_SUFFIXES = {
    ".lora_A.weight": DOWN,
    ".lora_B.weight": UP,
    ".lora_A.default.weight": DOWN,
    ".lora_B.default.weight": UP,
}


def read_lora(path: str) -> Dict[str, torch.Tensor]:
    """Read a LoRA file (safetensors or safe torch file) into the normalised kohya form (see module doc)."""
    state_dict = read_state_dict(path, WHAT)
    return normalise_lora(state_dict, source=repr(path))


def normalise_lora(state_dict: Mapping[str, torch.Tensor], source: str = "state dict") -> Dict[str, torch.Tensor]:
    """kohya or diffusers/peft keys -> the normalised kohya form. Idempotent."""
    family = detect_family(state_dict)
    if family == "sdxl_lora":
        raise ModelFileError(
            f"{WHAT}: {source} is an SDXL LoRA; DiffuEraser's UNet is SD1.5, use a PCM SD1.5 LoRA "
            "(pcm_sd15_*_converted.safetensors)"
        )
    if family != "pcm_lora":
        raise ModelFileError(
            f"{WHAT}: {source} is not a LoRA (no lora_down/lora_up or lora_A/lora_B keys; first keys: "
            f"{sorted(state_dict)[:3]})"
        )
    out: Dict[str, torch.Tensor] = {}
    skipped, unknown = [], []
    for key, tensor in state_dict.items():
        if key.startswith(TEXT_ENCODER_PREFIXES):
            skipped.append(key)
            continue
        converted = _kohya_key(key)
        if converted is None:
            unknown.append(key)
            continue
        out[converted] = tensor
    if unknown:
        raise ModelFileError(
            f"{WHAT}: {source} has {len(unknown)} keys in no known LoRA layout (kohya lora_down/lora_up/alpha or "
            f"peft lora_A/lora_B): {sorted(unknown)[:5]}"
        )
    if skipped:
        logger.warning("%s: %s: ignoring %d text-encoder LoRA tensors (DiffuEraser uses none)", WHAT, source,
                       len(skipped))
    modules = sorted({k[: -len(DOWN)] for k in out if k.endswith(DOWN)} | {k[: -len(UP)] for k in out if k.endswith(UP)})
    if not modules:
        raise ModelFileError(f"{WHAT}: {source} holds no UNet LoRA weights")
    for module in modules:
        down, up = out.get(module + DOWN), out.get(module + UP)
        if down is None or up is None:
            raise ModelFileError(f"{WHAT}: {source}: {module!r} has only one of lora_down/lora_up")
        rank = down.shape[0]
        if up.shape[1] != rank:
            raise ModelFileError(
                f"{WHAT}: {source}: {module!r} has lora_down {list(down.shape)} and lora_up {list(up.shape)} "
                f"of different ranks"
            )
        if module + ALPHA not in out:
            out[module + ALPHA] = torch.tensor(float(rank))
    return out


def _kohya_key(key: str):
    """Normalised key for one input key, or None when the key fits no known layout."""
    if key.startswith(KOHYA_UNET_PREFIX):
        return key if key.endswith((DOWN, UP, ALPHA)) else None
    for suffix, target in PEFT_SUFFIXES.items():
        if key.endswith(suffix):
            return KOHYA_UNET_PREFIX + _flat(_strip_peft_prefix(key[: -len(suffix)])) + target
    if key.endswith(ALPHA):
        return KOHYA_UNET_PREFIX + _flat(_strip_peft_prefix(key[: -len(ALPHA)])) + ALPHA
    return None


def _strip_peft_prefix(path: str) -> str:
    for prefix in PEFT_PREFIXES:
        if path.startswith(prefix):
            return path[len(prefix):]
    return path


def _flat(module_path: str) -> str:
    return module_path.replace(".", "_")


def _is_normalised(state_dict: Mapping[str, torch.Tensor]) -> bool:
    return bool(state_dict) and all(k.startswith(KOHYA_UNET_PREFIX) for k in state_dict) and all(
        k[: -len(DOWN)] + ALPHA in state_dict for k in state_dict if k.endswith(DOWN)
    )


def target_modules(unet: nn.Module) -> Dict[str, Tuple[str, nn.Module]]:
    """{flattened path: (module path, module)} of the layers a PCM LoRA may patch (2D Linear/Conv2d only)."""
    targets = {}
    for name, module in unet.named_modules():
        if EXCLUDED_MODULE_PART in name.split("."):
            continue
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            targets[_flat(name)] = (name, module)
    return targets


def lora_deltas(unet: nn.Module, lora_state_dict: Mapping[str, torch.Tensor],
                strength: float = 1.0) -> Dict[str, torch.Tensor]:
    """{parameter name: delta} with delta = strength * alpha / rank * up @ down, in the parameter's dtype.

    Raises ModelFileError listing the LoRA modules that match no 2D layer of ``unet`` (motion modules excluded).
    """
    lora = lora_state_dict if _is_normalised(lora_state_dict) else normalise_lora(lora_state_dict)
    targets = target_modules(unet)
    modules = sorted(k[len(KOHYA_UNET_PREFIX): -len(DOWN)] for k in lora if k.endswith(DOWN))
    unmatched = [m for m in modules if m not in targets]
    if unmatched:
        raise ModelFileError(
            f"{WHAT}: {len(unmatched)} of {len(modules)} LoRA modules match no 2D layer of the UNet "
            f"(motion modules are never patched): {[KOHYA_UNET_PREFIX + m for m in unmatched[:8]]}"
        )
    deltas = {}
    for flat in modules:
        name, module = targets[flat]
        key = KOHYA_UNET_PREFIX + flat
        down, up = lora[key + DOWN].float(), lora[key + UP].float()
        scale = strength * float(lora[key + ALPHA]) / down.shape[0]
        delta = (up.flatten(1) @ down.flatten(1)) * scale
        weight = module.weight
        if delta.numel() != weight.numel() or delta.shape[0] != weight.shape[0]:
            raise ModelFileError(
                f"{WHAT}: {key} gives a delta {list(delta.shape)} (lora_up {list(up.shape)} @ lora_down "
                f"{list(down.shape)}) that does not fit {name}.weight {list(weight.shape)}"
            )
        deltas[f"{name}.weight"] = delta.reshape(weight.shape).to(weight.dtype)
    return deltas


def apply_lora(unet: nn.Module, lora_state_dict: Mapping[str, torch.Tensor], strength: float = 1.0) -> List[str]:
    """Add the LoRA deltas to ``unet``'s weights in place; returns the names of the patched parameters."""
    deltas = lora_deltas(unet, lora_state_dict, strength)
    params = dict(unet.named_parameters())
    with torch.no_grad():
        for name, delta in deltas.items():
            params[name].add_(delta.to(params[name].device))
    logger.info("%s: patched %d weights at strength %s", WHAT, len(deltas), strength)
    return sorted(deltas)
