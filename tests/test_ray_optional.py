"""Ray is optional: nothing the nodes or the single-process CLI import pulls it in, and --ray without it is a clear
error."""

import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def run_python(code):
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_the_nodes_and_the_core_never_import_ray():
    done = run_python(
        "import sys\n"
        "import nodes, diffueraser_core\n"
        "from diffueraser_core import pipeline, cli, batch, jobs, distributed, temporal_sampling, prior_propainter\n"
        "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))\n"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_ray_option_without_ray_installed_is_a_clear_error(tmp_path):
    done = run_python(
        "import sys\n"
        "sys.modules['ray'] = None  # as if not installed\n"
        "from diffueraser_core import distributed\n"
        "try:\n"
        "    distributed.import_ray()\n"
        "except ValueError as exc:\n"
        "    print(exc)\n"
    )
    assert done.returncode == 0, done.stderr
    assert "--ray needs the Ray package, which is not installed" in done.stdout
    assert "pip install" in done.stdout and "[distributed]" in done.stdout


def test_ray_with_the_lcm_sampler_is_not_refused(tmp_path):
    # the driver draws LCM's step noise and sends it with each window task: an LCM run under --ray goes on to
    # start the cluster (which fails here, Ray being absent), where it was once refused
    done = run_python(
        "import sys, argparse\n"
        "sys.modules['ray'] = None  # the cluster start fails with the missing-Ray error\n"
        "from diffueraser_core import jobs\n"
        "args = argparse.Namespace(ray='local', prior_only=False, lora='pcm_sd15_lcmlike_lora_converted.safetensors',\n"
        "                          scheduler='auto', lora_strength=1.0, device='cpu', ray_workers=1,\n"
        "                          ray_cpus_per_worker=1)\n"
        "from diffueraser_core import model_loading\n"
        "model_loading.resolve_lora = lambda found, models_dir, lora: lora\n"
        "try:\n"
        "    jobs.RayEngine.start(args, {}, '.', print)\n"
        "except ValueError as exc:\n"
        "    print('ERROR', exc)\n"
    )
    assert done.returncode == 0, done.stderr
    assert "ERROR" in done.stdout and "--ray needs the Ray package" in done.stdout
    assert "LCM" not in done.stdout
