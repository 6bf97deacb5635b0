"""One file per network, plus checkpoints.py (safe reading, family detection, loading) and lora.py."""

from .. import log_filters

log_filters.install()  # before any network is loaded or moved: diffusers' empty float32-modules warning
