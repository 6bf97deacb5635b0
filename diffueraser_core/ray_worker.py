"""The Ray workers of ``distributed.py``: one actor per GPU (or per few CPUs) that loads every network once and
runs the single-process stage functions on the pieces the driver hands it. Imports nothing of Ray at module level
(the worker process has it; ``_RemoteEncodeSink`` imports it when it collects results)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from .errors import InputError
from .pipeline import _PriorLatentSink

log = logging.getLogger(__name__)

NODE = "DiffuEraser (Ray)"
#: prior chunks (FRAME_CHUNK frames each) in flight to the encoding workers per encoding worker
ENCODES_IN_FLIGHT_PER_WORKER = 4
#: stage names a test may ask a worker to crash in once (``PipelineWorker.inject_failure``)
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


class PipelineWorker:
    """A Ray actor body: the networks loaded once, the single-process stage functions on the driver's pieces."""

    def __init__(self, spec: WorkerSpec):
        from .model_loading import load_diffusion_models, load_propainter
        from .runtime import StandaloneRuntime, default_device

        if spec.threads:
            torch.set_num_threads(int(spec.threads))
        self.spec = spec
        self.fail_once: Dict[str, str] = {}
        device = torch.device(spec.device) if spec.device else default_device()
        self.runtime = StandaloneRuntime(device=device)
        self.nets = load_propainter(spec.model_paths, self.runtime)
        self.models = self.codec = self.text = None
        if not spec.prior_only:
            self.models, self.codec, self.text = load_diffusion_models(
                spec.model_paths, spec.lora_path, spec.lora_strength, self.runtime
            )

    def inject_failure(self, stage: str, marker: str) -> None:
        """Fault injection (tests, drills): the first worker to start a ``stage`` task while the file ``marker``
        exists deletes it and kills its own process, as a lost machine would. Ray restarts the worker (its
        constructor does not re-arm this) and re-runs the task."""
        if stage not in STAGES:
            raise InputError(f"{NODE}: inject_failure stage must be one of {STAGES}, got {stage!r}")
        self.fail_once[stage] = marker

    def _maybe_fail(self, stage: str) -> None:
        marker = self.fail_once.get(stage)
        if marker is None:
            return
        try:
            os.remove(marker)  # only one worker wins the removal
        except FileNotFoundError:
            return
        log.warning("%s: injected failure: worker %d exits inside a %s task", NODE, os.getpid(), stage)
        os._exit(1)

    def describe(self) -> str:
        return f"{os.uname().nodename} pid {os.getpid()} {self.runtime.device} {self.runtime.dtype}"

    def prior_latent(self, frames, masks, settings, size, encoders=()):
        """The prior's latent; its FRAME_CHUNK ranges are VAE-encoded by ``encoders`` (other workers) while the
        prior goes on, or here when there are none."""
        from .prior_propainter import run_propainter_prior

        self._maybe_fail("prior")
        frames, masks = _read_only_tensor(frames), _read_only_tensor(masks)
        num = int(frames.shape[0])
        if encoders:
            sink = _RemoteEncodeSink(num, size, self.codec, self.runtime, list(encoders))
        else:
            sink = _PriorLatentSink(num, size, self.codec, self.runtime)
        run_propainter_prior(frames, masks, self.nets, settings, self.runtime, sink=sink)
        return sink.result()

    def encode_frames(self, frames, size):
        """One prior range of the sink: resized to the working size and encoded, as ``_PriorLatentSink``."""
        from .video import resize_frames

        self._maybe_fail("encode")
        return self.codec.encode(resize_frames(frames, size))

    def prior_frames(self, frames, masks, settings):
        from .prior_propainter import run_propainter_prior

        self._maybe_fail("prior")
        frames, masks = _read_only_tensor(frames), _read_only_tensor(masks)
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


def _read_only_tensor(array) -> torch.Tensor:
    """A tensor over a numpy array from Ray's object store without copying it (on the same machine the array is
    shared memory, read-only; the prior only reads its input)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "The given NumPy array is not writable"
        return torch.from_numpy(array)


class _RemoteEncodeSink(_PriorLatentSink):
    """``_PriorLatentSink`` whose FRAME_CHUNK ranges (the same ranges, so the same VAE batches) are encoded by
    other workers, round robin, with a bounded number in flight; ``result`` collects them in order."""

    def __init__(self, num, size, codec, runtime, encoders):
        super().__init__(num, size, codec, runtime)
        self.encoders = encoders
        self.pending: List[Optional[tuple]] = []
        self.collected = 0

    def _encode(self, start, stop, frames):
        worker = self.encoders[len(self.pending) % len(self.encoders)]
        self.pending.append((start, stop, worker.encode_frames.remote(frames.clone(), self.size)))
        while len(self.pending) - self.collected > ENCODES_IN_FLIGHT_PER_WORKER * len(self.encoders):
            self._collect_one()

    def _collect_one(self):
        import ray

        start, stop, ref = self.pending[self.collected]
        self.latent[start:stop] = ray.get(ref)
        self.pending[self.collected] = None
        self.collected += 1

    def result(self):
        while self.collected < len(self.pending):
            self._collect_one()
        return super().result()
