"""diffusers' "should be kept in float32: []" warning is gone from model loads and dtype moves; a non-empty list
still warns and nothing else is silenced."""

import logging

import torch

from diffueraser_core import log_filters


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _diffusers_warnings(caplog, fn):
    """Messages the diffusers modeling logger passes on (diffusers' loggers do not propagate to the root, so a
    handler goes on the logger itself; logger filters run before any handler)."""
    logger = logging.getLogger(log_filters.DIFFUSERS_MODELING_LOGGER)
    handler = _Collect()
    # other tests may have turned diffusers' verbosity down (set_verbosity_error): warnings must reach the filter
    level, disabled = logger.level, logger.disabled
    logger.setLevel(logging.WARNING)
    logger.disabled = False
    logger.addHandler(handler)
    try:
        fn()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.disabled = disabled
    return handler.messages


def test_empty_fp32_warning_is_dropped_on_a_real_dtype_move(caplog):
    import diffueraser_core.models  # noqa: F401 - installs the filter, as any model load does
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4, sample_size=16)
    logger = logging.getLogger(log_filters.DIFFUSERS_MODELING_LOGGER)
    filters, logger.filters = list(logger.filters), []
    try:
        unfiltered = _diffusers_warnings(caplog, lambda: vae.to(dtype=torch.float64))
    finally:
        logger.filters = filters
    assert any("should be kept in float32: []" in m for m in unfiltered)  # diffusers still says it
    assert _diffusers_warnings(caplog, lambda: vae.to(dtype=torch.float32)) == []


def test_other_messages_still_pass(caplog):
    log_filters.install()
    log_filters.install()  # idempotent
    logger = logging.getLogger(log_filters.DIFFUSERS_MODELING_LOGGER)
    assert sum(isinstance(f, log_filters.EmptyFp32ModulesFilter) for f in logger.filters) == 1

    def emit():
        logger.warning("There are modules in X that should be kept in float32: ['norm']. Casting directly")
        logger.warning("something else")

    assert _diffusers_warnings(caplog, emit) == [
        "There are modules in X that should be kept in float32: ['norm']. Casting directly", "something else"]
