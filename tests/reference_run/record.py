"""Record the official DiffuEraser code's intermediate tensors on the reference-run clip (see README.md here).

Run once, by hand, in a separate environment that has the official code's versions (diffusers 0.29.2,
transformers 4.41.1, huggingface_hub < 0.26, numpy < 2, opencv, scipy, einops, matplotlib, peft):

    python tests/reference_run/record.py --official DIR_OF_THE_OFFICIAL_CODE --inputs DIR_FROM_inputs.py \
        --out tests/reference_run/reference.safetensors

This file contains none of the official code: it imports it from ``--official`` and changes its behaviour only
through the run-time patches listed in ``PATCHES`` (printed into the output's metadata). Nothing of the official
tree is edited.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import types

import numpy as np
import torch

PATCHES = [
    "torchvision: a stand-in module (ops.deform_conv2d = this project's pure-torch deform_conv2d_torch; "
    "io.read_video returns the clip from memory; transforms.Compose composes callables)",
    "cv2.VideoCapture / cv2.VideoWriter in propainter.inference and diffueraser.diffueraser: in-memory and lossless "
    "(the reference round-trips the prior through an mp4v file; the recorded prior is what it wrote, before the codec)",
    "torch.float16 -> torch.float32 inside diffueraser.diffueraser (its hard-coded casts; CPU run in fp32)",
    "DiagonalGaussianDistribution.sample -> its mean (every VAE encode, prior and conditioning)",
    "randn_tensor in diffueraser.diffueraser: recorded (noise_pre), drawn from torch.manual_seed(SEED)",
]


def install_torchvision_stand_in(repo: str) -> None:
    sys.path.insert(0, repo)
    from diffueraser_core.models.deform_conv import deform_conv2d_torch

    tv = types.ModuleType("torchvision")
    ops = types.ModuleType("torchvision.ops")
    ops.deform_conv2d = deform_conv2d_torch
    io = types.ModuleType("torchvision.io")
    io.VIDEOS = {}

    def read_video(filename, pts_unit="sec", end_pts=None, **_):
        frames, fps = io.VIDEOS[filename]
        if end_pts is not None:
            frames = frames[: int(round(end_pts * fps))]
        return torch.from_numpy(frames.copy()), torch.zeros(0), {"video_fps": float(fps)}

    io.read_video = read_video
    transforms = types.ModuleType("torchvision.transforms")

    class Compose:
        def __init__(self, fns):
            self.fns = fns

        def __call__(self, x):
            for fn in self.fns:
                x = fn(x)
            return x

    transforms.Compose = Compose
    models = types.ModuleType("torchvision.models")
    models.vgg = types.ModuleType("torchvision.models.vgg")
    tv.ops, tv.io, tv.transforms, tv.models = ops, io, transforms, models
    for name, module in {"torchvision": tv, "torchvision.ops": ops, "torchvision.io": io,
                         "torchvision.transforms": transforms, "torchvision.models": models,
                         "torchvision.models.vgg": models.vgg}.items():
        sys.modules[name] = module


class MemoryVideos:
    """cv2 stand-in for the two modules: videos live in ``self.store`` as lists of BGR uint8 arrays."""

    def __init__(self, cv2_module):
        self.cv2 = cv2_module
        self.store = {}
        self.fps = {}
        store, fps_of = self.store, self.fps

        class VideoCapture:
            def __init__(self, path):
                self.frames = list(store.get(path, []))
                self.fps = fps_of.get(path, 0.0)
                self.opened = path in store

            def isOpened(self):
                return self.opened

            def get(self, prop):
                if prop == cv2_module.CAP_PROP_FPS:
                    return self.fps
                raise NotImplementedError(prop)

            def read(self):
                if not self.frames:
                    return False, None
                return True, self.frames.pop(0).copy()

            def release(self):
                pass

        class VideoWriter:
            def __init__(self, path, fourcc, fps, size):
                self.path = path
                store[path] = []
                fps_of[path] = float(fps)
                open(path, "wb").close()  # the reference deletes the prior file after reading it

            def write(self, frame):
                store[self.path].append(np.array(frame, dtype=np.uint8, copy=True))

            def release(self):
                pass

        self.VideoCapture = VideoCapture
        self.VideoWriter = VideoWriter

    def __getattr__(self, name):
        return getattr(self.cv2, name)


class Fp32Torch:
    """``torch`` for the official module whose casts say float16: float16 reads as float32."""

    float16 = torch.float32

    def __getattr__(self, name):
        return getattr(torch, name)


def sparse(name, tensor, where, out):
    """uint8 frames ``[T,H,W,3]`` kept only at ``where`` (bool [T,H,W]): flat indices + values."""
    idx = np.flatnonzero(where.reshape(-1))
    out[name + ".index"] = torch.from_numpy(idx.astype(np.int32))
    out[name + ".values"] = torch.from_numpy(np.ascontiguousarray(tensor.reshape(-1, 3)[idx]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official", required=True, help="work tree of lixiaowen-xw/DiffuEraser")
    parser.add_argument("--inputs", required=True, help="folder written by tests/reference_run/inputs.py")
    parser.add_argument("--out", required=True)
    parser.add_argument("--part", choices=("diffusion", "prior"), default="diffusion",
                        help="diffusion: the whole run on the 60-frame clip; prior: ProPainter alone on prior_clip.pt")
    args = parser.parse_args(argv)
    repo = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import inputs as spec  # this folder's inputs.py (constants only are used here)

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    import cv2
    import scipy.ndimage
    import transformers  # noqa: F401  (imported before the stand-in, so neither library sees a torchvision)
    from diffusers.models.autoencoders import vae as vae_module

    install_torchvision_stand_in(repo)
    sys.path.insert(0, os.path.abspath(args.official))

    vae_module.DiagonalGaussianDistribution.sample = lambda self, generator=None: self.mean
    import diffueraser.diffueraser as de
    import diffueraser.pipeline_diffueraser as dp
    import propainter.inference as pi

    videos = MemoryVideos(cv2)
    de.cv2 = videos
    pi.cv2 = videos
    de.torch = Fp32Torch()

    recorded = {}
    real_randn = de.randn_tensor

    def randn_recorded(*a, **k):
        out = real_randn(*a, **k)
        recorded.setdefault("noise_pre", out.clone())
        return out

    de.randn_tensor = randn_recorded
    calls = []
    real_call = dp.StableDiffusionDiffuEraserPipeline.__call__

    def call_recorded(self, *a, **k):
        result = real_call(self, *a, **k)
        calls.append({"start": k["latents"].clone(), "out": result.latents.clone(),
                      "frames": [np.asarray(f) for f in result.frames],
                      "masks": [np.asarray(m) for m in k["masks"]], "images": [np.asarray(m) for m in k["images"]]})
        return result

    dp.StableDiffusionDiffuEraserPipeline.__call__ = call_recorded

    if args.part == "prior":
        return record_prior(args, spec, videos, pi, repo)
    clip = torch.load(os.path.join(args.inputs, "clip.pt"), weights_only=True)
    frames = clip["frames"].numpy()
    masks = clip["masks"].numpy()
    fps = float(clip["fps"])
    paths = json.load(open(os.path.join(args.inputs, "paths.json"), encoding="utf-8"))
    work = os.path.join(os.path.abspath(args.inputs), "run")
    os.makedirs(work, exist_ok=True)
    video_path, mask_path = os.path.join(work, "video.mp4"), os.path.join(work, "mask.mp4")
    prior_path, output_path = os.path.join(work, "priori.mp4"), os.path.join(work, "result.mp4")
    sys.modules["torchvision.io"].VIDEOS[video_path] = (frames, fps)
    videos.store[mask_path] = [np.repeat((m.astype(np.uint8) * 255)[..., None], 3, axis=2) for m in masks]
    videos.fps[mask_path] = fps
    video_seconds = spec.NUM_FRAMES / fps

    device = torch.device("cpu")
    os.chdir(paths["official_cwd"])  # the LoRA folder is hard-coded as weights/PCM_Weights
    eraser = de.DiffuEraser(device, paths["official_base"], paths["official_vae"],
                            os.path.dirname(paths["unet_main"]), ckpt=spec.PCM_CHECKPOINT)
    propainter = pi.Propainter(paths["propainter_dir"], device=device)
    propainter.forward(video_path, mask_path, prior_path, resize_ratio=spec.RESIZE_RATIO, video_length=video_seconds,
                       mask_dilation=spec.MASK_DILATION, ref_stride=spec.REF_STRIDE,
                       neighbor_length=spec.NEIGHBOR_LENGTH, subvideo_length=spec.SUBVIDEO_LENGTH,
                       raft_iter=spec.RAFT_ITER)
    prior_rgb = np.stack([f[..., ::-1] for f in videos.store[prior_path]])  # written as BGR
    add_noise_inputs = []
    real_add_noise = eraser.noise_scheduler.add_noise

    def add_noise_recorded(original, noise, timesteps):
        add_noise_inputs.append((original.clone(), noise.clone()))
        return real_add_noise(original, noise, timesteps)

    eraser.noise_scheduler.add_noise = add_noise_recorded
    torch.manual_seed(spec.SEED)
    eraser.forward(video_path, mask_path, prior_path, output_path, max_img_size=spec.MAX_IMG_SIZE,
                   video_length=video_seconds, mask_dilation_iter=spec.MASK_DILATION, nframes=spec.WINDOW_LENGTH,
                   guidance_scale=None)
    composed = np.stack([f[..., ::-1] for f in videos.store[output_path]])
    assert len(calls) == 2 and len(add_noise_inputs) == 2, (len(calls), len(add_noise_inputs))
    pre, main_pass = calls
    (pre_prior, pre_noise), (main_prior, main_noise) = add_noise_inputs
    # prior latents of every frame: the main pass's input, with the keyframes' own prior latents put back
    keyframes = [int(i * (spec.NUM_FRAMES / spec.WINDOW_LENGTH)) for i in range(spec.WINDOW_LENGTH)]
    # the reference's own choice: the frames whose mask it blanked for the main pass (every clip frame has a hole)
    blanked = [i for i, m in enumerate(main_pass["masks"]) if not m.any()]
    assert blanked == keyframes, (blanked, keyframes)
    prior_latents = main_prior.clone()
    prior_latents[keyframes] = pre_prior
    decoded = np.stack(main_pass["frames"])
    # where the hole (and the blur around it) can differ from the input: the mask grown by dilation + blur radius
    near_hole = np.stack([scipy.ndimage.binary_dilation(m, np.ones((3, 3), bool), iterations=spec.MASK_DILATION + 11)
                          for m in masks])
    out = {
        "noise_pre": recorded["noise_pre"].float().contiguous(),
        "prior_latents": prior_latents.float().contiguous(),
        "pre_start_latents": pre["start"].float().contiguous(),
        "pre_latents": pre["out"].float().contiguous(),
        "start_latents": main_pass["start"].float().contiguous(),
        "final_latents": main_pass["out"].float().contiguous(),
        "keyframes": torch.tensor(keyframes, dtype=torch.int32),
    }
    sparse("prior_frames", prior_rgb, (prior_rgb != frames).any(-1), out)
    sparse("decoded_frames", decoded, near_hole, out)
    sparse("composed_frames", composed, (composed != frames).any(-1) | near_hole, out)
    save(out, args, repo, spec.NUM_FRAMES, spec.HEIGHT, spec.WIDTH)
    return 0


def record_prior(args, spec, videos, pi, repo) -> int:
    """ProPainter alone on the small square clip (its RAFT levels stay >= 2 pixels), with the small settings."""
    clip = torch.load(os.path.join(args.inputs, "prior_clip.pt"), weights_only=True)
    frames, masks, fps = clip["frames"].numpy(), clip["masks"].numpy(), float(clip["fps"])
    paths = json.load(open(os.path.join(args.inputs, "paths.json"), encoding="utf-8"))
    work = os.path.join(os.path.abspath(args.inputs), "run")
    os.makedirs(work, exist_ok=True)
    video_path, mask_path = os.path.join(work, "prior_video.mp4"), os.path.join(work, "prior_mask.mp4")
    prior_path = os.path.join(work, "prior_out.mp4")
    sys.modules["torchvision.io"].VIDEOS[video_path] = (frames, fps)
    videos.store[mask_path] = [np.repeat((m.astype(np.uint8) * 255)[..., None], 3, axis=2) for m in masks]
    videos.fps[mask_path] = fps
    propainter = pi.Propainter(paths["propainter_dir"], device=torch.device("cpu"))
    propainter.forward(video_path, mask_path, prior_path, resize_ratio=spec.RESIZE_RATIO,
                       video_length=spec.PRIOR_FRAMES / fps, mask_dilation=spec.MASK_DILATION,
                       ref_stride=spec.PRIOR_REF_STRIDE, neighbor_length=spec.PRIOR_NEIGHBOR_LENGTH,
                       subvideo_length=spec.PRIOR_SUBVIDEO_LENGTH, raft_iter=spec.RAFT_ITER)
    prior_rgb = np.stack([f[..., ::-1] for f in videos.store[prior_path]])
    out = {}
    sparse("prior_frames", prior_rgb, (prior_rgb != frames).any(-1), out)
    save(out, args, repo, spec.PRIOR_FRAMES, spec.PRIOR_HEIGHT, spec.PRIOR_WIDTH)
    return 0


def save(out, args, repo, num, height, width) -> None:
    import cv2
    import diffusers
    import transformers
    from safetensors.torch import save_file

    meta = {
        "versions": json.dumps({"torch": torch.__version__, "diffusers": diffusers.__version__,
                                "transformers": transformers.__version__, "numpy": np.__version__,
                                "opencv": cv2.__version__}),
        "patches": json.dumps(PATCHES),
        "shape": json.dumps([num, height, width]),
    }
    save_file(out, os.path.abspath(os.path.join(repo, args.out)) if not os.path.isabs(args.out) else args.out,
              metadata=meta)
    for key, value in out.items():
        print(key, tuple(value.shape), value.dtype)


if __name__ == "__main__":
    raise SystemExit(main())
