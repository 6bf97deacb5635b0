"""The benchmark runner's own logic (stage timing, regression check, table); the benchmarks themselves run in bench/."""

import importlib.util
import json
import pathlib

import pytest

RUNNER = pathlib.Path(__file__).resolve().parents[1] / "bench" / "run.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_run", RUNNER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _result(**overrides):
    result = {"resolution": "64x64", "frames": 50, "size": "tiny", "device": "cpu", "total_seconds": 10.0,
              "seconds_per_frame": 0.2, "stage_seconds": {"prior": 8.0, "sampling": 2.0}, "peak_rss_gib": 1.0}
    result.update(overrides)
    return result


def test_stage_seconds_attribute_each_interval_to_the_stage_that_reports_it(bench):
    runtime = bench.TimingRuntime(device="cpu")
    runtime.t0 = 0.0
    runtime.events = [("prior", 1, 2, 1.0), ("prior", 2, 2, 3.0), ("decode", 1, 1, 3.5), ("blend", 1, 1, 3.75),
                      ("decode", 2, 2, 4.25), ("blend", 2, 2, 4.5)]
    assert runtime.stage_seconds() == {"prior": 3.0, "decode": 1.0, "blend": 0.5}


def test_check_flags_only_regressions_beyond_the_tolerance(bench, tmp_path):
    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps([_result(), _result(frames=500, seconds_per_frame=0.3)]))
    assert bench.check_against(_result(seconds_per_frame=0.24), str(baseline), 0.25) == []
    problems = bench.check_against(_result(seconds_per_frame=0.26, peak_rss_gib=1.3), str(baseline), 0.25)
    assert len(problems) == 2 and problems[0].startswith("seconds_per_frame: 0.26 > baseline 0.2")
    assert bench.check_against(_result(frames=77), str(baseline), 0.25) == [
        "no baseline entry for 64x64 x 77 (tiny)"]


def test_table_lists_every_stage_and_the_resolution(bench):
    table = bench.format_table([_result()])
    header, rule, row = table.splitlines()
    for name in ("prior s", "encode s", "pre-inference s", "sampling s", "decode s", "blend s", "RSS GiB"):
        assert name in header
    assert row.startswith("| 64x64") and set(rule) <= {"|", "-"}


def test_resolution_parsing(bench):
    assert bench.parse_resolution("1280x720") == (1280, 720)
    with pytest.raises(SystemExit, match="1280x720"):
        bench.parse_resolution("720p")


def test_vae_encodes_inside_other_stages_are_booked_to_encode(bench, monkeypatch):
    runtime = bench.TimingRuntime(device="cpu")
    runtime.t0 = 0.0
    clock = iter([1.0, 2.0, 2.5, 2.5, 4.0, 5.0, 5.25, 6.0])
    monkeypatch.setattr(bench.time, "perf_counter", lambda: next(clock))

    class Codec:
        def encode(self, frames):
            return frames

    codec = Codec()
    bench.time_vae_encodes(codec, runtime)
    runtime.progress("prior", 1, 2)          # 1.0: prior work 0 -> 1
    codec.encode(None)                       # 2.0 booked to prior, 2.5 to encode
    runtime.progress("encode", 16, 20)       # 2.5: the pipeline reports right after encoding
    runtime.progress("prior", 2, 2)          # 4.0: the prior goes on
    codec.encode(None)                       # 5.0 prior, 5.25 encode
    runtime.progress("sampling", 1, 1)       # 6.0
    seconds = runtime.stage_seconds()
    assert seconds["encode"] == pytest.approx(0.5 + 0.25)
    assert seconds["prior"] == pytest.approx(1.0 + 1.0 + 1.5 + 1.0)
    assert seconds["sampling"] == pytest.approx(0.75)


def test_run_reports_host_ram_against_the_target_and_the_techniques(bench, tmp_path, monkeypatch):
    out = tmp_path / "r.json"
    assert bench.main(["--size", "tiny", "--resolution", "64x64", "--frames", "3", "--device", "cpu",
                       "--cache", str(tmp_path / "cache"), "--windows-per-batch", "2", "--channels-last",
                       "--json", str(out)]) == 0
    result = json.loads(out.read_text())[0]
    assert result["techniques"]["windows_per_batch"] == 2 and result["techniques"]["channels_last"] is True
    assert 0 < result["peak_anon_rss_gib"] <= result["peak_rss_gib"]
    assert result["host_ram_target_gib"] == pytest.approx(result["input_video_gib"] + 3e9 / 2 ** 30, abs=1e-3)
    assert result["stage_seconds"]["encode"] > 0 and result["stage_seconds"]["prior"] > 0


def test_host_memory_bench_runs_the_production_data_path(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_host_memory", RUNNER.parent / "host_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.measure(96, 64, 5, 2)
    assert result["frames"] == 5 and result["resolution"] == "96x64"
    assert result["anon_peak_gb"] >= result["anon_before_run_gb"] > 0
    assert result["host_ram_target_gb"] == pytest.approx(result["input_video_gb"] + 3, abs=1e-3)
