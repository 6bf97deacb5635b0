"""Model folders of the pack: ``models/diffueraser`` and ``models/propainter``.

Inside ComfyUI both are registered with ``folder_paths.add_model_folder_path`` (so extra_model_paths.yaml entries
named ``diffueraser:`` / ``propainter:`` are honoured, and listed after the default folder). Without ComfyUI (tests,
CLI) the folders are ``<models dir>/diffueraser`` and ``<models dir>/propainter`` where the models dir is passed in
or taken from ``$DIFFUERASER_MODELS_DIR``.

Loadable entries are diffusers folders (``config.json`` + weights) and single weight files, named by their path
relative to the registered folder with "/" separators (as ComfyUI names files in sub-folders).

Downloads are off by default. With ``DIFFUERASER_ALLOW_DOWNLOAD=1`` the official names are offered even when
absent and a missing one is fetched (exactly the files needed, huggingface_hub for Hugging Face files, plain HTTPS
for ProPainter's GitHub release assets) into the first registered folder.
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import tempfile
import urllib.request
from typing import Dict, List, Optional

from diffueraser_core.errors import ModelFileError
from diffueraser_core.model_files import MODEL_FILES

log = logging.getLogger(__name__)

DIFFUERASER_FOLDER = "diffueraser"
PROPAINTER_FOLDER = "propainter"
FOLDER_NAMES = (DIFFUERASER_FOLDER, PROPAINTER_FOLDER)
MODELS_DIR_ENV = "DIFFUERASER_MODELS_DIR"
ALLOW_DOWNLOAD_ENV = "DIFFUERASER_ALLOW_DOWNLOAD"

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
DIFFUSERS_WEIGHT_NAMES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.bin",
)
# How deep below a registered folder diffusers folders and files are looked for (diffuEraser/unet_main = 2).
MAX_SEARCH_DEPTH = 3



def _official_entries() -> Dict[str, Dict[str, dict]]:
    """Official entry names (relative to their folder) -> download spec + page, from the core's registry."""
    entries: Dict[str, Dict[str, dict]] = {name: {} for name in FOLDER_NAMES}
    for model_file in MODEL_FILES:
        if model_file.subfolder in entries and model_file.download is not None:
            name = model_file.candidates[0].split("/", 1)[1]  # the preferred place, relative to the folder
            entries[model_file.subfolder][name] = dict(model_file.download, url=model_file.published.split(" ")[0])
    return entries


OFFICIAL_ENTRIES = _official_entries()


def _folder_paths():
    try:
        return importlib.import_module("folder_paths")
    except ImportError:
        return None


def register_folders() -> None:
    """Register ``models/diffueraser`` and ``models/propainter`` with ComfyUI (no-op without ComfyUI)."""
    fp = _folder_paths()
    if fp is None:
        return
    for name in FOLDER_NAMES:
        # Not is_default: folders a user mapped in extra_model_paths.yaml keep their place in front.
        fp.add_model_folder_path(name, os.path.join(fp.models_dir, name))
    for name in FOLDER_NAMES:
        if not any(list_entries(name)):
            log.info(
                "DiffuEraser: no model files found in %s; put %s there (see the README for download links)",
                " or ".join(folder_dirs(name)),
                ", ".join(OFFICIAL_ENTRIES[name]),
            )


def folder_dirs(kind: str, models_dir: Optional[str] = None) -> List[str]:
    """Directories searched for ``kind`` (diffueraser / propainter)."""
    if kind not in FOLDER_NAMES:
        raise ValueError(f"unknown model folder {kind!r}; expected one of {FOLDER_NAMES}")
    root = models_dir or os.environ.get(MODELS_DIR_ENV)
    if root:
        return [os.path.join(root, kind)]
    fp = _folder_paths()
    if fp is not None:
        try:
            return list(fp.get_folder_paths(kind))
        except KeyError:
            return [os.path.join(fp.models_dir, kind)]
    return []


def is_diffusers_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json")) and any(
        os.path.isfile(os.path.join(path, name)) for name in DIFFUSERS_WEIGHT_NAMES
    )


def _scan(root: str) -> List[str]:
    found = []
    root = os.path.abspath(root)
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        rel = os.path.relpath(dirpath, root)
        depth = 0 if rel == "." else rel.count(os.sep) + 1
        if depth > 0 and is_diffusers_folder(dirpath):
            found.append(rel.replace(os.sep, "/"))
            dirnames[:] = []  # its weight files are part of the folder entry
            continue
        if depth >= MAX_SEARCH_DEPTH:
            dirnames[:] = []
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.lower().endswith(WEIGHT_SUFFIXES):
                found.append(os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/"))
    return found


def list_entries(kind: str, models_dir: Optional[str] = None) -> List[str]:
    """Loadable entries of a folder kind, sorted, each once (first registered folder wins)."""
    entries: List[str] = []
    for directory in folder_dirs(kind, models_dir):
        if os.path.isdir(directory):
            entries.extend(e for e in _scan(directory) if e not in entries)
    if downloads_allowed():
        entries.extend(name for name in OFFICIAL_ENTRIES[kind] if name not in entries)
    return sorted(entries)


def choices(kind: str, prefer: str, models_dir: Optional[str] = None, exclude: tuple = ()) -> List[str]:
    """Combo options: entries whose name contains ``prefer`` first (the widget's default), then the rest."""
    entries = [e for e in list_entries(kind, models_dir) if not any(x in e.lower() for x in exclude)]
    preferred = [e for e in entries if prefer.lower() in e.lower()]
    return preferred + [e for e in entries if e not in preferred]


def resolve(kind: str, name: str, node: str, models_dir: Optional[str] = None) -> str:
    """Absolute path of an entry; downloads it first when allowed; ModelFileError naming where it was looked for."""
    if not name or name.startswith("/") or ".." in name.replace("\\", "/").split("/"):
        raise ModelFileError(f"{node}: invalid model name {name!r}")
    dirs = folder_dirs(kind, models_dir)
    for directory in dirs:
        path = os.path.join(directory, *name.split("/"))
        if os.path.isfile(path) or is_diffusers_folder(path):
            return path
    official = OFFICIAL_ENTRIES[kind].get(name)
    if official is not None and downloads_allowed() and dirs:
        return download(kind, name, dirs[0], node)
    where = f" (published at {official['url']})" if official else ""
    raise ModelFileError(
        f"{node}: model {name!r} not found in {dirs or ['<no models folder>']}{where}; put it there, or set "
        f"{ALLOW_DOWNLOAD_ENV}=1 to let the pack download the official files"
    )


def downloads_allowed() -> bool:
    return os.environ.get(ALLOW_DOWNLOAD_ENV, "").strip().lower() in ("1", "true", "yes")


def download(kind: str, name: str, directory: str, node: str) -> str:
    """Fetch exactly the files of one official entry into ``directory`` (only when downloads are allowed)."""
    if not downloads_allowed():
        raise ModelFileError(f"{node}: downloads are off; set {ALLOW_DOWNLOAD_ENV}=1 to fetch {name!r}")
    spec = OFFICIAL_ENTRIES[kind][name]
    target = os.path.join(directory, *name.split("/"))
    os.makedirs(os.path.dirname(target) if "." in os.path.basename(name) else target, exist_ok=True)
    log.info("%s: downloading %s into %s", node, name, target)
    if "hf_repo" in spec:
        try:
            hub = importlib.import_module("huggingface_hub")
        except ImportError as exc:
            raise ModelFileError(f"{node}: downloading {name!r} needs huggingface_hub (pip install huggingface_hub)") from exc
        for remote in spec["hf_files"]:
            local = hub.hf_hub_download(repo_id=spec["hf_repo"], filename=remote)
            rel = os.path.relpath(remote, spec["hf_prefix"])
            dest = target if rel == os.path.basename(name) else os.path.join(target, rel)
            _copy_atomic(local, dest)
    else:
        with urllib.request.urlopen(spec["http"]) as response:  # noqa: S310 - fixed https URL from the table
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target), suffix=".part")
            with os.fdopen(fd, "wb") as out:
                shutil.copyfileobj(response, out)
            os.replace(tmp, target)
    return target


def _copy_atomic(src: str, dest: str) -> None:
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dest), suffix=".part")
    os.close(fd)
    shutil.copyfile(src, tmp)
    os.replace(tmp, dest)
