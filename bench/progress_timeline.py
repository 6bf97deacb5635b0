"""Progress-event timeline of each long node: when the first event comes (as % of the node's run), how many come
per minute, and the longest silence. Runs the nodes themselves (tiny diffusion networks, full-size ProPainter
networks, random weights) on the CPU through their runtime; every ``runtime.progress`` call is what ComfyUI turns
into a progress event (and every call is also a cancel point).

    python bench/progress_timeline.py [--json OUT.json] [--repo PATH]

``--repo`` runs another checkout of the pack (e.g. an older commit in a git worktree) for a before/after
comparison; its node classes may be V1 (FUNCTION method) or V3 (``execute``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, List

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
# Clip sizes: long enough for several chunks and windows, small enough for a shared 2-core CPU (~2 min in all).
PRIOR_CLIP = dict(frames=24, height=64, width=96)
SAMPLER_CLIP = dict(frames=48, height=64, width=96)
INJECTION_CLIP = dict(frames=48, height=128, width=192)


def _clip(frames: int, height: int, width: int):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(frames, height, width, 3, generator=g)
    mask = torch.zeros(frames, height, width)
    for t in range(frames):
        x = 10 + t % (width // 3)
        mask[t, height // 4: height // 2 + 8, x: x + width // 4] = 1.0
    return images, mask


class ComfyLikeVae:
    """ComfyUI's VAE API around a diffusers AutoencoderKL (IMAGE 0..1 -> raw latent, and back)."""

    def __init__(self, vae):
        self.vae = vae

    def encode(self, pixels):
        with torch.no_grad():
            return self.vae.encode(pixels.movedim(-1, 1) * 2 - 1).latent_dist.mean.float()

    def decode(self, latent):
        with torch.no_grad():
            return ((self.vae.decode(latent).sample + 1) / 2).clamp(0, 1).movedim(1, -1).float()


def _call(cls, **kwargs):
    """Run a node class of either API generation: V3 ``execute`` or V1 ``FUNCTION``."""
    if hasattr(cls, "define_schema"):
        return tuple(cls.execute(**kwargs))
    return getattr(cls(), cls.FUNCTION)(**kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repo", default=os.path.dirname(HERE))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    sys.path.insert(0, os.path.abspath(args.repo))
    torch.manual_seed(0)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

    import nodes as pack
    from diffueraser_core import random_weights
    from diffueraser_core.models import sd15_components
    from diffueraser_core.runtime import StandaloneRuntime
    from nodes import bridge, folders

    cache = os.path.join(HERE, ".cache", "progress_timeline")
    index = os.path.join(cache, "paths.json")
    if not os.path.isfile(index):
        paths = random_weights.make_models_folder(cache, size="tiny")
        with open(index, "w", encoding="utf-8") as f:
            json.dump(paths, f)
    with open(index, encoding="utf-8") as f:
        paths = json.load(f)
    os.environ[folders.MODELS_DIR_ENV] = cache

    events: List[tuple] = []

    heartbeat_mixin = getattr(bridge, "ProgressHeartbeat", None)
    if heartbeat_mixin is not None:
        # what ComfyRuntime sends: the stages' reports plus heartbeats from inside the networks' forwards
        class RecordingRuntime(heartbeat_mixin, StandaloneRuntime):
            def _send(self, stage, done, total, preview=None, preview_latent=None):
                events.append((time.monotonic(), stage, float(done), float(total),
                               preview is not None or preview_latent is not None))
    else:
        class RecordingRuntime(StandaloneRuntime):
            def progress(self, stage, done, total, preview=None, preview_latent=None):
                events.append((time.monotonic(), stage, float(done), float(total),
                               preview is not None or preview_latent is not None))
                super().progress(stage, done, total, preview, preview_latent)

    def recording_runtime(node_name, unique_id=None):
        bridge.get_runtime(node_name, unique_id)  # keeps the bridge's per-run bookkeeping
        runtime = RecordingRuntime()
        if hasattr(bridge, "set_current_runtime"):
            bridge.set_current_runtime(runtime)  # the networks' heartbeat hooks report to it
        return runtime

    for module in ("nodes.nodes_prior", "nodes.nodes_sampling", "nodes.nodes_loaders"):
        mod = sys.modules[module]
        if hasattr(mod, "get_runtime"):
            mod.get_runtime = recording_runtime

    vae = ComfyLikeVae(sd15_components.load_vae(paths["vae"]))
    text_encoder = sd15_components.load_text_encoder(paths["text_encoder"])
    positive = [[sd15_components.encode_prompt(text_encoder, ""), {}]]

    N = pack.NODE_CLASS_MAPPINGS
    (pnets,) = _call(N["DiffuEraserProPainterLoader"], raft="raft-things.pth",
                     flow_completion="recurrent_flow_completion.pth", propainter="ProPainter.pth")
    (model,) = _call(N["DiffuEraserModelLoader"], unet_main="diffuEraser/unet_main", brushnet="diffuEraser/brushnet",
                     pcm_lora="pcm_sd15_smallcfg_2step_converted.safetensors", lora_strength=1.0)

    runs: Dict[str, dict] = {}

    def timed(name, fn):
        events.clear()
        start = time.monotonic()
        out = fn()
        end = time.monotonic()
        duration = end - start
        times = [e[0] - start for e in events]
        gaps = [b - a for a, b in zip([0.0] + times, times + [duration])]
        runs[name] = {
            "seconds": round(duration, 2),
            "events": len(events),
            "first_event_pct": round(100 * times[0] / duration, 1) if times else None,
            "first_event_s": round(times[0], 2) if times else None,
            "events_per_min": round(60 * len(events) / duration, 1),
            "longest_silence_s": round(max(gaps), 2),
            "previews": sum(1 for e in events if e[4]),
            "stages": sorted({e[1] for e in events}),
            "timeline": [(round(t, 2), s, round(d, 3), tot) for t, (_, s, d, tot, _) in zip(times, events)],
        }
        print(f"{name}: {json.dumps({k: v for k, v in runs[name].items() if k != 'timeline'})}", file=sys.stderr)
        return out

    images, mask = _clip(**PRIOR_CLIP)
    timed("ProPainter Prior", lambda: _call(
        N["DiffuEraserProPainterPrior"], images=images, mask=mask, propainter_model=pnets, resize_ratio=1.0,
        max_side=960, mask_dilation=4, ref_stride=10, neighbor_length=10, subvideo_length=50, raft_iter=20))
    images, mask = _clip(**INJECTION_CLIP)
    timed("Prior Injection", lambda: _call(
        N["DiffuEraserPriorInjection"], vae=vae, prior=images, seed=0, mode="forward_noise", strength=1.0,
        max_side=960, inversion_steps=2))
    images, mask = _clip(**SAMPLER_CLIP)
    (latent,) = _call(N["DiffuEraserPriorInjection"], vae=vae, prior=images, seed=0, mode="forward_noise",
                      strength=1.0, max_side=960, inversion_steps=2)
    timed("Sampler", lambda: _call(
        N["DiffuEraserSampler"], diffueraser_model=model, vae=vae, positive=positive, images=images, mask=mask,
        latent=latent, steps=2, cfg=0.0, window_length=22, window_overlap=5, brushnet_scale=1.0,
        pre_inference=True, mask_dilation=8))
    result = {"repo": os.path.abspath(args.repo), "clips": {"prior": PRIOR_CLIP, "injection": INJECTION_CLIP,
                                                            "sampler": SAMPLER_CLIP}, "nodes": runs}
    text = json.dumps(result, indent=1)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    else:
        print(text)


if __name__ == "__main__":
    main()
