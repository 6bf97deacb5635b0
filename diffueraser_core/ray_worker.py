"""The Ray workers of ``distributed.py``: one actor per GPU (or per few CPUs) that loads every network once and
runs the single-process stage functions on the pieces the driver hands it. Imports nothing of Ray (the driver
passes object references as arguments, which Ray resolves before a method runs)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch

from .errors import InputError

log = logging.getLogger(__name__)

NODE = "DiffuEraser (Ray)"
#: stage names a fault drill may ask a worker to crash in (``WorkerSpec.fault_markers``)
STAGES = ("prior", "encode", "conditioning", "pre-inference", "inversion", "sampling", "decode")


@dataclass
class WorkerSpec:
    """What each worker loads: model file paths (the same on every machine), LoRA, device."""

    model_paths: Dict[str, str]
    prior_only: bool = False
    lora_path: Optional[str] = None
    lora_strength: float = 1.0
    #: "cpu", "cuda" or None (the worker's best device)
    device: Optional[str] = None
    #: torch intra-op threads per worker (CPU workers; None: torch's default)
    threads: Optional[int] = None
    #: fault drills (tests): stage -> marker file. The first worker to start a task of that stage while the file
    #: exists deletes it and kills its own process, as a lost machine would; Ray restarts the worker and re-runs
    #: the task. Restarted workers are armed again, but the deleted file keeps it to one failure per stage. A file
    #: reading ``raise MESSAGE`` makes the task raise ``RuntimeError(MESSAGE)`` instead (the worker lives on).
    fault_markers: Dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        unknown = sorted(set(self.fault_markers) - set(STAGES))
        if unknown:
            raise InputError(f"{NODE}: fault_markers stages must be among {STAGES}, got {unknown}")


class PipelineWorker:
    """A Ray actor body: the networks loaded once, the single-process stage functions on the driver's pieces."""

    def __init__(self, spec: WorkerSpec):
        from .model_loading import load_diffusion_models, load_propainter
        from .runtime import StandaloneRuntime, default_device

        if spec.threads:
            torch.set_num_threads(int(spec.threads))
        self.spec = spec
        self.fail_once: Dict[str, str] = dict(spec.fault_markers)
        self.started: Dict[str, int] = {}
        device = torch.device(spec.device) if spec.device else default_device()
        self.runtime = StandaloneRuntime(device=device)
        self.nets = load_propainter(spec.model_paths, self.runtime)
        self.models = self.codec = self.text = None
        if not spec.prior_only:
            self.models, self.codec, self.text = load_diffusion_models(
                spec.model_paths, spec.lora_path, spec.lora_strength, self.runtime
            )

    def tasks_run(self) -> Dict[str, int]:
        """How many tasks of each stage this worker process started (a restarted worker starts from zero)."""
        return dict(self.started)

    def _maybe_fail(self, stage: str) -> None:
        self.started[stage] = self.started.get(stage, 0) + 1
        marker = self.fail_once.get(stage)
        if marker is None:
            return
        try:
            with open(marker, encoding="utf-8") as handle:
                drill = handle.read().strip()
            os.remove(marker)  # only one worker wins the removal
        except FileNotFoundError:
            return
        if drill.startswith("raise "):
            # an error inside the task (the worker lives on), e.g. a device out of memory
            raise RuntimeError(drill[len("raise "):])
        log.warning("%s: injected failure: worker %d exits inside a %s task", NODE, os.getpid(), stage)
        os._exit(1)

    def describe(self) -> str:
        return f"{os.uname().nodename} pid {os.getpid()} {self.runtime.device} {self.runtime.dtype}"

    # -- the prior's chunks (``prior_distributed``): the single-process chunk functions on the driver's pieces
    def _prior_dtype(self, settings):
        return settings.compute_dtype or self.runtime.dtype

    def prior_raft(self, frames, size, settings):
        from .prior_tasks import raft_task

        self._maybe_fail("prior")
        return raft_task(self.nets, frames, size, settings)

    def prior_sample(self, frames, masks, size, settings):
        from .prior_tasks import sample_task

        self._maybe_fail("prior")
        return sample_task(self.nets, frames, masks, size, settings, self._prior_dtype(settings), self.runtime)

    def prior_complete(self, meta, *parts):
        from .prior_tasks import complete_task

        self._maybe_fail("prior")
        return complete_task(self.nets, meta, parts, self._prior_dtype(meta["settings"]))

    def prior_propagate(self, meta, *parts):
        from .prior_tasks import propagate_task

        self._maybe_fail("prior")
        return propagate_task(self.nets, meta, parts, self._prior_dtype(meta["settings"]))

    def prior_transformer(self, meta, *parts):
        from .prior_tasks import transformer_task

        self._maybe_fail("prior")
        return transformer_task(self.nets, meta, parts, self._prior_dtype(meta["settings"]), self.runtime)

    def prior_composite(self, generated, frames, masks, work_masks):
        from .prior_tasks import composite_task

        self._maybe_fail("prior")
        return composite_task(generated, frames, masks, work_masks)

    def prior_encode(self, generated, frames, masks, work_masks, size):
        from .prior_tasks import composite_task

        self._maybe_fail("encode")
        return composite_task(generated, frames, masks, work_masks, self.codec, size)

    def encode_frames(self, frames, size):
        """One prior range of the sink: resized to the working size and encoded, as ``_PriorLatentSink``."""
        from .video import resize_frames

        self._maybe_fail("encode")
        return self.codec.encode(resize_frames(frames, size))

    def prior_frames(self, frames, masks, settings):
        from .prior_propainter import run_propainter_prior
        from .prior_tasks import shared_tensor

        self._maybe_fail("prior")
        frames, masks = shared_tensor(frames), shared_tensor(masks)
        return run_propainter_prior(frames, masks, self.nets, settings, self.runtime).frames

    def conditioning(self, frames, masks, latent_hw, mask_dilation):
        from .temporal_sampling import build_conditioning

        self._maybe_fail("conditioning")
        cond = build_conditioning(frames, masks, latent_hw, self.codec, mask_dilation)
        return cond.masked_latents, cond.known

    def invert(self, prior_latent, conditioning, injection, window_overlap, brushnet_scale):
        from .prior_injection import invert_prior

        self._maybe_fail("inversion")
        return invert_prior(prior_latent, conditioning, self.text, self.models, injection, self.runtime,
                            window_overlap=window_overlap, brushnet_scale=brushnet_scale)

    def pre_infer(self, start, conditioning, timesteps, window, step=None, pairs=None):
        """``run_pre_inference``; ``step``/``pairs`` as there (default TCD), an LCM step with the driver's noise."""
        from .pre_inference import run_pre_inference

        self._maybe_fail("pre-inference")
        _check_replay(step)
        pre = run_pre_inference(start, conditioning, timesteps, self.text, None, self.models, self.codec, window,
                                self.runtime, step=step, pairs=pairs)
        _check_replayed(step)
        idx = pre.keyframes
        return idx, pre.start_latent[idx], pre.conditioning.masked_latents[idx], pre.conditioning.known[idx]

    def window_step(self, x, masked_latents, known, t, s, step_number, window, stage, step=None):
        """One window through one step: ``denoise_windows`` on the window's own frames is exactly one window.
        ``step``: the update (default TCD); an LCM step carries the noise the driver drew for this window."""
        from .temporal_sampling import Conditioning, denoise_windows

        self._maybe_fail("sampling")
        _check_replay(step)
        moved = denoise_windows(x, [(t, s)], Conditioning(masked_latents, known), self.text, None, self.models,
                                window, self.runtime, stage=stage, step_numbers=[step_number], step=step)
        _check_replayed(step)
        return moved

    def decode_blend(self, latents, frames, masks, mask_dilation, feather):
        from .pipeline import decode_and_blend

        self._maybe_fail("decode")
        return decode_and_blend(latents, frames, masks, self.codec, self.runtime, mask_dilation=mask_dilation,
                                feather=feather)


def _check_replay(step) -> None:
    """A worker never draws step noise of its own: an LCM step must replay the noise the driver drew
    (``SamplerStep.replay``), which holds the run's one generator and draws in the single-process order."""
    from .schedule import PresetNoise

    if step is not None and step.scheduler != "tcd" and not isinstance(step.noise, PresetNoise):
        raise RuntimeError(f"{NODE}: internal error, a worker was sent a sampler step that draws its own noise")


def _check_replayed(step) -> None:
    if step is not None and step.scheduler != "tcd":
        step.noise.check_used()
