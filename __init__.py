"""ComfyUI entry point of the DiffuEraser pack. Cheap to import: no model, CUDA or file work here."""

import os
import sys

_PACK_DIR = os.path.dirname(os.path.abspath(__file__))
# diffueraser_core is imported by absolute name from nodes/; appended (not prepended) so the pack can never
# shadow ComfyUI's own top-level modules.
if _PACK_DIR not in sys.path:
    sys.path.append(_PACK_DIR)

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
