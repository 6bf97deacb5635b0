"""``python -m diffueraser_core doctor [--models DIR]``: is every model file the pack needs present and usable?

One line per file: found / missing / invalid (with the reason: wrong family, wrong shapes, truncated, unsafe pickle,
unreadable) and, for missing ones, where they are published. Exit status 0 only when everything needed is usable.
Checks are cheap: safetensors headers, memory-mapped .pth files, networks built on the meta device.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, TextIO, Tuple

import torch

from .errors import ModelFileError
from .model_files import MODEL_FILES, MODEL_FILES_BY_KEY, find_model_file
from .models import checkpoints
from .models.checkpoints import compare_shapes, describe_family, detect_family, read_tensor_shapes

logger = logging.getLogger(__name__)

WHAT = "DiffuEraser doctor"
ENV_MODELS_DIR = "COMFYUI_MODELS_DIR"
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                     "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin")
TRANSFORMERS_WEIGHTS = ("model.safetensors", "model.fp16.safetensors", "pytorch_model.bin", "pytorch_model.fp16.bin")
SD15_LATENT_CHANNELS = 4
# The network classes the ProPainter files must fit: (module, class name, constructor kwargs, key prefix in files).
PROPAINTER_NETWORKS = {
    "raft": ("raft", "RAFT", {}, "module."),
    "flow_completion": ("flow_completion", "RecurrentFlowCompleteNet", {}, ""),
    "propainter": ("propainter", "InpaintGenerator", {"init_weights": False}, ""),
}
PROPAINTER_MANIFESTS = {
    "raft": "propainter_raft_things.json",
    "flow_completion": "propainter_recurrent_flow_completion.json",
    "propainter": "propainter_ProPainter.json",
}
PACK_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MANIFEST_DIR = os.path.join(PACK_DIR, "tests", "reference")


@dataclass
class CheckResult:
    key: str
    status: str  # "found" | "missing" | "invalid" | "absent" (optional and not present)
    path: Optional[str]
    detail: str
    required: bool


def default_models_dir() -> str:
    """ComfyUI's models folder when the pack sits in custom_nodes/, else $COMFYUI_MODELS_DIR, else ./models."""
    parent = os.path.dirname(PACK_DIR)
    if os.path.basename(parent) == "custom_nodes":
        return os.path.join(os.path.dirname(parent), "models")
    env = os.environ.get(ENV_MODELS_DIR)
    if env:
        return env
    return os.path.abspath("models")


# ------------------------------------------------------------------------------------------------------- checks
def _weights_in_folder(folder: str, names) -> str:
    for name in names:
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    raise ModelFileError(f"{WHAT}: folder {folder!r} holds none of {list(names)}")


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{WHAT}: {path!r} is not a readable config.json: {exc}") from None


def _meta_shapes(module: torch.nn.Module) -> Dict[str, Tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in module.state_dict().items()}


def _require(shapes, expected_families, path: str, what: str) -> str:
    family = detect_family(shapes)
    if family not in expected_families:
        raise ModelFileError(
            f"{what}: {path!r} is {describe_family(family)}, expected {describe_family(expected_families[0])}"
        )
    return family


class _Doctor:
    """Runs the checks in dependency order so later ones can use what earlier ones found (the UNet's text width)."""

    def __init__(self, models_dir: str):
        self.models_dir = models_dir
        self.unet_meta = None

    def check(self, key: str, path: str) -> str:
        return getattr(self, f"_check_{key}")(path)

    def _check_unet_main(self, path: str) -> str:
        try:
            weights, self.unet_meta = checkpoints.inspect_network(path, "unet_main")
        except ImportError:
            return self._family_only(path, "unet_main")
        return f"{weights} (every tensor fits its config)"

    def _check_brushnet(self, path: str) -> str:
        try:
            weights, _ = checkpoints.inspect_network(path, "brushnet")
        except ImportError:
            return self._family_only(path, "brushnet")
        return f"{weights} (every tensor fits its config)"

    def _family_only(self, path: str, family: str) -> str:
        weights = _weights_in_folder(path, DIFFUSERS_WEIGHTS) if os.path.isdir(path) else path
        _require(read_tensor_shapes(weights, WHAT), (family,), weights, WHAT)
        return f"{weights} (family checked; shapes not checked: network code unavailable)"

    def _check_pcm_lora(self, path: str) -> str:
        from .models.lora import lora_deltas, normalise_lora

        shapes = read_tensor_shapes(path, WHAT)
        _require(shapes, ("pcm_lora",), path, WHAT)
        # Shapes are all that is checked; scalars (alphas) get a real placeholder value because the scale is a float.
        meta = {name: torch.empty(shape, dtype=dtype, device="meta") if shape else torch.ones((), dtype=dtype)
                for name, (shape, dtype) in shapes.items()}
        lora = normalise_lora(meta, source=repr(path))
        if self.unet_meta is None:
            return f"{path} (LoRA layout checked; not matched against unet_main, which is unusable)"
        deltas = lora_deltas(self.unet_meta, lora)
        return f"{path} ({len(deltas)} unet_main layers patched)"

    def _check_propainter_file(self, path: str, key: str) -> str:
        shapes = read_tensor_shapes(path, WHAT)
        _require(shapes, (key,), path, WHAT)
        expected, source = self._propainter_expected(key)
        if expected is None:
            return f"{path} (family checked)"
        prefix = PROPAINTER_NETWORKS[key][3]
        found = {k[len(prefix):] if prefix and k.startswith(prefix) else k: v for k, v in shapes.items()}
        compare_shapes(expected, found, path, WHAT)
        return f"{path} (every tensor fits {source})"

    def _propainter_expected(self, key: str):
        module_name, class_name, kwargs, _ = PROPAINTER_NETWORKS[key]
        try:
            import importlib

            module = importlib.import_module(f".models.{module_name}", __package__)
            network_class = getattr(module, class_name)
        except (ImportError, AttributeError):
            network_class = None
        if network_class is not None:
            try:
                with torch.device("meta"):
                    network = network_class(**kwargs)
            except (NotImplementedError, RuntimeError):
                # Some constructors compute index buffers with data-dependent ops the meta device cannot run.
                network = network_class(**kwargs)
            return _meta_shapes(network), class_name
        manifest = os.path.join(MANIFEST_DIR, PROPAINTER_MANIFESTS[key])
        if os.path.isfile(manifest):
            tensors = _read_json(manifest)["tensors"]
            prefix = PROPAINTER_NETWORKS[key][3]
            return {k[len(prefix):] if prefix and k.startswith(prefix) else k: tuple(v) for k, v in tensors.items()}, \
                os.path.basename(manifest)
        return None, None

    def _check_raft(self, path: str) -> str:
        return self._check_propainter_file(path, "raft")

    def _check_flow_completion(self, path: str) -> str:
        return self._check_propainter_file(path, "flow_completion")

    def _check_propainter(self, path: str) -> str:
        return self._check_propainter_file(path, "propainter")

    # The VAE and the text encoder are checked by the loaders themselves (``shapes_only``: headers only, the model
    # on the meta device), so every key mapping the loader does (LDM names, checkpoint prefixes, the text_model.
    # prefix that transformers 5 dropped) counts here too: what the doctor accepts is what loads.
    def _check_vae(self, path: str) -> str:
        from .models.sd15_components import load_vae

        family = None
        if not os.path.isdir(path):
            family = _require(read_tensor_shapes(path, WHAT), ("vae", "sd15_checkpoint"), path, WHAT)
        vae = load_vae(path, shapes_only=True)
        latent = int(vae.config.latent_channels)
        if latent != SD15_LATENT_CHANNELS:
            raise ModelFileError(
                f"{WHAT}: {path!r} is a VAE with {latent} latent channels; SD1.5 needs {SD15_LATENT_CHANNELS}"
            )
        if os.path.isdir(path):
            return f"{_weights_in_folder(path, DIFFUSERS_WEIGHTS)} (every tensor fits its config.json)"
        where = " (inside the SD1.5 checkpoint)" if family == "sd15_checkpoint" else ""
        return f"{path}{where} (loads)"

    def _check_text_encoder(self, path: str) -> str:
        from .models.sd15_components import load_text_encoder

        family = None
        if not os.path.isdir(path):
            family = _require(read_tensor_shapes(path, WHAT), ("clip_text", "sd15_checkpoint"), path, WHAT)
        model = load_text_encoder(path, shapes_only=True)
        self._check_text_width(int(model.config.hidden_size), path)
        if os.path.isdir(path):
            return f"{_weights_in_folder(path, TRANSFORMERS_WEIGHTS)} (every tensor fits its config.json)"
        where = " (inside the SD1.5 checkpoint)" if family == "sd15_checkpoint" else ""
        return f"{path}{where} (loads)"

    def _check_text_width(self, width: int, path: str) -> None:
        if self.unet_meta is None:
            return
        needed = self.unet_meta.config.cross_attention_dim
        if width != needed:
            raise ModelFileError(
                f"{WHAT}: {path!r} is a text encoder of width {width}, but unet_main cross-attends to {needed} "
                "(SD1.5 uses the CLIP-L text model, width 768)"
            )

    def _check_sd15_checkpoint(self, path: str) -> str:
        _require(read_tensor_shapes(path, WHAT), ("sd15_checkpoint",), path, WHAT)
        return path


def check_models(models_dir: str) -> List[CheckResult]:
    """One CheckResult per registry entry, in registry order."""
    doctor = _Doctor(models_dir)
    results = []
    for entry in MODEL_FILES:
        path = find_model_file(models_dir, entry.key)
        if path is None:
            status = "missing" if entry.required else "absent"
            where = os.path.join(models_dir, entry.candidates[0])
            results.append(CheckResult(entry.key, status, None, f"expected at {where}; published at "
                                                                f"{entry.published}", entry.required))
            continue
        try:
            detail = doctor.check(entry.key, path)
            results.append(CheckResult(entry.key, "found", path, detail, entry.required))
        except ModelFileError as exc:
            results.append(CheckResult(entry.key, "invalid", path, str(exc), entry.required))
    return results


def format_result(result: CheckResult) -> str:
    label = {"found": "OK", "missing": "MISSING", "invalid": "INVALID", "absent": "-"}[result.status]
    description = MODEL_FILES_BY_KEY[result.key].description
    optional = "" if result.required else " [optional]"
    return f"{label:8} {result.key:16} {description}{optional}: {result.detail}"


def main(argv=None, stream: Optional[TextIO] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m diffueraser_core doctor",
        description="Check that every model file DiffuEraser needs is present and usable.",
    )
    parser.add_argument("--models", default=None,
                        help="ComfyUI-style models folder (default: the ComfyUI models folder this pack sits in, "
                             f"else ${ENV_MODELS_DIR}, else ./models)")
    args = parser.parse_args(argv)
    out = stream if stream is not None else sys.stdout
    models_dir = os.path.abspath(args.models or default_models_dir())
    out.write(f"models folder: {models_dir}\n")
    if not os.path.isdir(models_dir):
        out.write(f"MISSING  models folder {models_dir!r} does not exist (give one with --models DIR)\n")
        return 1
    results = check_models(models_dir)
    for result in results:
        out.write(format_result(result) + "\n")
    bad = [r for r in results if r.required and r.status != "found"]
    needed = sum(r.required for r in results)
    if bad:
        out.write(f"{len(bad)} of {needed} needed model files are missing or invalid: "
                  f"{', '.join(r.key for r in bad)}\n")
        return 1
    out.write(f"all {needed} needed model files are usable\n")
    return 0
