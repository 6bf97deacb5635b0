"""Shared workflows name nodes by id: an id, once published, must stay loadable forever.

A node that is replaced keeps its id and class, gets ``DEPRECATED = True`` (ComfyUI then marks it in the node
list and hides it from search) and keeps working. Add new ids to PUBLISHED_NODE_IDS when they ship; never remove
one.
"""

import json
import pathlib

import nodes

PUBLISHED_NODE_IDS = {
    "DiffuEraserModelLoader",
    "DiffuEraserProPainterLoader",
    "DiffuEraserProPainterPrior",
    "DiffuEraserPriorInjection",
    "DiffuEraserSampler",
    "DiffuEraserBlend",
    "DiffuEraserPrepareMask",
}


def test_every_published_node_id_is_still_registered():
    missing = PUBLISHED_NODE_IDS - set(nodes.NODE_CLASS_MAPPINGS)
    assert not missing, f"published node ids removed or renamed: {sorted(missing)}"


def test_new_node_ids_are_recorded_as_published():
    unrecorded = set(nodes.NODE_CLASS_MAPPINGS) - PUBLISHED_NODE_IDS
    assert not unrecorded, f"add these ids to PUBLISHED_NODE_IDS when they ship: {sorted(unrecorded)}"


def test_every_id_has_a_display_name_and_deprecation_is_a_flag():
    for node_id, cls in nodes.NODE_CLASS_MAPPINGS.items():
        assert nodes.NODE_DISPLAY_NAME_MAPPINGS.get(node_id), node_id
        assert isinstance(getattr(cls, "DEPRECATED", False), bool), node_id


def test_shipped_workflows_use_only_registered_pack_ids():
    for path in sorted((pathlib.Path(__file__).resolve().parents[1] / "example_workflows").glob("*.json")):
        workflow = json.loads(path.read_text())
        for node in workflow["nodes"]:
            if node["type"].startswith("DiffuEraser"):
                assert node["type"] in PUBLISHED_NODE_IDS, (path.name, node["type"])


def test_registered_v3_only_through_comfy_entrypoint():
    """ComfyUI registers a pack V1 when its top-level module exports NODE_CLASS_MAPPINGS (comfy_entrypoint is then
    ignored): the pack's __init__ exports only comfy_entrypoint, whose extension lists every node."""
    import ast
    import asyncio

    top = pathlib.Path(__file__).resolve().parents[1] / "__init__.py"
    names = {t.id for node in ast.walk(ast.parse(top.read_text())) if isinstance(node, ast.Assign)
             for t in node.targets if isinstance(t, ast.Name)}
    imported = {a.asname or a.name for node in ast.walk(ast.parse(top.read_text()))
                if isinstance(node, ast.ImportFrom) for a in node.names}
    assert "NODE_CLASS_MAPPINGS" not in names | imported and "comfy_entrypoint" in imported
    extension = asyncio.run(nodes.comfy_entrypoint())
    listed = asyncio.run(extension.get_node_list())
    assert {cls.define_schema().node_id for cls in listed} == set(nodes.NODE_CLASS_MAPPINGS)
