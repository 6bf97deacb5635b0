"""Replacements for the node ids of the incumbent DiffuEraser pack (smthemex/ComfyUI_DiffuEraser), offered by
ComfyUI's node-replacement API when a workflow saved with that pack is opened (ComfyUI versions that have
``ComfyAPI().node_replacement``; older ones skip this silently).

Read from the incumbent's node declarations (ids, widget and socket names); its graph differs from ours (one
"conditioning" dict carries images and masks between its nodes), so a replacement maps what has a counterpart -
models, ProPainter settings, steps, the mask - and the user reconnects images and masks. Its 2025-02..09 V1
``DiffuEraserSampler`` has the same id as our sampler, so it cannot be replaced (ours loads in its place with its
own inputs); its ``DiffuEraserLoader`` can.
"""

from __future__ import annotations

import logging
from typing import Dict, List

log = logging.getLogger(__name__)

OFFICIAL = {
    "unet_main": "diffuEraser/unet_main",
    "brushnet": "diffuEraser/brushnet",
    "pcm_lora": "pcm_sd15_smallcfg_2step_converted.safetensors",
    "raft": "raft-things.pth",
    "flow_completion": "recurrent_flow_completion.pth",
    "propainter": "ProPainter.pth",
}


def _old(new_id: str, old_id: str) -> Dict[str, str]:
    return {"new_id": new_id, "old_id": old_id}


def _set(new_id: str, value) -> Dict[str, object]:
    return {"new_id": new_id, "set_value": value}


def _official_models(*names: str) -> List[Dict[str, object]]:
    # the incumbent's model widgets name files in its own folder layout: ours are set to the official names
    return [_set(name, OFFICIAL[name]) for name in names]


# new_node_id, old_node_id, old_widget_ids, input_mapping, output_mapping (as io.NodeReplace takes them)
REPLACEMENTS = [
    dict(new_node_id="DiffuEraserProPainterLoader", old_node_id="Propainter_Loader",
         old_widget_ids=["propainter", "flow", "fix_raft", "device"],
         input_mapping=_official_models("raft", "flow_completion", "propainter"),
         output_mapping=[{"new_idx": 0, "old_idx": 0}]),
    dict(new_node_id="DiffuEraserModelLoader", old_node_id="DiffuEraser_Loader",
         old_widget_ids=["vae", "lora"],
         input_mapping=_official_models("unet_main", "brushnet", "pcm_lora") + [_set("lora_strength", 1.0)],
         output_mapping=[{"new_idx": 0, "old_idx": 0}]),
    dict(new_node_id="DiffuEraserModelLoader", old_node_id="DiffuEraserLoader",
         old_widget_ids=["checkpoint", "lora"],
         input_mapping=_official_models("unet_main", "brushnet", "pcm_lora") + [_set("lora_strength", 1.0)],
         output_mapping=[{"new_idx": 0, "old_idx": 0}]),
    dict(new_node_id="DiffuEraserPrepareMask", old_node_id="DiffuEraser_PreData",
         old_widget_ids=["seg_repo"],
         input_mapping=[_old("mask_video", "video_mask_image"), _old("mask", "video_mask"),
                        _set("mask_dilation", 8), _set("threshold", 0.5)],
         output_mapping=None),
    dict(new_node_id="DiffuEraserProPainterPrior", old_node_id="Propainter_Sampler",
         old_widget_ids=["video_length", "mask_dilation_iter", "ref_stride", "neighbor_length", "subvideo_length"],
         input_mapping=[_old("propainter_model", "model"), _old("mask_dilation", "mask_dilation_iter"),
                        _old("ref_stride", "ref_stride"), _old("neighbor_length", "neighbor_length"),
                        _old("subvideo_length", "subvideo_length")],
         # the incumbent's outputs are (conditioning, images): its images are our prior
         output_mapping=[{"new_idx": 0, "old_idx": 1}]),
    dict(new_node_id="DiffuEraserSampler", old_node_id="DiffuEraser_Sampler",
         old_widget_ids=["steps", "seed", "save_result_video", "unet_group", "brush_group", "blended"],
         input_mapping=[_old("diffueraser_model", "model"), _old("positive", "positive"), _old("steps", "steps")],
         # its output is finished frames, ours a LATENT for VAEDecode: nothing to carry over
         output_mapping=None),
]


async def register_replacements() -> int:
    """Register every replacement with the host; returns how many were registered (0 on hosts without the API)."""
    try:
        from comfy_api.latest import ComfyAPI, io
    except ImportError:
        return 0
    api = ComfyAPI()
    registry = getattr(api, "node_replacement", None)
    if registry is None or not hasattr(io, "NodeReplace"):
        log.debug("DiffuEraser: this ComfyUI has no node-replacement API; incumbent-pack ids not mapped")
        return 0
    for spec in REPLACEMENTS:
        await registry.register(io.NodeReplace(**spec))
    return len(REPLACEMENTS)
