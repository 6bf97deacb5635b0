"""Thin ComfyUI layer: node declarations (ComfyUI's V3 schema, ``comfy_api.latest``), model folders, and the bridge
to ComfyUI's model management.

Node ids are prefixed "DiffuEraser" and never change (saved workflows refer to them). Importing this package
registers the model folders and touches no model, file content or device. ComfyUI registers the nodes through
``comfy_entrypoint`` (the pack's top-level ``__init__``); ``NODE_CLASS_MAPPINGS`` here is the same list keyed by id
for tests and tools, never exported to ComfyUI (a pack registered both ways is registered V1 only).
"""

from . import folders
from .comfy_io import ComfyExtension
from .nodes_loaders import DiffuEraserModelLoader, DiffuEraserProPainterLoader
from .nodes_mask import DiffuEraserPrepareMask
from .nodes_prior import DiffuEraserPriorInjection, DiffuEraserProPainterPrior
from .nodes_sampling import DiffuEraserBlend, DiffuEraserSampler

folders.register_folders()

NODE_LIST = [
    DiffuEraserModelLoader,
    DiffuEraserProPainterLoader,
    DiffuEraserPrepareMask,
    DiffuEraserProPainterPrior,
    DiffuEraserPriorInjection,
    DiffuEraserSampler,
    DiffuEraserBlend,
]

NODE_CLASS_MAPPINGS = {cls.define_schema().node_id: cls for cls in NODE_LIST}
NODE_DISPLAY_NAME_MAPPINGS = {cls.define_schema().node_id: cls.define_schema().display_name for cls in NODE_LIST}


class DiffuEraserExtension(ComfyExtension):
    async def get_node_list(self):
        from .migration import register_replacements

        await register_replacements()
        return list(NODE_LIST)


async def comfy_entrypoint() -> DiffuEraserExtension:
    return DiffuEraserExtension()
