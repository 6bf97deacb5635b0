"""Thin ComfyUI layer: node declarations, model folders, and the bridge to ComfyUI's model management.

Node ids are prefixed "DiffuEraser" and never change (saved workflows refer to them). Importing this package
registers the model folders and touches no model, file content or device.
"""

from . import folders
from .nodes_loaders import DiffuEraserModelLoader, DiffuEraserProPainterLoader
from .nodes_prior import DiffuEraserPriorInjection, DiffuEraserProPainterPrior
from .nodes_sampling import DiffuEraserBlend, DiffuEraserSampler

folders.register_folders()

NODE_CLASS_MAPPINGS = {
    "DiffuEraserModelLoader": DiffuEraserModelLoader,
    "DiffuEraserProPainterLoader": DiffuEraserProPainterLoader,
    "DiffuEraserProPainterPrior": DiffuEraserProPainterPrior,
    "DiffuEraserPriorInjection": DiffuEraserPriorInjection,
    "DiffuEraserSampler": DiffuEraserSampler,
    "DiffuEraserBlend": DiffuEraserBlend,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "DiffuEraserModelLoader": "DiffuEraser Model Loader",
    "DiffuEraserProPainterLoader": "DiffuEraser ProPainter Loader",
    "DiffuEraserProPainterPrior": "DiffuEraser ProPainter Prior",
    "DiffuEraserPriorInjection": "DiffuEraser Prior Injection",
    "DiffuEraserSampler": "DiffuEraser Sampler",
    "DiffuEraserBlend": "DiffuEraser Blend",
}
