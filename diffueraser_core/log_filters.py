"""Targeted silencing of known-harmless third-party log lines (never a global level change).

diffusers' ``ModelMixin.to(dtype)`` warns "There are modules in X that should be kept in float32: []. Casting
directly with `to()` ..." whenever a dtype is passed, even when the list of such modules is empty (its
``_keep_in_fp32_modules or []`` is never None). Every model load and every dtype move of the UNet and BrushNet
printed it. Only the empty-list form is dropped: a non-empty list still warns, since it names modules whose
precision matters.
"""

from __future__ import annotations

import logging

#: the logger diffusers emits the warning on (``diffusers.utils.logging.get_logger(__name__)``)
DIFFUSERS_MODELING_LOGGER = "diffusers.models.modeling_utils"
_EMPTY_FP32_LIST = "that should be kept in float32: []."


class EmptyFp32ModulesFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _EMPTY_FP32_LIST not in record.getMessage()


def install() -> None:
    """Attach the filter to diffusers' modeling logger (idempotent; does not import diffusers)."""
    logger = logging.getLogger(DIFFUSERS_MODELING_LOGGER)
    if not any(isinstance(f, EmptyFp32ModulesFilter) for f in logger.filters):
        logger.addFilter(EmptyFp32ModulesFilter())
