"""The SD1.5 VAE as the pipeline's latent codec: uint8 frames <-> raw latents, in chunks, through a runtime handle
(so the host can make room before each call), halving the chunk on out of memory."""

from __future__ import annotations

import logging

import torch

from .errors import InputError

log = logging.getLogger(__name__)

NODE = "DiffuEraser"
#: frames per VAE call (reference: encode in chunks of 4)
VAE_CHUNK = 4
#: VAE activation bytes per image pixel per byte of dtype, for memory_required hints. Derived from the device
#: simulation (device_sim_runs.vae_activation_peak, full-size sd-vae-ft-mse with fused attention: 640 for an encode,
#: 768 for a decode, the same at every size and batch) plus about 10% for the allocator's rounding and the
#: kernels' workspaces; tests/test_device_sim.py keeps them within 1.0-1.3x of the simulation. (ComfyUI's
#: figures for this VAE, 1767 / 2178, were 2.7-2.8x too high: under a 10 GB budget they pushed UNet and BrushNet
#: off the card before every decode although everything fits.)
VAE_ENCODE_BYTES_PER_PIXEL = 704
VAE_DECODE_BYTES_PER_PIXEL = 845

class DiffusersVaeCodec:
    """LatentCodec over a diffusers AutoencoderKL held by a runtime handle.

    encode: uint8 ``[n,H,W,3]`` -> raw latents float32 ``[n,4,H/8,W/8]`` (distribution mean: deterministic; the
    reference samples, quirk 5). decode: raw latents -> uint8 ``[n,8h,8w,3]`` (as diffusers' image processor:
    ``round(clamp(x/2 + 0.5, 0, 1) * 255)``). Chunks of ``chunk`` frames; out of memory halves the chunk.
    """

    def __init__(self, handle, runtime, chunk: int = VAE_CHUNK):
        self.handle = handle
        self.runtime = runtime
        self.chunk = max(1, int(chunk))

    def _run(self, items: torch.Tensor, fn, out_shape, out_dtype, bytes_per_item: int) -> torch.Tensor:
        num = int(items.shape[0])
        out = torch.empty((num, *out_shape), dtype=out_dtype)
        chunk = self.chunk
        start = 0
        try:
            while start < num:
                self.runtime.check_interrupt()
                stop = min(start + chunk, num)
                try:
                    vae = self.handle.acquire(memory_required=bytes_per_item * (stop - start))
                    out[start:stop] = fn(vae, items[start:stop])
                except Exception as exc:  # only out-of-memory is retried
                    if not self.runtime.is_oom(exc) or chunk == 1:
                        raise
                    self.runtime.empty_cache()
                    chunk = max(1, chunk // 2)
                    log.warning("%s VAE: out of memory, retrying with %d frame(s) per chunk", NODE, chunk)
                    continue
                start = stop
        finally:
            self.handle.release()
        return out

    def _itemsize(self) -> int:
        return torch.empty((), dtype=self.runtime.dtype).element_size()

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[-1] != 3:
            raise InputError(f"{NODE} VAE encode: expected uint8 frames [n,H,W,3], got {frames.dtype} {tuple(frames.shape)}")
        n, height, width, _ = frames.shape
        if height % 8 or width % 8:
            raise InputError(f"{NODE} VAE encode: frame size {width}x{height} is not a multiple of 8")
        device = self.runtime.device

        def fn(vae, part):
            dtype = next(vae.parameters()).dtype
            x = part.to(device).permute(0, 3, 1, 2).to(dtype) / 127.5 - 1.0
            return vae.encode(x).latent_dist.mean.to("cpu", torch.float32)

        per_frame = VAE_ENCODE_BYTES_PER_PIXEL * height * width * self._itemsize()
        return self._run(frames, fn, (4, height // 8, width // 8), torch.float32, per_frame)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if latents.dim() != 4 or latents.shape[1] != 4:
            raise InputError(f"{NODE} VAE decode: expected latents [n,4,h,w], got {tuple(latents.shape)}")
        n, _, h, w = latents.shape
        device = self.runtime.device

        def fn(vae, part):
            dtype = next(vae.parameters()).dtype
            x = vae.decode(part.to(device, dtype)).sample.to(torch.float32)
            x = ((x / 2 + 0.5).clamp(0, 1) * 255).round()
            return x.permute(0, 2, 3, 1).to("cpu", torch.uint8)

        per_frame = VAE_DECODE_BYTES_PER_PIXEL * h * w * 64 * self._itemsize()
        return self._run(latents, fn, (h * 8, w * 8, 3), torch.uint8, per_frame)
