"""Reading model files safely. Only safetensors or torch.load(weights_only=True); never arbitrary unpickling."""

from __future__ import annotations

import json
import logging
import math
import inspect
import os
import pickle
import struct
import zipfile
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import torch

from ..errors import ModelFileError

logger = logging.getLogger(__name__)

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


def read_state_dict(path: str, what: str = "model file") -> Dict[str, torch.Tensor]:
    """Read a flat ``{name: tensor}`` dict from ``path`` on the CPU.

    Raises ModelFileError naming the file for a missing, truncated, corrupt or unsafe file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelFileError(f"{what}: file not found: {path!r}")
    if os.path.getsize(path) == 0:
        raise ModelFileError(f"{what}: {path!r} is empty (0 bytes); the download was probably interrupted")
    lower = path.lower()
    if lower.endswith(SAFETENSORS_SUFFIXES):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise ModelFileError(
                f"{what}: {path!r} is not a readable safetensors file (truncated or corrupt?): {exc}"
            ) from None
    return _flatten_checkpoint(_torch_load_weights_only(path, what, mmap=False), path, what)


# What torch's weights-only unpickler says when a file asks for code (a global it does not allow).
_UNSAFE_PICKLE_MARKERS = ("Unsupported global", "Unsupported class", "unsupported GLOBAL", "is blocked")
# torch.load on random or cut-off bytes can fail with almost any error type from deep inside its unpickler.
_CORRUPT_TORCH_FILE_ERRORS = (
    pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, IndexError, KeyError,
    TypeError, AttributeError, UnicodeDecodeError, struct.error, OverflowError, MemoryError,
)


def _torch_load_weights_only(path: str, what: str, mmap: bool):
    """torch.load(weights_only=True) with every failure turned into a ModelFileError that says which kind it is."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except _CORRUPT_TORCH_FILE_ERRORS as exc:
        message = str(exc)
        if isinstance(exc, pickle.UnpicklingError) and any(m in message for m in _UNSAFE_PICKLE_MARKERS):
            first = next((line for line in message.splitlines() if "global" in line.lower()), message.splitlines()[0])
            raise ModelFileError(
                f"{what}: {path!r} needs arbitrary code to unpickle and was refused for safety "
                f"(only plain tensor checkpoints are accepted): {first.strip()}"
            ) from None
        if mmap and isinstance(exc, (RuntimeError, ValueError)) and "mmap" in message.lower():
            raise _NotMappable() from None
        raise ModelFileError(
            f"{what}: {path!r} is not a readable PyTorch checkpoint (truncated or corrupt?): "
            f"{type(exc).__name__}: {message.splitlines()[0] if message else ''}"
        ) from None


class _NotMappable(Exception):
    """Legacy (non-zip) torch files cannot be memory-mapped."""


def _flatten_checkpoint(obj, path: str, what: str) -> Dict[str, torch.Tensor]:
    # Some releases wrap the weights ({"state_dict": ...}, {"params": ...}); unwrap one level.
    if isinstance(obj, dict):
        for key in ("state_dict", "params", "model", "module"):
            if key in obj and isinstance(obj[key], dict) and not isinstance(obj.get(key), torch.Tensor):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj:
        raise ModelFileError(f"{what}: {path!r} holds {type(obj).__name__}, not a state dict of tensors")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ModelFileError(f"{what}: {path!r} holds no tensors")
    return tensors


# ----------------------------------------------------------------------------------------------- header-only reads
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
    "F8_E5M2": getattr(torch, "float8_e5m2", None),
}
# A safetensors header is JSON text; anything near this size is a corrupt length field, not a header.
_MAX_SAFETENSORS_HEADER_BYTES = 100 * 1024 * 1024

TensorShapes = Dict[str, Tuple[Tuple[int, ...], torch.dtype]]


def read_tensor_shapes(path: str, what: str = "model file") -> TensorShapes:
    """``{name: (shape, dtype)}`` of every tensor in ``path`` without reading tensor data where possible.

    safetensors: only the JSON header is read; the data offsets are checked against the file size so a truncated
    download is reported here. Pickle-based files: ``torch.load(weights_only=True, mmap=True)`` (data stays on disk).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelFileError(f"{what}: file not found: {path!r}")
    size = os.path.getsize(path)
    if size == 0:
        raise ModelFileError(f"{what}: {path!r} is empty (0 bytes); the download was probably interrupted")
    if path.lower().endswith(SAFETENSORS_SUFFIXES):
        return _safetensors_header_shapes(path, size, what)
    state_dict = _read_torch_file_mmap(path, what)
    return {name: (tuple(t.shape), t.dtype) for name, t in state_dict.items()}


def _safetensors_header_shapes(path: str, size: int, what: str) -> TensorShapes:
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise ModelFileError(f"{what}: {path!r} is truncated ({size} bytes, shorter than a safetensors header)")
        header_len = struct.unpack("<Q", head)[0]
        if header_len > _MAX_SAFETENSORS_HEADER_BYTES:
            raise ModelFileError(
                f"{what}: {path!r} is not a safetensors file (header length field reads {header_len} bytes)"
            )
        if 8 + header_len > size:
            raise ModelFileError(
                f"{what}: {path!r} is truncated: its header needs {8 + header_len} bytes but the file has {size}; "
                "the download was probably interrupted"
            )
        raw = handle.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{what}: {path!r} is not a safetensors file (unreadable header: {exc})") from None
    if not isinstance(header, dict):
        raise ModelFileError(f"{what}: {path!r} is not a safetensors file (header is not a JSON object)")
    data_size = size - 8 - header_len
    shapes: TensorShapes = {}
    data_end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype_name, shape, (begin, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ModelFileError(f"{what}: {path!r} has a corrupt header entry for tensor {name!r}: {info!r}") from None
        dtype = _SAFETENSORS_DTYPES.get(dtype_name)
        if dtype is None:
            raise ModelFileError(f"{what}: {path!r} stores tensor {name!r} as unsupported dtype {dtype_name!r}")
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if end - begin != nbytes or begin < 0:
            raise ModelFileError(
                f"{what}: {path!r} has a corrupt header: tensor {name!r} {list(shape)} {dtype_name} needs {nbytes} "
                f"bytes but its data offsets are [{begin}, {end}]"
            )
        data_end = max(data_end, end)
        shapes[name] = (shape, dtype)
    if data_end > data_size:
        raise ModelFileError(
            f"{what}: {path!r} is truncated: the header places tensor data up to byte {8 + header_len + data_end} "
            f"but the file has only {size} bytes; the download was probably interrupted"
        )
    if not shapes:
        raise ModelFileError(f"{what}: {path!r} holds no tensors")
    return shapes


def _read_torch_file_mmap(path: str, what: str) -> Dict[str, torch.Tensor]:
    """Like read_state_dict for pickle-based files, but memory-mapped so that only headers are touched."""
    try:
        obj = _torch_load_weights_only(path, what, mmap=True)
    except _NotMappable:
        return read_state_dict(path, what)
    return _flatten_checkpoint(obj, path, what)


# ---------------------------------------------------------------------------------------------- family detection
class _Keys:
    """Names and shapes of a state dict (tensors or ``(shape, dtype)`` pairs), for the detection conditions."""

    def __init__(self, state_dict: Mapping[str, object]):
        self.names = set(state_dict)
        self._items = state_dict

    def shape(self, name: str) -> Optional[Tuple[int, ...]]:
        value = self._items.get(name)
        if value is None:
            return None
        if isinstance(value, torch.Tensor):
            return tuple(value.shape)
        return tuple(value[0])

    def has(self, name: str) -> bool:
        return name in self.names

    def any_prefix(self, prefix: str) -> bool:
        return any(n.startswith(prefix) for n in self.names)

    def any_contains(self, part: str) -> bool:
        return any(part in n for n in self.names)

    def any_suffix(self, suffix: str) -> bool:
        return any(n.endswith(suffix) for n in self.names)


# A condition is a predicate on _Keys; the helpers below build them so the family table reads declaratively.
Condition = Callable[[_Keys], bool]


def has(*names: str) -> Condition:
    return lambda k: all(k.has(n) for n in names)


def has_prefix(prefix: str) -> Condition:
    return lambda k: k.any_prefix(prefix)


def contains(part: str) -> Condition:
    return lambda k: k.any_contains(part)


def has_suffix(suffix: str) -> Condition:
    return lambda k: k.any_suffix(suffix)


def any_of(*conditions: Condition) -> Condition:
    return lambda k: any(c(k) for c in conditions)


def none_of(*conditions: Condition) -> Condition:
    return lambda k: not any(c(k) for c in conditions)


_LORA_MARKERS = any_of(
    contains(".lora_down."), contains(".lora_up."), contains(".lora_A."), contains(".lora_B."),
    contains(".lora.down."), contains("_lora.down."),
)
_LDM_UNET = any_of(has("model.diffusion_model.input_blocks.0.0.weight"), has("input_blocks.0.0.weight"))
_DIFFUSERS_UNET_2D = has("conv_in.weight", "conv_out.weight", "down_blocks.0.resnets.0.conv1.weight")
_SDXL_UNET_MARKERS = any_of(
    has("add_embedding.linear_1.weight"), has("model.diffusion_model.label_emb.0.0.weight"),
    has("label_emb.0.0.weight"), has_prefix("conditioner.embedders."),
)


SDXL_TEXT_FEATURES = 2048  # concatenated CLIP-L + OpenCLIP-bigG features that SDXL cross-attends to


def _sdxl_lora(keys: _Keys) -> bool:
    """SDXL LoRAs: second text encoder, SGM block names, or cross-attention from the 2048-wide SDXL text features."""
    if keys.any_prefix("lora_te2_") or keys.any_prefix("text_encoder_2.") or keys.any_contains("add_embedding"):
        return True
    if keys.any_prefix("lora_unet_input_blocks_") or keys.any_prefix("lora_unet_output_blocks_"):
        return True
    for name in keys.names:
        if "attn2" in name and ("to_k" in name or "to_v" in name) and ("lora_down" in name or "lora_A" in name):
            shape = keys.shape(name)
            if shape is not None and len(shape) >= 2 and shape[1] == SDXL_TEXT_FEATURES:
                return True
    return False


# (family, conditions that must all hold); the first matching family wins, so specific ones come first.
FAMILY_RULES: List[Tuple[str, List[Condition]]] = [
    ("sdxl_lora", [_LORA_MARKERS, _sdxl_lora]),
    ("pcm_lora", [_LORA_MARKERS]),
    ("sdxl_checkpoint", [_LDM_UNET, _SDXL_UNET_MARKERS]),
    ("sd15_checkpoint", [has("model.diffusion_model.input_blocks.0.0.weight"), has_prefix("first_stage_model."),
                         has_prefix("cond_stage_model.")]),
    ("unet_main", [_DIFFUSERS_UNET_2D, contains(".motion_modules."), none_of(has("conv_in_condition.weight"))]),
    ("brushnet", [has("conv_in_condition.weight", "brushnet_down_blocks.0.weight", "brushnet_mid_block.weight")]),
    ("motion_adapter", [contains(".motion_modules."), none_of(has("conv_in.weight"))]),
    ("sdxl_unet", [any_of(_LDM_UNET, _DIFFUSERS_UNET_2D), _SDXL_UNET_MARKERS]),
    ("sd15_unet", [any_of(_LDM_UNET, _DIFFUSERS_UNET_2D), none_of(contains("motion_modules."))]),
    ("vae", [any_of(
        has("encoder.conv_in.weight", "decoder.conv_out.weight"),
        has("first_stage_model.encoder.conv_in.weight", "first_stage_model.decoder.conv_out.weight"),
        has("vae.encoder.conv_in.weight", "vae.decoder.conv_out.weight"),
    )]),
    ("clip_text", [has_suffix("text_model.embeddings.token_embedding.weight"),
                   has_suffix("text_model.encoder.layers.0.self_attn.q_proj.weight")]),
    ("raft", [any_of(has("fnet.conv1.weight", "cnet.conv1.weight", "update_block.flow_head.conv1.weight"),
                     has("module.fnet.conv1.weight", "module.cnet.conv1.weight",
                         "module.update_block.flow_head.conv1.weight"))]),
    ("flow_completion", [has("downsample.0.weight", "mid_dilation.0.weight"), has_prefix("edgeDetector."),
                         has_prefix("feat_prop_module.")]),
    ("propainter", [has("encoder.layers.0.weight", "ss.embedding.weight", "sc.embedding.weight"),
                    has_prefix("transformers.")]),
]

FAMILY_DESCRIPTIONS = {
    "unet_main": "DiffuEraser unet_main (a UNetMotionModel with motion_modules)",
    "brushnet": "DiffuEraser brushnet (a BrushNetModel with conv_in_condition and brushnet_*_blocks)",
    "sd15_unet": "a plain SD1.5 UNet",
    "sd15_checkpoint": "a full SD1.5 checkpoint (UNet + VAE + text encoder)",
    "sdxl_checkpoint": "an SDXL checkpoint",
    "sdxl_unet": "an SDXL UNet",
    "motion_adapter": "an AnimateDiff motion adapter (motion modules only)",
    "vae": "a VAE",
    "clip_text": "a CLIP text encoder",
    "pcm_lora": "an SD1.5 LoRA (e.g. PCM)",
    "sdxl_lora": "an SDXL LoRA",
    "raft": "RAFT optical flow (raft-things.pth)",
    "flow_completion": "ProPainter flow completion (recurrent_flow_completion.pth)",
    "propainter": "ProPainter InpaintGenerator (ProPainter.pth)",
    "unknown": "not a model family this pack knows",
}


def detect_family(state_dict: Mapping[str, object]) -> str:
    """Family of a state dict (``{name: tensor}`` or the ``{name: (shape, dtype)}`` of read_tensor_shapes)."""
    keys = _Keys(state_dict)
    for family, conditions in FAMILY_RULES:
        if all(condition(keys) for condition in conditions):
            return family
    return "unknown"


def describe_family(family: str) -> str:
    return FAMILY_DESCRIPTIONS.get(family, family)


def require_family(state_dict: Mapping[str, object], expected: str, path: str, what: str) -> None:
    """ModelFileError naming the file, what it is and what was expected, unless it belongs to ``expected``."""
    family = detect_family(state_dict)
    if family != expected:
        first = ", ".join(sorted(state_dict)[:3])
        raise ModelFileError(
            f"{what}: {path!r} is {describe_family(family)}, expected {describe_family(expected)} "
            f"(first keys: {first})"
        )


# ------------------------------------------------------------------------------------ diffusers networks: loading
DIFFUSERS_WEIGHT_NAMES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.bf16.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.bin",
)
CONFIG_NAME = "config.json"


class _NetworkSpec:
    """What differs between unet_main and brushnet for loading: names, classes, configs, shape-derived fields."""

    def __init__(self, family, folder_name, class_names, what, model_class, configs, derive):
        self.family = family
        self.folder_name = folder_name
        self.class_names = class_names
        self.what = what
        self._model_class = model_class
        self._configs = configs
        self.derive = derive

    def model_class(self):
        return self._model_class()

    def configs(self):
        """(full-size default, tiny test config); the first one is the fallback."""
        return self._configs()


def _count_indices(keys: _Keys, prefix: str) -> int:
    count = 0
    while keys.any_prefix(f"{prefix}{count}."):
        count += 1
    return count


def _derive_common(keys: _Keys) -> dict:
    """The hyper-parameters of an SD1.5-style UNet that tensor shapes determine (the rest are not in the shapes)."""
    n_blocks = _count_indices(keys, "down_blocks.")
    derived = {
        "block_out_channels": [keys.shape(f"down_blocks.{i}.resnets.0.conv1.weight")[0] for i in range(n_blocks)],
        "layers_per_block": _count_indices(keys, "down_blocks.0.resnets."),
    }
    to_k = next((n for n in sorted(keys.names) if n.endswith("attn2.to_k.weight") and "motion_modules" not in n), None)
    if to_k is not None:
        derived["cross_attention_dim"] = keys.shape(to_k)[1]
    proj_in = next((n for n in sorted(keys.names) if n.endswith("attentions.0.proj_in.weight")), None)
    if proj_in is not None:
        derived["use_linear_projection"] = len(keys.shape(proj_in)) == 2
    return derived


def _derive_unet_main(keys: _Keys) -> dict:
    derived = _derive_common(keys)
    n_blocks = len(derived["block_out_channels"])
    derived["in_channels"] = keys.shape("conv_in.weight")[1]
    derived["out_channels"] = keys.shape("conv_out.weight")[0]
    derived["down_block_types"] = [
        "CrossAttnDownBlockMotion" if keys.any_prefix(f"down_blocks.{i}.attentions.") else "DownBlockMotion"
        for i in range(n_blocks)
    ]
    derived["up_block_types"] = [
        "CrossAttnUpBlockMotion" if keys.any_prefix(f"up_blocks.{i}.attentions.") else "UpBlockMotion"
        for i in range(n_blocks)
    ]
    derived["use_motion_mid_block"] = keys.any_prefix("mid_block.motion_modules.")
    pe = keys.shape("down_blocks.0.motion_modules.0.transformer_blocks.0.pos_embed.pe")
    if pe is not None:
        derived["motion_max_seq_length"] = pe[1]
    return derived


def _derive_brushnet(keys: _Keys) -> dict:
    derived = _derive_common(keys)
    n_blocks = len(derived["block_out_channels"])
    in_total = keys.shape("conv_in_condition.weight")[1]
    derived["conditioning_channels"] = in_total - 4  # the noisy latent has 4 channels (SD1.5 latent space)
    derived["in_channels"] = 4
    derived["down_block_types"] = [
        "CrossAttnDownBlock2D" if keys.any_prefix(f"down_blocks.{i}.attentions.") else "DownBlock2D"
        for i in range(n_blocks)
    ]
    derived["up_block_types"] = [
        "CrossAttnUpBlock2D" if keys.any_prefix(f"up_blocks.{i}.attentions.") else "UpBlock2D"
        for i in range(n_blocks)
    ]
    return derived


def _unet_main_class():
    from .unet_motion import DiffuEraserUNet

    return DiffuEraserUNet


def _brushnet_class():
    from .brushnet import BrushNetModel

    return BrushNetModel


def _unet_main_configs():
    from .configs import TINY_UNET_MAIN_CONFIG, UNET_MAIN_CONFIG

    return UNET_MAIN_CONFIG, TINY_UNET_MAIN_CONFIG


def _brushnet_configs():
    from .configs import BRUSHNET_CONFIG, TINY_BRUSHNET_CONFIG

    return BRUSHNET_CONFIG, TINY_BRUSHNET_CONFIG


UNET_MAIN_SPEC = _NetworkSpec(
    "unet_main", "unet_main", ("UNetMotionModel", "DiffuEraserUNet"), "DiffuEraser unet_main",
    _unet_main_class, _unet_main_configs, _derive_unet_main,
)
BRUSHNET_SPEC = _NetworkSpec(
    "brushnet", "brushnet", ("BrushNetModel",), "DiffuEraser brushnet", _brushnet_class, _brushnet_configs,
    _derive_brushnet,
)


def _resolve_weights(path: str, spec: _NetworkSpec) -> Tuple[str, Optional[str]]:
    """(weights file, config.json or None) for a diffusers folder or a single file."""
    path = os.fspath(path)
    if os.path.isdir(path):
        nested = os.path.join(path, spec.folder_name)
        if not any(os.path.isfile(os.path.join(path, n)) for n in DIFFUSERS_WEIGHT_NAMES) and os.path.isdir(nested):
            path = nested  # the user pointed at the diffuEraser folder holding unet_main/ and brushnet/
        for name in DIFFUSERS_WEIGHT_NAMES:
            candidate = os.path.join(path, name)
            if os.path.isfile(candidate):
                config = os.path.join(path, CONFIG_NAME)
                return candidate, config if os.path.isfile(config) else None
        raise ModelFileError(
            f"{spec.what}: folder {path!r} holds none of {list(DIFFUSERS_WEIGHT_NAMES)} "
            f"(found: {sorted(os.listdir(path))[:8]})"
        )
    if not os.path.isfile(path):
        raise ModelFileError(f"{spec.what}: file or folder not found: {path!r}")
    config = os.path.join(os.path.dirname(path), CONFIG_NAME)
    return path, config if os.path.isfile(config) else None


def _read_config(config_path: str, spec: _NetworkSpec) -> Optional[dict]:
    try:
        with open(config_path, encoding="utf-8") as handle:
            config = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{spec.what}: {config_path!r} is not a readable config.json: {exc}") from None
    if not isinstance(config, dict):
        raise ModelFileError(f"{spec.what}: {config_path!r} is not a JSON object")
    class_name = config.get("_class_name")
    if class_name is not None and class_name not in spec.class_names:
        logger.warning("%s: ignoring %s (it describes a %s, not %s)", spec.what, config_path, class_name,
                       spec.class_names[0])
        return None
    return config


def _config_from_shapes(keys: _Keys, spec: _NetworkSpec) -> dict:
    """A known config whose shape-determined fields match; else the full-size default with those fields replaced."""
    derived = spec.derive(keys)
    candidates = spec.configs()
    for candidate in candidates:
        if all(candidate.get(name) == value for name, value in derived.items()):
            return dict(candidate)
    config = dict(candidates[0])
    config.update(derived)
    channels = derived["block_out_channels"]
    groups = config.get("norm_num_groups", 32)
    while groups > 1 and any(c % groups for c in channels):
        groups //= 2
    config["norm_num_groups"] = groups
    if "motion_norm_num_groups" in config:
        config["motion_norm_num_groups"] = groups
    logger.warning(
        "%s: no config.json and the shapes match no known configuration; derived %s (attention heads and norm "
        "groups are not stored in the weights: defaults used)", spec.what, derived,
    )
    return config


def _build_on_meta(spec: _NetworkSpec, config: dict):
    model_class = spec.model_class()
    # Official configs carry keys the class does not take (e.g. conditioning_channels in unet_main's); dropping
    # them here keeps diffusers from warning on every load.
    init_keys = set(inspect.signature(model_class.__init__).parameters)
    accepted = {k: v for k, v in config.items() if k in init_keys or k.startswith("_")}
    with torch.device("meta"):
        return model_class.from_config(accepted)


def _first(names, limit: int = 5) -> str:
    names = sorted(names)
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def compare_shapes(expected: Mapping[str, Tuple[int, ...]], found: Mapping[str, object], path: str,
                   what: str) -> None:
    """ModelFileError with counts and first names for missing / unexpected keys and shape mismatches."""
    found_keys = _Keys(found)
    missing = set(expected) - found_keys.names
    unexpected = found_keys.names - set(expected)
    mismatched = sorted(
        n for n in set(expected) & found_keys.names if tuple(expected[n]) != found_keys.shape(n)
    )
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys ({_first(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys ({_first(unexpected)})")
    if mismatched:
        detail = ", ".join(
            f"{n}: file {list(found_keys.shape(n))} vs model {list(expected[n])}" for n in mismatched[:3]
        )
        problems.append(f"{len(mismatched)} shape mismatches ({detail})")
    if problems:
        raise ModelFileError(f"{what}: {path!r} does not fit the network: " + "; ".join(problems))


def _prepare(path: str, spec: _NetworkSpec):
    """Header-level checks and the network built on the meta device: (weights file, meta model, file shapes)."""
    weights, config_path = _resolve_weights(path, spec)
    shapes = read_tensor_shapes(weights, spec.what)
    require_family(shapes, spec.family, weights, spec.what)
    config = _read_config(config_path, spec) if config_path else None
    if config is None:
        config = _config_from_shapes(_Keys(shapes), spec)
    model = _build_on_meta(spec, config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    compare_shapes(expected, shapes, weights, spec.what)
    return weights, model, shapes


def inspect_network(path: str, family: str):
    """Validate a unet_main / brushnet folder or file from headers only (family, config, every key and shape).

    Returns (weights file, the network on the meta device); raises ModelFileError like the loaders.
    """
    spec = {"unet_main": UNET_MAIN_SPEC, "brushnet": BRUSHNET_SPEC}[family]
    weights, model, _ = _prepare(path, spec)
    return weights, model


def _target_dtype(shapes: TensorShapes, dtype: Optional[torch.dtype]) -> torch.dtype:
    if dtype is not None:
        return dtype
    counts: Dict[torch.dtype, int] = {}
    for _, tensor_dtype in shapes.values():
        if tensor_dtype.is_floating_point:
            counts[tensor_dtype] = counts.get(tensor_dtype, 0) + 1
    return max(counts, key=counts.get) if counts else torch.float32


def _read_tensors(weights: str, what: str, dtype: torch.dtype, device="cpu") -> Dict[str, torch.Tensor]:
    """All tensors on ``device``, floating ones converted to ``dtype`` one at a time (peak: the result plus one
    tensor). A safetensors file is read tensor by tensor straight onto ``device``, so a network built on the GPU
    never occupies host RAM."""
    device = str(torch.device(device))
    if weights.lower().endswith(SAFETENSORS_SUFFIXES):
        from safetensors import SafetensorError, safe_open

        tensors = {}
        try:
            with safe_open(weights, framework="pt", device=device) as handle:
                for name in handle.keys():
                    tensor = handle.get_tensor(name)
                    tensors[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise ModelFileError(
                f"{what}: {weights!r} is not a readable safetensors file (truncated or corrupt?): {exc}"
            ) from None
        return tensors
    tensors = read_state_dict(weights, what)
    for name in list(tensors):
        if tensors[name].is_floating_point():
            tensors[name] = tensors[name].to(device, dtype)
        else:
            tensors[name] = tensors[name].to(device)
    return tensors


def _load_network(path: str, spec: _NetworkSpec, dtype: Optional[torch.dtype], device=None):
    weights, model, shapes = _prepare(path, spec)
    tensors = _read_tensors(weights, spec.what, _target_dtype(shapes, dtype), device or "cpu")
    model.load_state_dict(tensors, strict=True, assign=True)
    del tensors
    left_on_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left_on_meta:
        raise RuntimeError(f"{spec.what}: tensors not stored in the file stayed unmaterialised: {_first(left_on_meta)}")
    model.requires_grad_(False)
    model.eval()
    logger.info("%s: loaded %s (%d tensors)", spec.what, weights, len(shapes))
    return model


def load_unet_main(path: str, dtype: Optional[torch.dtype] = None, device=None):
    """DiffuEraserUNet from a diffusers folder or a single file, in eval mode on ``device`` (default the CPU).

    ``dtype`` None keeps the file's floating dtype (fp32, fp16 or bf16).
    """
    return _load_network(path, UNET_MAIN_SPEC, dtype, device)


def load_brushnet(path: str, dtype: Optional[torch.dtype] = None, device=None):
    """BrushNetModel from a diffusers folder or a single file, in eval mode on ``device`` (default the CPU)."""
    return _load_network(path, BRUSHNET_SPEC, dtype, device)


def network_file_bytes(path: str, family: str, dtype: Optional[torch.dtype] = None) -> int:
    """Bytes the network in ``path`` will take once loaded in ``dtype`` (None: as stored), from the header only."""
    spec = {UNET_MAIN_SPEC.family: UNET_MAIN_SPEC, BRUSHNET_SPEC.family: BRUSHNET_SPEC}[family]
    weights, _ = _resolve_weights(path, spec)
    shapes = read_tensor_shapes(weights, spec.what)
    target = _target_dtype(shapes, dtype)
    total = 0
    for shape, tensor_dtype in shapes.values():
        numel = 1
        for dim in shape:
            numel *= int(dim)
        size = torch.empty((), dtype=target if tensor_dtype.is_floating_point else tensor_dtype).element_size()
        total += numel * size
    return total


# ------------------------------------------------------------------------------------- strict loading helpers
def strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str = "module.") -> Dict[str, torch.Tensor]:
    """Remove ``prefix`` from every key when all keys carry it (DataParallel checkpoints)."""
    if state_dict and all(key.startswith(prefix) for key in state_dict):
        return {key[len(prefix):]: value for key, value in state_dict.items()}
    return dict(state_dict)


def load_state_dict_checked(
    model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], path: str, what: str, assign: bool = False
) -> None:
    """Strict load with a ModelFileError naming the file and the first differing keys or shapes.

    ``assign=True`` for models built on the meta device: the file's tensors become the parameters (no copy).
    """
    expected = model.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    if missing or unexpected:
        raise ModelFileError(
            f"{what}: {path!r} does not have the expected layout: {len(missing)} missing keys "
            f"(first: {missing[:5]}), {len(unexpected)} unexpected keys (first: {unexpected[:5]})"
        )
    wrong = [
        f"{key}: {tuple(state_dict[key].shape)} != {tuple(value.shape)}"
        for key, value in expected.items()
        if tuple(state_dict[key].shape) != tuple(value.shape)
    ]
    if wrong:
        raise ModelFileError(f"{what}: {path!r} has {len(wrong)} tensors of the wrong shape (first: {wrong[:5]})")
    model.load_state_dict(state_dict, strict=True, assign=assign)
