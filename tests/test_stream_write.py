"""Output frames are written in order as they complete: ``remove_objects`` hands each finished chunk to
``on_frames``, and ``remove`` writes it at once (the first frames are in the file before the last chunk is decoded),
giving the same file as writing the whole result at the end; an interrupt between chunks leaves an existing output
untouched and no temporary file.

The runs use test_faults' tiny CLI setup (stand-in ProPainter networks, tiny random diffusion networks, a 6-frame
clip) with ``FRAME_CHUNK`` at 2 frames, so the clip is three chunks."""

import os

import pytest
import torch

from diffueraser_core import jobs, media_writer, pipeline
from diffueraser_core.errors import Interrupted
from diffueraser_core.media_in import read_clip
from diffueraser_core.media_out import write_clip
from diffueraser_core.pipeline import DiffuEraserModels, DiffusersVaeCodec, remove_objects
from diffueraser_core.prior_propainter import ProPainterSettings

import test_faults
from test_faults import (
    FAST_PRIOR,
    FAST_SAMPLER,
    TrackingRuntime,
    build_tiny_nets,
    make_clip,
    stand_in_propainter,
    text_embedding,
)

cli_inputs = test_faults.cli_inputs  # the module fixture: models folder, 6-frame clip and mask
CHUNK = 2


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(pipeline, "FRAME_CHUNK", CHUNK)


def run_cli(monkeypatch, cli_inputs, output):
    from diffueraser_core import cli, model_loading

    monkeypatch.setattr(model_loading, "load_propainter", lambda found, runtime: stand_in_propainter(runtime))
    return cli.main([str(cli_inputs["video"]), str(cli_inputs["mask"]), str(output), "--models",
                     str(cli_inputs["models"]), "--device", "cpu", "--steps", "1", "--window-length", "2",
                     "--mask-dilation", "2", "--raft-iter", "1", "--resize-ratio", "1.0"])


def progress_lines(text):
    return [line.removeprefix("[diffueraser] ") for line in text.splitlines() if line.startswith("[diffueraser] ")]


def test_remove_writes_each_chunk_before_the_next_is_decoded_and_the_same_file_as_a_whole_write(
        monkeypatch, cli_inputs, tmp_path, capsys, small_chunks):
    streamed = tmp_path / "streamed.mp4"
    assert run_cli(monkeypatch, cli_inputs, streamed) == 0
    lines = progress_lines(capsys.readouterr().err)
    # the first chunk is written between its decode and the next chunk's
    assert lines.index("decode: 2/6") < lines.index("write: 1/6") < lines.index("write: 2/6") < lines.index(
        "decode: 4/6") < lines.index("write: 3/6") < lines.index("decode: 6/6") < lines.index("write: 6/6")
    assert sum(line.startswith("job 100%") for line in lines) == 1 and lines[-1] == f"wrote {streamed}: 1/1"

    # the previous path: the engine returns the whole result (nothing handed over), written by write_clip
    results = []
    remove = jobs.LocalEngine.remove

    def whole_result(self, *args, on_frames=None, **kwargs):
        results.append(remove(self, *args, **kwargs))
        return results[-1]

    monkeypatch.setattr(jobs.LocalEngine, "remove", whole_result)
    assert run_cli(monkeypatch, cli_inputs, tmp_path / "whole.mp4") == 0
    lines = progress_lines(capsys.readouterr().err)
    assert lines.index("decode: 6/6") < lines.index("write: 1/6")  # written at the end this time
    reference = write_clip(tmp_path / "reference.mp4", results[0], read_clip(cli_inputs["video"]).info)
    assert streamed.read_bytes() == reference.read_bytes() == (tmp_path / "whole.mp4").read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["reference.mp4", "streamed.mp4", "whole.mp4"]


@pytest.mark.parametrize("failure", ["ctrl-c in the second write", "cancel after the first chunk"])
def test_an_interrupt_between_chunks_keeps_the_existing_output_and_leaves_no_temporary_file(
        monkeypatch, cli_inputs, tmp_path, small_chunks, failure):
    from diffueraser_core.runtime import StandaloneRuntime

    out = tmp_path / "out.mp4"
    out.write_bytes(b"an earlier result")
    starts = []
    write = media_writer.ClipWriter.write

    def counting_write(self, start, frames, original=None):
        starts.append(start)
        if failure.startswith("ctrl-c") and len(starts) == 2:
            raise KeyboardInterrupt
        return write(self, start, frames, original)

    def check_interrupt(self):
        if starts:
            raise Interrupted("DiffuEraser: run cancelled")

    monkeypatch.setattr(media_writer.ClipWriter, "write", counting_write)
    if failure.startswith("cancel"):
        monkeypatch.setattr(StandaloneRuntime, "check_interrupt", check_interrupt)
        assert run_cli(monkeypatch, cli_inputs, out) == 130
        assert starts == [0]
    else:
        with pytest.raises(KeyboardInterrupt):
            run_cli(monkeypatch, cli_inputs, out)
        assert starts == [0, CHUNK]
    assert out.read_bytes() == b"an earlier result"
    assert os.listdir(tmp_path) == ["out.mp4"]  # no .partial file


def test_an_empty_mask_writes_the_input_as_it_comes_back(monkeypatch, cli_inputs, tmp_path):
    import cv2
    import numpy as np

    # nothing is computed, so no chunk is handed over: the result the engine returns is written instead
    cv2.imwrite(str(tmp_path / "empty.png"), np.zeros((64, 64), np.uint8))
    inputs = {**cli_inputs, "mask": tmp_path / "empty.png"}
    assert run_cli(monkeypatch, inputs, tmp_path / "out.mp4") == 0
    source = read_clip(cli_inputs["video"])
    reference = write_clip(tmp_path / "reference.mp4", source.frames, source.info)
    assert (tmp_path / "out.mp4").read_bytes() == reference.read_bytes()


@pytest.fixture(scope="module")
def nets():
    return build_tiny_nets()


@pytest.mark.parametrize("mode", ["diffusion", "diffusion into a 16-bit RGBA original", "prior only"])
def test_remove_objects_hands_over_every_chunk_in_order_as_slices_of_its_result(nets, small_chunks, mode):
    frames, masks = make_clip(5, 64, 64, seed=3)
    original = None
    if "original" in mode:
        original = torch.cat([frames.to(torch.int32) * 257, torch.full((5, 64, 64, 1), 40000)], -1).to(torch.uint16)
    runtime = TrackingRuntime()
    unet, brushnet, vae = nets
    chunks = []
    out = remove_objects(
        frames.clone(), masks, propainter_nets=stand_in_propainter(runtime), runtime=runtime,
        models=DiffuEraserModels(runtime.wrap(unet, "unet_main"), runtime.wrap(brushnet, "brushnet")),
        codec=DiffusersVaeCodec(runtime.wrap(vae, "vae"), runtime), text_embeddings=text_embedding(),
        sampler_settings=pipeline.SamplerSettings(**FAST_SAMPLER), propainter_settings=ProPainterSettings(**FAST_PRIOR),
        prior_only=mode == "prior only", original=original,
        on_frames=lambda start, stop, chunk: chunks.append((start, stop, chunk.clone(), chunk.data_ptr())),
    )
    assert [(start, stop) for start, stop, _, _ in chunks] == [(0, 2), (2, 4), (4, 5)]
    assert torch.equal(torch.cat([chunk for _, _, chunk, _ in chunks]), out)
    # slices of the result itself (no copies), the original when there is one
    assert [ptr for _, _, _, ptr in chunks] == [out[start].data_ptr() for start, _, _, _ in chunks]
    assert out is original if original is not None else out.dtype == torch.uint8
