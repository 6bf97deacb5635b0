"""Media matrix, output target: checked before any input is read; inputs are never overwritten; --help lists the
output options with their defaults."""

import io
import os
from contextlib import redirect_stderr, redirect_stdout

import numpy as np
import pytest

from diffueraser_core.cli import main
from diffueraser_core.errors import InputError
from diffueraser_core.media_out import OutputOptions, check_output_target

from media_factory import pattern, write_media


def run_cli(args):
    err = io.StringIO()
    with redirect_stderr(err), redirect_stdout(io.StringIO()):
        code = main([str(a) for a in args])
    return code, err.getvalue()


@pytest.fixture()
def clip(tmp_path):
    return write_media(tmp_path / "in.mp4", pattern(6))


def test_output_equal_to_an_input_is_refused_and_the_input_kept(tmp_path, clip):
    before = clip.read_bytes()
    with pytest.raises(InputError, match="is \\(or holds\\) the input"):
        check_output_target(clip, inputs=[clip])
    # the same file under another spelling
    with pytest.raises(InputError, match="the input"):
        check_output_target(tmp_path / "." / "in.mp4", inputs=[clip])
    # a frame folder given as input cannot be the output folder, nor hold it
    folder = tmp_path / "frames"
    folder.mkdir()
    (folder / "0001.png").write_bytes(b"x")
    for target in (folder, folder / "sub"):
        with pytest.raises(InputError, match="the input"):
            check_output_target(target, inputs=[folder])
    code, log = run_cli([clip, clip, clip])
    assert code == 1 and "input" in log and "Traceback" not in log
    assert clip.read_bytes() == before


@pytest.mark.parametrize("name,pattern_", [("x.webm", "cannot write 'x.webm'"), ("x.avi", "cannot write"),
                                           ("x.gif", "cannot write")])
def test_unsupported_extensions_are_refused(tmp_path, name, pattern_):
    with pytest.raises(InputError, match=pattern_):
        check_output_target(tmp_path / name)


def test_existing_folder_with_other_files_is_refused_but_an_earlier_png_output_is_replaceable(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "shot.1001.png").write_bytes(b"x")
    assert check_output_target(folder).kind == "folder"
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="holds other files \\(notes.txt\\)"):
        check_output_target(folder)
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="not a folder"):
        check_output_target(tmp_path / "file")
    with pytest.raises(InputError, match="existing folder, not a file"):
        (tmp_path / "d.mp4").mkdir()
        check_output_target(tmp_path / "d.mp4")


def test_unwritable_or_missing_parent_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        check_output_target(tmp_path / "nope" / "x.mp4")
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        try:
            with pytest.raises(InputError, match="cannot write in"):
                check_output_target(locked / "x.mp4")
        finally:
            locked.chmod(0o700)
    # a file system nobody may write (also as root)
    with pytest.raises(InputError, match="cannot write in '/proc'"):
        check_output_target("/proc/x.mp4")


def test_codec_options_are_checked_against_the_container(tmp_path):
    with pytest.raises(InputError, match="--codec 'prores_ks' cannot be written to .mp4"):
        check_output_target(tmp_path / "x.mp4", options=OutputOptions(codec="prores_ks"))
    with pytest.raises(InputError, match="not available"):
        check_output_target(tmp_path / "x.mkv", options=OutputOptions(codec="no-such-codec"))
    with pytest.raises(InputError, match="--crf must be in 0..51"):
        check_output_target(tmp_path / "x.mp4", options=OutputOptions(crf=60))
    with pytest.raises(InputError, match="--crf applies to"):
        check_output_target(tmp_path / "x.mkv", options=OutputOptions(codec="ffv1", crf=10))
    with pytest.raises(InputError, match="--pix-fmt 'rgb24' is not one libx264 writes"):
        check_output_target(tmp_path / "x.mp4", options=OutputOptions(pix_fmt="rgb24"))
    assert check_output_target(tmp_path / "x.mov", options=OutputOptions(codec="prores_ks")).kind == "video"


def test_the_cli_checks_the_output_before_reading_the_input(tmp_path):
    # the input is not even a video: an output error proves nothing was read first
    bogus = tmp_path / "in.mp4"
    bogus.write_bytes(b"not a video")
    empty_models = tmp_path / "models"
    empty_models.mkdir()
    for output, expected in [(tmp_path / "out.webm", "cannot write 'out.webm'"),
                             (tmp_path / "nope" / "out.mp4", "does not exist"),
                             ("/proc/out.mp4", "cannot write in")]:
        code, log = run_cli([bogus, bogus, output, "--models", empty_models])
        assert code == 1, log
        assert expected in log and "Traceback" not in log and len(log.strip().splitlines()) == 1, log


def test_help_lists_the_output_options_and_their_defaults():
    out = io.StringIO()
    with redirect_stdout(out), redirect_stderr(io.StringIO()):
        assert main(["--help"]) == 0
    text = " ".join(out.getvalue().split())
    for needle in ("--codec", "--crf", "--pix-fmt", "--match-input", "default libx264", "default 18",
                   "default yuv420p", "ffv1", "prores_ks", "--invert-mask", "--allow-large-mask"):
        assert needle in text, needle
    assert np is not None
