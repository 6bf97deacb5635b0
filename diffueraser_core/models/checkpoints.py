"""Reading model files safely. Only safetensors or torch.load(weights_only=True); never arbitrary unpickling."""

from __future__ import annotations

import os
import pickle
import zipfile
from typing import Dict

import torch

from ..errors import ModelFileError

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
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ModelFileError(
            f"{what}: {path!r} needs arbitrary code to unpickle and was refused for safety "
            f"(only plain tensor checkpoints are accepted): {str(exc).splitlines()[0]}"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise ModelFileError(f"{what}: {path!r} could not be read (truncated or corrupt?): {exc}") from None
    return _flatten_checkpoint(obj, path, what)


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
