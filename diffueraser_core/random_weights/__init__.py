"""Random weights in the official file layouts, for tests, benchmarks and the demo (no download possible here).

Modules: diffusion.py (unet_main, brushnet folders), lora.py (PCM LoRA files), propainter.py (the three .pth
files), sd15.py (VAE and text encoder as ComfyUI users keep them). ``make_models_folder`` builds a whole
ComfyUI-style models folder.
"""
