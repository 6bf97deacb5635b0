"""The pack's one import of ComfyUI's node API: ``comfy_api.latest`` (present in ComfyUI 0.3.64 and in current
ComfyUI; ``v0_0_2`` was dropped later, so ``latest`` is the version both ends share).

Inside ComfyUI ``io`` and ``ComfyExtension`` are the host's. Without ComfyUI (tests, CLI) they come from
``nodes/io_standin.py``, which mirrors the subset the declarations use; the node classes are the same declarations
either way.
"""

from __future__ import annotations

try:  # pragma: no cover - which branch runs depends on the host
    from comfy_api.latest import ComfyExtension, io

    HOST_API = True
except ImportError:
    from . import io_standin as io
    from .io_standin import ComfyExtension

    HOST_API = False


def unique_id(cls) -> "str | None":
    """The node's id in the running prompt (``cls.hidden`` is set by the host on the per-run class clone)."""
    hidden = getattr(cls, "hidden", None)
    return getattr(hidden, "unique_id", None) if hidden is not None else None


__all__ = ["ComfyExtension", "HOST_API", "io", "unique_id"]
