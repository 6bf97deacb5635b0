"""The Ray executor on a local 2-CPU cluster with 2 CPU workers and tiny random weights.

One cluster and one set of workers for the whole module (Ray's start-up and the workers' network loading are the
slow part on 2 cores). The clip is long enough for pre-inference (46 > 2 x 22 frames) and has 3 windows per step.
Outputs are PNG folders (lossless), compared bit for bit with the single-process CLI run in this process (one torch
thread, as the workers).
"""

import functools
import io
import re
import os

import pytest
import torch

import ray  # noqa: F401  (requirements-dev.txt: these tests run in CI)

from diffueraser_core import cli, distributed, jobs, schedule
from diffueraser_core.model_files import find_model_files
from diffueraser_core.random_weights import make_models_folder
from diffueraser_core.media_in import read_video
from diffueraser_core.media_out import write_video
from diffueraser_core.windows import window_lists
from test_batch import make_shots
from test_pipeline_cli import FAST, FULL_SIZE_PRIOR, box_masks, make_clip, write_masks

NUM, H, W = 46, 64, 96
# ProPainter chunks short enough that the prior splits on the cluster: 5 RAFT chunks (11 pairs each at this size),
# 3 flow-completion and 3 propagation chunks of 16, pre-propagation of every 5th frame, 16 transformer steps
# with reference frames
PRIOR_CHUNKS = ["--subvideo-length", "16", "--neighbor-length", "6", "--ref-stride", "4"]
OPTS = ["--mask-dilation", "2", "--device", "cpu", "--seed", "3", *FAST, *FULL_SIZE_PRIOR, *PRIOR_CHUNKS]


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    make_models_folder(str(root))
    return str(root)


@pytest.fixture(scope="module")
def fault_markers(tmp_path_factory):
    """The workers' fault drills: a worker dies in the first task of a stage while that stage's file exists."""
    folder = tmp_path_factory.mktemp("faults")
    return {stage: folder / f"fail-{stage}" for stage in ("prior", "encode", "sampling")}


@pytest.fixture(scope="module")
def engine(models_dir, fault_markers):
    distributed.init_cluster(num_cpus=2)
    import ray as ray_module

    args = cli.build_parser().parse_args(["v", "m", "o", "--models", models_dir, *OPTS, "--ray"])
    printer = cli._ProgressPrinter(io.StringIO(), True)
    armed = functools.partial(distributed.WorkerSpec, fault_markers={k: str(v) for k, v in fault_markers.items()})
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(distributed, "WorkerSpec", armed)  # RayEngine.start builds the spec from the CLI options
        engine = jobs.RayEngine.start(args, find_model_files(models_dir), models_dir, printer)
    assert len(engine.remover.workers) == 2
    yield engine
    engine.close()
    ray_module.shutdown()


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    write_video(str(folder / "video"), make_clip(NUM, H, W, seed=7))
    write_masks(folder / "mask", box_masks(NUM, H, W, top=20, left=30, size=14))
    return folder


@pytest.fixture(scope="module")
def single_process(clip, models_dir):
    code, log = run_cli([clip / "video", clip / "mask", clip / "single", "--models", models_dir, *OPTS])
    assert code == 0, log
    assert "pre-inference" in log
    return read_video(str(clip / "single")).frames


def run_cli(argv, engine=None):
    err = io.StringIO()
    from contextlib import redirect_stderr

    with redirect_stderr(err):
        code = cli.main([str(a) for a in argv], engine=engine)
    return code, err.getvalue()


def test_two_workers_give_the_single_process_result_bit_for_bit(clip, models_dir, engine, single_process):
    list_a, list_b = window_lists(NUM)
    assert len(list_a) == 3 and len(list_b) == 3  # several windows per step
    remover = engine.remover
    before = remover.ray.get([w.tasks_run.remote() for w in remover.workers])
    code, log = run_cli([clip / "video", clip / "mask", clip / "ray", "--models", models_dir, *OPTS, "--ray"],
                        engine=engine)
    assert code == 0, log
    assert "pre-inference: 22/22" in log and "sampling: 6/6" in log and "decode: 46/46" in log
    # the prior's units (RAFT pairs, completed flows, propagated frames, the sample's, transformer steps) all
    # counted, and its chunks ran on both workers
    units = 3 * NUM - 2 + 3 * len(range(0, NUM, NUM // 8)) - 2 + len(range(0, NUM, 3))
    assert log.count(f"prior: {units}/{units}") == 1  # complete once, at the end (no unit counted twice)
    after = remover.ray.get([w.tasks_run.remote() for w in remover.workers])
    prior_tasks = [a.get("prior", 0) - b.get("prior", 0) for a, b in zip(after, before)]
    assert all(n >= 5 for n in prior_tasks), prior_tasks
    assert sum(prior_tasks) == 5 + 1 + 3 + 3 + 16, prior_tasks  # RAFT, sample, completion, propagation, steps
    # the composites, encoded where they are made, on the VAE's 16-frame ranges: 0-16, 16-32, 32-46
    assert sum(a.get("encode", 0) - b.get("encode", 0) for a, b in zip(after, before)) == 3
    # the whole job's progress: whole percents that only rise, ending complete
    job = [int(m) for m in re.findall(r"\] job (\d+)% \d+s, ETA \d+s", log)]
    assert len(job) > 10 and job == sorted(job) and job[-1] == 100, job
    out = read_video(str(clip / "ray")).frames
    assert out.shape == single_process.shape
    assert torch.equal(out, single_process)


# the LCM sampler over 3 steps: step noise in list A and list B windows and in 2 pre-inference steps
LCM = ["--scheduler", "lcm", "--steps", "3"]


def test_the_lcm_sampler_gives_the_single_process_result_bit_for_bit(
    clip, models_dir, engine, single_process, monkeypatch
):
    code, log = run_cli([clip / "video", clip / "mask", clip / "lcm-single", "--models", models_dir, *OPTS, *LCM])
    assert code == 0, log
    assert "pre-inference" in log
    expected = read_video(str(clip / "lcm-single")).frames
    assert not torch.equal(expected, single_process)  # LCM is another sampler than the default TCD
    code, log = run_cli([clip / "video", clip / "mask", clip / "lcm-ray", "--models", models_dir, *OPTS, *LCM,
                         "--ray"], engine=engine)
    assert code == 0, log
    assert "pre-inference: 22/22" in log and "sampling: 9/9" in log
    assert torch.equal(read_video(str(clip / "lcm-ray")).frames, expected)

    # the test sees the noise order: a driver whose pre-inference noise does not come from the run's generator
    # (so the main pass draws what pre-inference should have) gives another result
    replay = schedule.SamplerStep.replay

    def pre_inference_off_the_stream(self, moves):
        if len(moves) > 1:  # the keyframe window's steps (a main-pass task carries one window of one step)
            return replay(schedule.SamplerStep("lcm", schedule.StepNoise(12345)), moves)
        return replay(self, moves)

    monkeypatch.setattr(schedule.SamplerStep, "replay", pre_inference_off_the_stream)
    code, log = run_cli([clip / "video", clip / "mask", clip / "lcm-wrong", "--models", models_dir, *OPTS, *LCM,
                         "--ray"], engine=engine)
    assert code == 0, log
    assert not torch.equal(read_video(str(clip / "lcm-wrong")).frames, expected)


def test_workers_never_draw_step_noise_of_their_own(engine):
    worker = engine.remover.workers[0]
    drawing = schedule.SamplerStep("lcm", schedule.StepNoise(0))
    with pytest.raises(Exception, match="a sampler step that draws its own noise"):
        engine.remover.ray.get(worker.pre_infer.remote(None, None, [999], None, drawing))


def test_workers_lost_inside_a_window_and_a_prior_chunk_do_not_change_the_result(
    clip, models_dir, engine, single_process, fault_markers
):
    remover = engine.remover
    before = remover.ray.get([w.describe.remote() for w in remover.workers])
    # a worker dies inside a chunk of the prior, one inside the VAE encode of finished prior frames, and one
    # inside a sampling window
    markers = fault_markers
    for marker in markers.values():
        marker.write_text("armed")
    code, log = run_cli([clip / "video", clip / "mask", clip / "fault", "--models", models_dir, *OPTS, "--ray"],
                        engine=engine)
    assert code == 0, log
    assert not any(marker.exists() for marker in markers.values())  # every failure did happen
    after = remover.ray.get([w.describe.remote() for w in remover.workers])
    assert any(a != b for a, b in zip(before, after))  # worker processes were replaced by Ray
    assert torch.equal(read_video(str(clip / "fault")).frames, single_process)


def test_an_error_inside_a_worker_task_is_one_clear_line(clip, models_dir, engine, fault_markers, tmp_path):
    """A prior chunk that runs out of device memory on a worker (not halved and retried there, as on one machine)
    stops the run with the worker's own error and what to change, not Ray's remote traceback; the workers live on
    and nothing is written."""
    fault_markers["prior"].write_text("raise CUDA out of memory. Tried to allocate 2.00 GiB")
    out = tmp_path / "oom"
    code, log = run_cli([clip / "video", clip / "mask", out, "--models", models_dir, *OPTS, "--ray"], engine=engine)
    assert code == 1, log
    assert not fault_markers["prior"].exists()
    assert "error: DiffuEraser (Ray): a worker failed in PipelineWorker.prior_" in log, log
    assert "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB; lower --max-side" in log
    assert "Traceback" not in log
    assert not out.exists() and not any(p.name.startswith(".oom") for p in tmp_path.iterdir())
    remover = engine.remover
    assert len(remover.ray.get([w.describe.remote() for w in remover.workers])) == 2


def test_a_ray_batch_with_a_bad_shot_finishes_the_others(tmp_path, models_dir, engine):
    from diffueraser_core import batch

    shotlist = make_shots(tmp_path, bad_line=2)
    err = io.StringIO()
    shared = jobs.RayEngine(engine.remover, None, owns_workers=False)
    code = batch.main([str(shotlist), "--models", models_dir, *OPTS, "--quiet", "--ray"], stream=err, engine=shared)
    log = err.getvalue()
    assert code == 1, log
    assert "2 done, 0 skipped (done earlier), 1 failed" in log
    assert "FAILED line 2 (plate0 -> " in log and "has 2 frames but the video has 6" in log
    assert sorted(os.listdir(tmp_path / "out")) == ["shot1", "shot2"]


def test_more_workers_than_the_cluster_holds_is_a_clear_error(engine):
    spec = distributed.WorkerSpec(dict(engine.remover.spec.model_paths), device="cpu")
    with pytest.raises(ValueError, match=r"5 workers x \(1 CPU, 0 GPU\) do not fit the cluster's 2 CPUs"):
        distributed.RayRemover(spec, num_workers=5, gpus_per_worker=0.0)


@pytest.mark.parametrize("count, subvideo_length", [(1, 16), (2, 16), (13, 4)])
def test_the_prior_on_the_cluster_hands_the_sink_the_single_process_ranges(engine, models_dir, count,
                                                                           subvideo_length):
    """``run_prior_on_cluster`` against ``run_propainter_prior`` directly: a single frame and a single pair (one
    worker's whole run), and 13 frames in chunks of 4 (pre-propagation, several chunks of every stage): the same
    frames, handed to the sink in the same ranges."""
    from diffueraser_core.model_loading import load_propainter
    from diffueraser_core.prior_distributed import run_prior_on_cluster
    from diffueraser_core.prior_propainter import ProPainterSettings, run_propainter_prior
    from diffueraser_core.runtime import StandaloneRuntime

    runtime = StandaloneRuntime(device=torch.device("cpu"))
    nets = load_propainter(find_model_files(models_dir), runtime)
    frames = make_clip(count, 64, 80, seed=count)
    masks = box_masks(count, 64, 80, top=20, left=30, size=14)
    settings = ProPainterSettings(resize_ratio=1.0, raft_iter=1, subvideo_length=subvideo_length, neighbor_length=2,
                                  ref_stride=2, mask_dilation=2)
    single, cluster = [], []
    run_propainter_prior(frames, masks, nets, settings, runtime, sink=lambda a, b, f: single.append((a, b, f.clone())))
    remover = engine.remover
    run_prior_on_cluster(remover.ray, remover.workers, frames, masks, settings,
                         sink=lambda a, b, f: cluster.append((a, b, f.clone())))
    assert [(a, b) for a, b, _ in cluster] == [(a, b) for a, b, _ in single]
    assert torch.equal(torch.cat([f for *_, f in cluster]), torch.cat([f for *_, f in single]))
    # the diffusion run's way: the workers encode where they composite; the latents equal the single-process
    # sink's (the same VAE batches)
    from diffueraser_core.model_loading import load_diffusion_models
    from diffueraser_core.pipeline import _PriorLatentSink

    _, codec, _ = load_diffusion_models(find_model_files(models_dir), None, 1.0, runtime)
    encoder = _PriorLatentSink(count, (64, 80), codec, runtime)
    run_propainter_prior(frames, masks, nets, settings, runtime, sink=encoder)
    latent = run_prior_on_cluster(remover.ray, remover.workers, frames, masks, settings, encode_size=(64, 80))
    assert latent.shape == (count, 4, 8, 10) and torch.equal(latent, encoder.result())


def test_a_fault_drill_for_an_unknown_stage_is_a_clear_error():
    with pytest.raises(ValueError, match=r"fault_markers stages must be among .*got \['priors'\]"):
        distributed.WorkerSpec({}, fault_markers={"priors": "/tmp/x"})
