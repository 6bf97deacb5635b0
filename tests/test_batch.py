"""``python -m diffueraser_core batch SHOTLIST`` without Ray: a bad shot is reported and the others finish; an
interrupted batch keeps its finished shots and a rerun resumes without redoing them."""

import io
import json
import os

import pytest
import torch

from diffueraser_core import batch
from diffueraser_core.random_weights import make_models_folder
from diffueraser_core.media_in import read_video
from diffueraser_core.media_out import write_video
from test_pipeline_cli import FAST, FULL_SIZE_PRIOR, box_masks, make_clip, write_masks

NUM, H, W = 6, 64, 96
OPTS = ["--mask-dilation", "2", "--device", "cpu", *FAST, *FULL_SIZE_PRIOR, "--quiet"]


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    make_models_folder(str(root))
    return str(root)


def make_shots(folder, bad_line=None):
    """Three shots (CSV rows 2, 3, 4); the shot on ``bad_line`` gets a mask with fewer frames than its video."""
    rows = ["video,mask,output"]
    for i, line in enumerate((2, 3, 4)):
        frames = make_clip(NUM, H, W, seed=i)
        masks = box_masks(NUM if line != bad_line else 2, H, W, top=20, left=30 + 5 * i, size=14)
        write_video(str(folder / f"plate{i}"), frames)
        write_masks(folder / f"mask{i}", masks)
        rows.append(f"plate{i},mask{i},out/shot{i}")
    (folder / "out").mkdir()
    (folder / "shots.csv").write_text("\n".join(rows) + "\n")
    return folder / "shots.csv"


def run_batch(shotlist, models_dir, engine=None, extra=()):
    err = io.StringIO()
    code = batch.main([str(shotlist), "--models", models_dir, *OPTS, *extra], stream=err, engine=engine)
    return code, err.getvalue()


def test_a_bad_shot_is_reported_and_the_others_finish(tmp_path, models_dir):
    shotlist = make_shots(tmp_path, bad_line=3)
    code, log = run_batch(shotlist, models_dir)
    assert code == 1, log
    assert "2 done, 0 skipped (done earlier), 1 failed" in log
    # the failure names the row, the files and the cause
    assert "FAILED line 3 (plate1 -> " in log and "mask" in log.split("FAILED line 3", 1)[1]
    assert (tmp_path / "out" / "shot0").is_dir() and (tmp_path / "out" / "shot2").is_dir()
    assert not (tmp_path / "out" / "shot1").exists()
    assert len(read_video(str(tmp_path / "out" / "shot2")).frames) == NUM
    state = json.loads((tmp_path / "shots.csv.state.json").read_text())["shots"]
    assert sorted(r["status"] for r in state.values()) == ["done", "done", "failed"]


def test_an_interrupted_batch_keeps_finished_shots_and_a_rerun_resumes(tmp_path, models_dir):
    from diffueraser_core import cli, jobs
    from diffueraser_core.model_files import find_model_files

    shotlist = make_shots(tmp_path)
    state_path = str(shotlist) + ".state.json"
    args = batch.build_parser().parse_args([str(shotlist), "--models", models_dir, *OPTS])
    engine = jobs.LocalEngine(args, find_model_files(models_dir), models_dir, cli._ProgressPrinter(io.StringIO(), True))
    # the user presses Ctrl-C once the first shot is recorded done (inside the second shot's first loop)
    engine.runtime.interrupt_flag = lambda: os.path.exists(state_path)
    code, log = run_batch(shotlist, models_dir, engine=engine)
    assert code == 130, log
    assert "interrupted during line 3" in log and "run the same command again to resume" in log
    first = read_video(str(tmp_path / "out" / "shot0")).frames
    assert sorted(os.listdir(tmp_path / "out")) == ["shot0"]  # no partial output of the interrupted shot

    code, log = run_batch(shotlist, models_dir)
    assert code == 0, log
    assert "line 2 (plate0 -> " in log and "done in an earlier run, skipped" in log
    assert "2 done, 1 skipped (done earlier), 0 failed" in log
    assert sorted(os.listdir(tmp_path / "out")) == ["shot0", "shot1", "shot2"]
    assert torch.equal(read_video(str(tmp_path / "out" / "shot0")).frames, first)  # not redone

    code, log = run_batch(shotlist, models_dir)
    assert code == 0 and "0 done, 3 skipped (done earlier), 0 failed" in log


@pytest.mark.parametrize(
    "text, message",
    [
        ("video,output\na,b\n", "must name the columns video, mask, output"),
        ("video,mask,output\na,b\n", "line 2 needs 3 non-empty cells"),
        ("video,mask,output\n", "has a header but no shots"),
        ("video,mask,output\na,m,o\nb,m2,o\n", "lines 2 and 3 write the same output"),
        ("video,mask,output\na,m,a\n", "would overwrite the input"),
    ],
)
def test_a_bad_shot_list_is_a_clear_error_before_any_work(tmp_path, text, message):
    (tmp_path / "shots.csv").write_text(text)
    code, log = run_batch(tmp_path / "shots.csv", str(tmp_path / "no-models"))
    assert code == 1 and f"error: {batch.PROG}: shot list" in log and message in log, log


def test_shot_list_comments_blank_rows_and_relative_paths(tmp_path):
    (tmp_path / "shots.csv").write_text("# my shots\nOutput, Video ,mask\n\n/abs/out.mp4,v.mp4,m\n# skipped,x,y\n")
    rows = batch.read_shot_list(str(tmp_path / "shots.csv"))
    assert [(r.line, r.video, r.mask, r.output) for r in rows] == [
        (4, str(tmp_path / "v.mp4"), str(tmp_path / "m"), "/abs/out.mp4")
    ]
