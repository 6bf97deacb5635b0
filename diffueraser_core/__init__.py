"""DiffuEraser video inpainting, pure torch/diffusers (never imports ComfyUI).

Data flow, one module per stage:
video.py / masks.py -> prior_propainter.py -> prior_injection.py -> windows.py / pre_inference.py
-> temporal_sampling.py -> blend.py (schedule.py: the noise schedule and update step they share); pipeline.py strings them together, cli.py runs it without ComfyUI.
Networks live in models/, one file per network. runtime.py is the seam to the host (ComfyUI or standalone).
"""

__version__ = "0.1.0"
