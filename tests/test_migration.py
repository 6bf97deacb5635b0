"""Replacements for the incumbent pack's nodes (nodes/migration.py) point at real inputs with valid values, and
registering them is a no-op on hosts without the node-replacement API."""

import asyncio

import pytest

import nodes as pack
from nodes import migration

# The incumbent's inputs per node id (smthemex/ComfyUI_DiffuEraser, diffueraser_node.py: V3 ids from 2025-12, V1
# DiffuEraserLoader from 2025-02..09): sockets and widgets by name.
INCUMBENT_INPUTS = {
    "Propainter_Loader": {"propainter", "flow", "fix_raft", "device"},
    "DiffuEraser_Loader": {"vae", "lora"},
    "DiffuEraserLoader": {"checkpoint", "lora"},
    "DiffuEraser_PreData": {"images", "seg_repo", "video_mask_image", "video_mask"},
    "Propainter_Sampler": {"model", "conditioning", "fps", "video_length", "mask_dilation_iter", "ref_stride",
                           "neighbor_length", "subvideo_length"},
    "DiffuEraser_Sampler": {"model", "positive", "conditioning", "steps", "seed", "save_result_video", "unet_group",
                            "brush_group", "blended"},
}
INCUMBENT_OUTPUTS = {"Propainter_Loader": 1, "DiffuEraser_Loader": 1, "DiffuEraserLoader": 1,
                     "DiffuEraser_PreData": 1, "Propainter_Sampler": 2, "DiffuEraser_Sampler": 1}


@pytest.mark.parametrize("spec", migration.REPLACEMENTS, ids=[r["old_node_id"] for r in migration.REPLACEMENTS])
def test_replacement_maps_existing_inputs_to_valid_values(spec):
    assert spec["old_node_id"] not in pack.NODE_CLASS_MAPPINGS  # an id we own is never replaced
    cls = pack.NODE_CLASS_MAPPINGS[spec["new_node_id"]]
    declared = {}
    for section in ("required", "optional"):
        declared.update(cls.INPUT_TYPES().get(section, {}))
    assert set(spec["old_widget_ids"]) <= INCUMBENT_INPUTS[spec["old_node_id"]]
    for entry in spec["input_mapping"]:
        typ, opts = declared[entry["new_id"]]
        if "old_id" in entry:
            assert entry["old_id"] in INCUMBENT_INPUTS[spec["old_node_id"]], entry
        else:
            value = entry["set_value"]
            if typ == "COMBO":
                assert value in opts["options"] or spec["new_node_id"].endswith("Loader"), entry
            else:
                assert opts["min"] <= value <= opts["max"], entry
    for out in spec["output_mapping"] or []:
        assert out["new_idx"] < len(cls.RETURN_TYPES) and out["old_idx"] < INCUMBENT_OUTPUTS[spec["old_node_id"]]


def test_loader_replacements_select_the_official_files():
    for spec in migration.REPLACEMENTS:
        if spec["new_node_id"].endswith("Loader"):
            values = {e["new_id"]: e.get("set_value") for e in spec["input_mapping"]}
            for name, official in migration.OFFICIAL.items():
                if name in values:
                    assert values[name] == official


def test_register_without_the_host_api_registers_nothing():
    assert asyncio.run(migration.register_replacements()) == 0
