"""ComfyUI entry point of the DiffuEraser pack (V3: ``comfy_entrypoint``). Cheap to import: no model, CUDA or file
work here."""

import os
import sys

_PACK_DIR = os.path.dirname(os.path.abspath(__file__))
# diffueraser_core is imported by absolute name from nodes/; appended (not prepended) so the pack can never
# shadow ComfyUI's own top-level modules.
if _PACK_DIR not in sys.path:
    sys.path.append(_PACK_DIR)

from .nodes import comfy_entrypoint  # noqa: E402

# Only comfy_entrypoint: ComfyUI ignores it when NODE_CLASS_MAPPINGS is also exported (the pack would then be V1).
__all__ = ["comfy_entrypoint"]
