"""One video across many GPUs and machines on Ray, with the single-process result bit for bit.

Ray is optional (``pip install .[distributed]``) and imported only inside the functions here, never by the nodes
nor by the rest of ``diffueraser_core``. Ray does the scheduling, transfers and retries; this module only says what
runs where and merges in the single-process order.

Workers (``ray_worker.PipelineWorker``, one Ray actor per GPU, or per ``cpus_per_worker`` CPUs) load every network once from
the same models folder paths and keep them. The driver (the process that runs the CLI) holds the video and the
latents and hands out work, always by calling the single-process functions on an aligned sub-range, so the
computation of every piece is the single-process computation:

* **prior**: ``prior_distributed.run_prior_on_cluster``: RAFT, flow-completion and propagation chunks and the
  transformer steps are tasks on every worker, on the single-process chunk grids, reading each other's results
  through Ray's object store; the driver merges the transformer steps in order. The finished prior frames are
  composited and VAE-encoded by the workers in the same ``FRAME_CHUNK`` ranges as ``_PriorLatentSink`` while the
  prior goes on; only the latents come back.
* **conditioning**: ``build_conditioning`` on ranges of ``CONDITIONING_CHUNK`` frames (it works chunk by chunk
  on exactly those ranges, so each worker sees the single-process VAE batches).
* **injection**: forward noise on the driver (seeded noise, cheap); DDIM inversion (not the reference default)
  runs ``invert_prior`` on one worker.
* **pre-inference**: ``run_pre_inference`` on one worker (one 22-frame window per step: nothing to split); the
  keyframes' rows come back and are written into the driver's start latents and conditioning.
* **sampling**: every window of a step reads only the previous step's merged latents, so each window is a task
  (``denoise_windows`` of one step on the window's frames: one window, the single-process window computation);
  the driver merges the results with ``WindowAccumulator`` in list order (``windows_for_step``), the same merge
  and order as ``denoise_windows``, then starts the next step (a barrier per step; latents are ~130 KB a frame
  at 960x536).
* **step noise** (the LCM sampler: ``--scheduler lcm``, or auto with the LCM-like PCM LoRA): LCM re-noises every
  window at every step but the last with fresh noise from the run's one generator (``schedule.StepNoise``,
  continued from the window noise), window by window in order. That generator stays on the driver
  (``pipeline.sampler_plan``, as ``sample_video``): it draws the pre-inference window's noise, then each step's
  windows' noise in list order, before the tasks go out, and each task carries its own tensor
  (``SamplerStep.replay``: a step that hands out exactly that noise, ``PresetNoise``). A worker never draws noise;
  one that is sent a drawing step, or uses more or less noise than it was sent, fails. TCD draws nothing.
* **decode + blend**: ``decode_and_blend`` on ranges of ``FRAME_CHUNK`` frames; results are taken in frame order
  as they complete and handed to ``on_frames``.

Faults: workers are actors with ``max_restarts`` / ``max_task_retries``: a worker process that dies mid-task is
restarted (reloading its networks) and its task re-run by Ray; every result is placed by its frame range, so no
frame is lost or doubled. A worker that cannot be restarted fails the run with Ray's error.

Bit-identity holds when every worker computes like the single process: same device type and model, same dtype,
and on CPUs the same number of intra-op threads. ``windows_per_batch`` > 1 is not used here (each window is its
own task): the distributed result equals the single-process result with ``windows_per_batch=1``.
"""

from __future__ import annotations

import logging
import os
import re
import time
from typing import Callable, Optional

import torch

from .progress import JobProgress  # noqa: F401  (the whole-job count; also used by the local engine)
from .errors import InputError, WorkerError
from .ray_worker import PipelineWorker, WorkerSpec  # noqa: F401  (WorkerSpec: part of this module's API)

log = logging.getLogger(__name__)

NODE = "DiffuEraser (Ray)"
INSTALL_HINT = "pip install 'comfyui-diffueraser[distributed]' (or: pip install ray)"
#: how often Ray restarts a lost worker and re-runs its task before the run fails
MAX_RESTARTS = 3


def import_ray():
    try:
        import ray
    except ImportError as exc:
        raise InputError(f"{NODE}: --ray needs the Ray package, which is not installed; {INSTALL_HINT}") from exc
    return ray


def package_root() -> str:
    """The folder holding ``diffueraser_core``, shipped to the workers so they run the driver's exact code."""
    return os.path.dirname(os.path.abspath(__file__))


def init_cluster(address: Optional[str] = None, num_cpus: Optional[int] = None, **kwargs):
    """Connect to the Ray cluster at ``address`` (``None``/"local": start a local one) unless already connected.

    The driver's ``diffueraser_core`` goes to every worker (Ray ``py_modules``), so all run the same code; each
    machine still needs torch/diffusers (``pip install .[distributed]``) and the weights at the same paths.
    """
    ray = import_ray()
    if ray.is_initialized():
        return ray
    runtime_env = {"py_modules": [package_root()]}
    options = dict(runtime_env=runtime_env, log_to_driver=False, logging_level=logging.WARNING)
    if address in (None, "", "local"):
        options.update(include_dashboard=False, num_cpus=num_cpus)
    else:
        options["address"] = address
    options.update(kwargs)
    try:
        ray.init(**options)
    except ConnectionError as exc:
        raise InputError(f"{NODE}: cannot connect to the Ray cluster at {address!r}: {exc}") from exc
    return ray


def _task_failure(exc) -> str:
    """One line for a task that raised on a worker: the task, the worker's own error, and what to change when it
    ran out of device memory (a chunk on a worker is not halved and retried as on one machine)."""
    cause = getattr(exc, "cause", None)
    text = f"{type(cause).__name__}: {cause}" if cause is not None else str(exc)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    # Ray names the task in its own first line, "ray::Class.method() (pid=..., ...)"
    named = re.search(r"ray::([\w.]+)\(", str(exc))
    task = named.group(1) if named else "a task"
    hint = ""
    if "out of memory" in text.lower():
        hint = ("; lower --max-side (or --resize-ratio / --subvideo-length for the prior, --window-length for "
                "sampling), or use GPUs with more memory")
    return f"{NODE}: a worker failed in {task}: {text}{hint}"


class RayRemover:
    """Runs ``remove_objects`` across the workers of a Ray cluster (see the module docstring)."""

    def __init__(self, spec: WorkerSpec, num_workers: Optional[int] = None, cpus_per_worker: int = 1,
                 gpus_per_worker: Optional[float] = None):
        ray = import_ray()
        if not ray.is_initialized():
            init_cluster()
        resources = ray.cluster_resources()
        cluster_gpus, cluster_cpus = float(resources.get("GPU", 0)), float(resources.get("CPU", 0))
        if gpus_per_worker is None:
            gpus_per_worker = 1.0 if cluster_gpus >= 1 else 0.0
        if num_workers is None:
            if gpus_per_worker:
                num_workers = int(cluster_gpus // gpus_per_worker)
            else:
                num_workers = max(1, int(cluster_cpus) // max(1, cpus_per_worker))
        if int(num_workers) != num_workers or num_workers < 1:
            raise InputError(f"{NODE}: the number of workers must be an integer >= 1, got {num_workers!r}")
        # workers that cannot all be placed would wait forever: say so before any work
        if num_workers * cpus_per_worker > cluster_cpus or num_workers * gpus_per_worker > cluster_gpus:
            raise InputError(
                f"{NODE}: {num_workers} workers x ({cpus_per_worker} CPU, {gpus_per_worker:g} GPU) do not fit the "
                f"cluster's {cluster_cpus:g} CPUs and {cluster_gpus:g} GPUs; lower --ray-workers or "
                "--ray-cpus-per-worker, or add machines"
            )
        if spec.threads is None and not gpus_per_worker:
            spec.threads = max(1, int(cpus_per_worker))
        actor = ray.remote(
            num_cpus=cpus_per_worker, num_gpus=gpus_per_worker, max_restarts=MAX_RESTARTS,
            max_task_retries=MAX_RESTARTS,
        )(PipelineWorker)
        self.ray = ray
        self.spec = spec
        self.workers = [actor.remote(spec) for _ in range(int(num_workers))]
        started = time.monotonic()
        try:
            self.descriptions = ray.get([w.describe.remote() for w in self.workers])
        except Exception as exc:  # a worker's constructor failed (model files, device): Ray wraps the cause
            self.shutdown()
            raise InputError(
                f"{NODE}: a worker could not start; every machine needs this pack's requirements and the model "
                f"files at the same paths as here ({sorted(set(map(os.path.dirname, spec.model_paths.values())))})"
                f": {exc}"
            ) from exc
        log.info("%s: %d workers ready in %.1f s: %s", NODE, len(self.workers), time.monotonic() - started,
                 "; ".join(self.descriptions))

    def shutdown(self) -> None:
        for worker in self.workers:
            self.ray.kill(worker)
        self.workers = []

    def _pool(self, workers=None):
        from ray.util import ActorPool

        return ActorPool(list(workers or self.workers))

    # -- the stages ---------------------------------------------------------------------------------------------

    def _conditioning(self, frames, masks, latent_hw, mask_dilation, workers, progress):
        from .temporal_sampling import CONDITIONING_CHUNK, Conditioning

        num = int(frames.shape[0])
        ranges = [(a, min(a + CONDITIONING_CHUNK, num)) for a in range(0, num, CONDITIONING_CHUNK)]
        pool = self._pool(workers)
        masked = torch.empty((num, 4, *latent_hw), dtype=torch.float32)
        known = torch.empty((num, *latent_hw), dtype=torch.bool)
        results = pool.map(
            lambda w, r: w.conditioning.remote(frames[r[0]:r[1]].clone(), masks[r[0]:r[1]].clone(), latent_hw,
                                               mask_dilation),
            ranges,
        )
        for (a, b), (part_masked, part_known) in zip(ranges, results):
            masked[a:b] = part_masked
            known[a:b] = part_known
            progress("conditioning", b, num)
        return Conditioning(masked, known)

    def denoise(self, latents, timestep_pairs, conditioning, window, progress, stage="sampling", step=None):
        """``denoise_windows`` (default step numbers, no negative embedding) with each window a task.

        ``step``: the update (default TCD). An LCM step holds the run's noise generator here: each window's noise
        is drawn here, window after window in list order as ``denoise_windows`` draws it, and goes with the
        window's task (``SamplerStep.replay``)."""
        from .schedule import LATENT_CHANNELS, SamplerStep
        from .windows import WindowAccumulator, windows_for_step

        step = step or SamplerStep()
        num, latent_hw = int(latents.shape[0]), tuple(latents.shape[2:])
        latents = latents.to(torch.float32)
        schedule = [windows_for_step(n, num, window.window_length, window.window_overlap)
                    for n in range(len(timestep_pairs))]
        total = sum(len(w) for w in schedule)
        done = 0
        cond_refs = {}  # the conditioning of each window goes to the object store once, read by every step

        def cond_of(a, b):
            if (a, b) not in cond_refs:
                cond_refs[(a, b)] = (self.ray.put(conditioning.masked_latents[a:b].clone()),
                                     self.ray.put(conditioning.known[a:b].clone()))
            return cond_refs[(a, b)]

        for number, ((t, s), windows) in enumerate(zip(timestep_pairs, schedule)):
            pool = self._pool()
            step_latents = latents
            # drawn before any task goes out, in list order: the single-process order whatever the pool does
            window_steps = [step.replay([((b - a, LATENT_CHANNELS, *latent_hw), s)]) for a, b in windows]
            results = pool.map(
                lambda w, k: w.window_step.remote(step_latents[windows[k][0]:windows[k][1]].clone(),
                                                  *cond_of(*windows[k]), t, s, number, window, stage,
                                                  window_steps[k]),
                range(len(windows)),
            )
            acc = WindowAccumulator(num, overwrite_last_overlap=window.overwrite_last_overlap, dtype=torch.float32)
            for (a, b), moved in zip(windows, results):  # list order: the single-process merge
                acc.add(a, b, moved)
                done += 1
                progress(stage, done, total)
            latents = acc.result()
        return latents

    def remove(self, *args, **kwargs) -> torch.Tensor:
        """``pipeline.remove_objects`` on the cluster (see ``_remove``); a worker's failure becomes one clear line
        (``WorkerError``) instead of Ray's remote traceback."""
        ray = self.ray
        try:
            return self._remove(*args, **kwargs)
        except ray.exceptions.RayTaskError as exc:
            raise WorkerError(_task_failure(exc)) from exc
        except ray.exceptions.RayActorError as exc:
            raise WorkerError(
                f"{NODE}: a worker was lost and could not be restarted ({MAX_RESTARTS} restarts): "
                f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
            ) from exc

    def _remove(
        self,
        frames: torch.Tensor,
        masks: torch.Tensor,
        *,
        sampler_settings=None,
        injection_settings=None,
        propainter_settings=None,
        max_side: Optional[int] = None,
        feather: Optional[int] = None,
        prior_only: bool = False,
        output: Optional[torch.Tensor] = None,
        original: Optional[torch.Tensor] = None,
        progress: Optional[Callable] = None,
        on_frames: Optional[Callable[[int, int, torch.Tensor], None]] = None,
    ) -> torch.Tensor:
        """``pipeline.remove_objects`` on the cluster: same arguments, same result.

        ``original`` (the source at full depth / with alpha, ``frames`` being its 8-bit RGB): as in
        ``remove_objects``, the result is composited into it in place and returned.

        ``progress(stage, done, total)`` gets each stage's count and a ``job`` count over the whole run;
        ``on_frames(start, stop, frames)`` gets the finished output frames in order as they complete.
        """
        from .blend import DEFAULT_FEATHER
        from .pipeline import (
            NODE as PIPELINE,
            _into_original,
            _propainter_settings,
            default_settings,
            prepare_sampling_inputs,
            unchanged_result,
        )
        from .pipeline import sampler_plan
        from .pre_inference import should_pre_infer
        from .prior_distributed import run_prior_on_cluster
        from .prior_injection import VAE_SCALING, inject_forward_noise
        from .schedule import LATENT_CHANNELS, scheduler_for_lora
        from .video import DEFAULT_MAX_SIDE, FRAME_CHUNK, working_size
        from .windows import window_lists, windows_for_step

        ray = self.ray
        max_side = DEFAULT_MAX_SIDE if max_side is None else max_side
        feather = DEFAULT_FEATHER if feather is None else feather
        sampler_settings, injection_settings = default_settings(sampler_settings, injection_settings)
        masks = prepare_sampling_inputs(frames, masks, PIPELINE)
        num, height, width = int(frames.shape[0]), int(frames.shape[1]), int(frames.shape[2])
        if not bool(masks.any()):
            return unchanged_result(frames, output, original)
        work_h, work_w = working_size(height, width, max_side)
        prior_settings = _propainter_settings(propainter_settings, sampler_settings.mask_dilation)
        window = sampler_settings.window_settings()
        list_a, list_b = window_lists(num, window.window_length, window.window_overlap)
        steps = sampler_settings.steps
        windows = sum(len(list_a if n % 2 == 0 else list_b) for n in range(steps))
        job = JobProgress(progress, {"prior": num, "conditioning": num, "pre-inference": window.window_length,
                                     "sampling": windows * window.window_length, "decode": num})
        first = self.workers[0]

        if prior_only:
            out = run_prior_on_cluster(ray, self.workers, frames, masks, prior_settings, progress=job)
            job("prior", num, num)
            if original is not None:
                out = _into_original(out, frames, original)
            if on_frames is not None:
                for a in range(0, num, FRAME_CHUNK):
                    on_frames(a, min(a + FRAME_CHUNK, num), out[a:a + FRAME_CHUNK])
            return out if output is None or original is not None else output.copy_(out)

        # the prior's chunks on every worker; its finished frames are VAE-encoded where they are composited, in the
        # single-process FRAME_CHUNK ranges, while the prior goes on: only latents come back
        prior_latent = run_prior_on_cluster(ray, self.workers, frames, masks, prior_settings, progress=job,
                                            encode_size=(work_h, work_w))
        job("prior", num, num)
        latent_hw = (work_h // 8, work_w // 8)
        conditioning = self._conditioning(frames, masks, latent_hw, sampler_settings.mask_dilation, self.workers, job)
        if injection_settings.mode == "ddim_inversion":
            start = ray.get(first.invert.remote(prior_latent, conditioning, injection_settings,
                                                sampler_settings.window_overlap, sampler_settings.brushnet_scale))
        else:
            start = inject_forward_noise(prior_latent, injection_settings)
        del prior_latent
        # sample_video, with the pre-inference on one worker and each window a task; the scheduler as there ("auto":
        # the one the workers' LoRA needs), its step (an LCM step holds the run's one noise generator) stays here
        scheduler = sampler_settings.scheduler
        if scheduler == "auto":
            scheduler = scheduler_for_lora(self.spec.lora_path)
        timesteps, pairs, step = sampler_plan(scheduler, steps, start, NODE)
        start_latent = start.latent
        if should_pre_infer(start.num_frames, window.window_length, start, sampler_settings.pre_inference):
            # the keyframe window's noise comes first from the generator, as in sample_video
            length = window.window_length
            key_step = step.replay([((b - a, LATENT_CHANNELS, *start.latent_hw), s)
                                    for n, (_, s) in enumerate(pairs)
                                    for a, b in windows_for_step(n, length, length, window.window_overlap)])
            idx, key_start, key_masked, key_known = ray.get(
                first.pre_infer.remote(start, conditioning, timesteps, window, key_step, pairs)
            )
            start_latent = start.latent.clone()
            start_latent[idx] = key_start
            conditioning.masked_latents[idx] = key_masked  # the driver's own copy: written in place
            conditioning.known[idx] = key_known
            job("pre-inference", window.window_length, window.window_length)
        latents = self.denoise(start_latent.to(torch.float32) * VAE_SCALING, pairs, conditioning, window, job,
                               step=step)
        latents /= VAE_SCALING
        del start, start_latent, conditioning
        # decode + blend in FRAME_CHUNK ranges, taken in frame order as they complete
        # a full-depth / alpha source is the base each chunk is composited into (blend is dtype-generic)
        base = frames if original is None else original
        out = original if original is not None else (torch.empty_like(frames) if output is None else output)
        ranges = [(a, min(a + FRAME_CHUNK, num)) for a in range(0, num, FRAME_CHUNK)]
        results = self._pool().map(
            lambda w, r: w.decode_blend.remote(latents[r[0]:r[1]].clone(), base[r[0]:r[1]].clone(),
                                               masks[r[0]:r[1]].clone(), sampler_settings.mask_dilation, feather),
            ranges,
        )
        for (a, b), part in zip(ranges, results):
            out[a:b] = part
            job("decode", b, num)
            if on_frames is not None:
                on_frames(a, b, out[a:b])
        return out
