"""Loader nodes: the DiffuEraser networks (+ PCM LoRA) and the three ProPainter networks.

Loaded networks are kept per slot (one entry each) so re-running with another LoRA strength only re-patches the
weights; in ComfyUI the LoRA is a set of ModelPatcher weight patches on a clone, the base weights stay untouched.
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Dict, Tuple

from . import folders
from .bridge import ComfyRuntime, get_runtime, install_heartbeats, with_weight_patches
from .comfy_io import io
from .common import CATEGORY_ROOT, DiffuEraserModelType, ProPainterModelType

log = logging.getLogger(__name__)

NO_LORA = "none"
# Most recently loaded network per slot: {slot: (cache key, handle)}.
_LOADED: Dict[str, Tuple[tuple, object]] = {}
_LORA_DELTAS: Dict[str, Tuple[tuple, dict]] = {}


def _file_key(path: str) -> tuple:
    if os.path.isdir(path):
        stats = [os.stat(os.path.join(path, n)) for n in sorted(os.listdir(path))]
        return (path, tuple((s.st_size, s.st_mtime_ns) for s in stats))
    st = os.stat(path)
    return (path, st.st_size, st.st_mtime_ns)


def _cached_handle(slot: str, key: tuple, runtime, build: Callable[[], object], name: str):
    key = key + (type(runtime).__name__,)
    cached = _LOADED.get(slot)
    if cached is not None and cached[0] == key:
        return cached[1]
    _LOADED.pop(slot, None)  # drop the previous network before building the next one
    module = build()
    install_heartbeats(module)  # progress and cancel inside its long forwards
    handle = runtime.wrap(module, name)
    _LOADED[slot] = (key, handle)
    return handle


def clear_cache() -> None:
    """Forget loaded networks (tests; a host that wants the memory back)."""
    _LOADED.clear()
    _LORA_DELTAS.clear()


class DiffuEraserModelLoader(io.ComfyNode):
    NODE = "DiffuEraser Model Loader"

    @classmethod
    def define_schema(cls):
        dfolder = folders.DIFFUERASER_FOLDER
        return io.Schema(
            node_id="DiffuEraserModelLoader",
            display_name=cls.NODE,
            category=f"{CATEGORY_ROOT}/loaders",
            description=("Loads DiffuEraser's motion UNet (unet_main) and BrushNet from models/diffueraser and "
                         "applies the PCM LoRA to the UNet for few-step sampling."),
            inputs=[
                io.Combo.Input("unet_main", options=folders.choices(dfolder, "unet_main", exclude=("brushnet", "pcm_")),
                               tooltip=("DiffuEraser motion UNet: the diffuEraser/unet_main folder (config.json + "
                                        "diffusion_pytorch_model.safetensors) or a single .safetensors in "
                                        "models/diffueraser.")),
                io.Combo.Input("brushnet", options=folders.choices(dfolder, "brushnet", exclude=("unet_main", "pcm_")),
                               tooltip=("DiffuEraser BrushNet: the diffuEraser/brushnet folder or a single "
                                        ".safetensors in models/diffueraser.")),
                io.Combo.Input("pcm_lora",
                               options=folders.choices(dfolder, "pcm_sd15", exclude=("unet_main", "brushnet"))
                               + [NO_LORA],
                               tooltip=("PCM LoRA for few-step sampling (pcm_sd15_smallcfg_2step_converted."
                                        "safetensors for 2 steps, as the reference). 'none' runs the UNet without "
                                        "it.")),
                io.Float.Input("lora_strength", default=1.0, min=-4.0, max=4.0, step=0.05, tooltip=(
                    "Scale of the PCM LoRA (1.0 = reference). Changing it re-patches the weights without reading "
                    "the files again.")),
            ],
            outputs=[
                DiffuEraserModelType.Output(display_name="diffueraser_model", tooltip=(
                    "The motion UNet and BrushNet (with the PCM LoRA), for the DiffuEraser Sampler.")),
            ],
        )

    @classmethod
    def execute(cls, unet_main, brushnet, pcm_lora, lora_strength):
        from diffueraser_core.models import checkpoints, lora
        from diffueraser_core.pipeline import DiffuEraserModels
        from diffueraser_core.schedule import scheduler_for_lora

        runtime = get_runtime(cls.NODE)
        dfolder = folders.DIFFUERASER_FOLDER
        unet_path = folders.resolve(dfolder, unet_main, cls.NODE)
        brush_path = folders.resolve(dfolder, brushnet, cls.NODE)
        lora_path = None if pcm_lora == NO_LORA else folders.resolve(dfolder, pcm_lora, cls.NODE)

        unet_key = _file_key(unet_path)
        if not isinstance(runtime, ComfyRuntime):
            # Standalone LoRA is applied in place: another LoRA file needs fresh base weights.
            unet_key = unet_key + (lora_path and _file_key(lora_path),)
        unet = _cached_handle("unet_main", unet_key, runtime,
                              lambda: checkpoints.load_unet_main(unet_path), "unet_main")
        brush = _cached_handle("brushnet", _file_key(brush_path), runtime,
                               lambda: checkpoints.load_brushnet(brush_path), "brushnet")

        if lora_path is not None:
            lkey = _file_key(lora_path) + (unet_key,)
            cached = _LORA_DELTAS.get("pcm")
            if cached is not None and cached[0] == lkey:
                deltas = cached[1]
            else:
                deltas = lora.lora_deltas(unet.module, lora.read_lora(lora_path), 1.0)
                _LORA_DELTAS["pcm"] = (lkey, deltas)
            unet = with_weight_patches(unet, deltas, float(lora_strength))
        # the LCM-like PCM LoRA is sampled with LCMScheduler, as the reference does (schedule.scheduler_for_lora)
        return io.NodeOutput(DiffuEraserModels(unet=unet, brushnet=brush, scheduler=scheduler_for_lora(lora_path)))


class DiffuEraserProPainterLoader(io.ComfyNode):
    NODE = "DiffuEraser ProPainter Loader"

    @classmethod
    def define_schema(cls):
        pfolder = folders.PROPAINTER_FOLDER
        return io.Schema(
            node_id="DiffuEraserProPainterLoader",
            display_name=cls.NODE,
            category=f"{CATEGORY_ROOT}/loaders",
            description=("Loads the three ProPainter networks (RAFT flow, flow completion, inpainting transformer) "
                         "from models/propainter."),
            inputs=[
                io.Combo.Input("raft", options=folders.choices(pfolder, "raft"),
                               tooltip="RAFT optical flow weights (raft-things.pth) in models/propainter."),
                io.Combo.Input("flow_completion", options=folders.choices(pfolder, "flow_completion"),
                               tooltip=("Recurrent flow completion weights (recurrent_flow_completion.pth) in "
                                        "models/propainter.")),
                io.Combo.Input("propainter", options=folders.choices(pfolder, "propainter"),
                               tooltip="ProPainter transformer weights (ProPainter.pth) in models/propainter."),
            ],
            outputs=[
                ProPainterModelType.Output(display_name="propainter_model", tooltip=(
                    "RAFT, flow completion and the ProPainter transformer, for the ProPainter Prior node.")),
            ],
        )

    @classmethod
    def execute(cls, raft, flow_completion, propainter):
        from diffueraser_core.models import flow_completion as fc_mod
        from diffueraser_core.models import propainter as pp_mod
        from diffueraser_core.models import raft as raft_mod
        from diffueraser_core.prior_propainter import ProPainterNets

        runtime = get_runtime(cls.NODE)
        pfolder = folders.PROPAINTER_FOLDER
        paths = {
            "raft": folders.resolve(pfolder, raft, cls.NODE),
            "flow_completion": folders.resolve(pfolder, flow_completion, cls.NODE),
            "propainter": folders.resolve(pfolder, propainter, cls.NODE),
        }
        loaders = {
            "raft": raft_mod.load_raft,
            "flow_completion": fc_mod.load_flow_completion,
            "propainter": pp_mod.load_propainter,
        }
        handles = {
            slot: _cached_handle(slot, _file_key(path), runtime, lambda p=path, f=loaders[slot]: f(p), slot)
            for slot, path in paths.items()
        }
        return io.NodeOutput(ProPainterNets(raft=handles["raft"], flow_completion=handles["flow_completion"],
                                            generator=handles["propainter"]))
