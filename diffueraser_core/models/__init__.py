"""One file per network, plus checkpoints.py (safe reading, family detection, loading) and lora.py."""
