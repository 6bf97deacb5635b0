"""The model doctor on a ComfyUI-style models folder built here: exit codes and one line per file."""

import io
import json
import os
import shutil
import struct

import pytest
import torch

from diffueraser_core import doctor
from diffueraser_core.errors import ModelFileError
from diffueraser_core.__main__ import main as package_main
from diffueraser_core.model_files import find_model_files
from diffueraser_core.random_weights.lora import save_pcm_lora
from diffueraser_core.random_weights.sd15 import save_text_encoder, save_vae

PROPAINTER_FILES = {
    "raft-things.pth": "propainter_raft_things.json",
    "recurrent_flow_completion.pth": "propainter_recurrent_flow_completion.json",
    "ProPainter.pth": "propainter_ProPainter.json",
}


class _RunsShellOnLoad:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _save_shapes_pth(path, shapes):
    """A .pth with the official keys and shapes whose tensors share one element of storage (a few KB on disk)."""
    zero = torch.zeros(1)
    torch.save({k: zero.expand(*v) if v else zero[0] for k, v in shapes.items()}, path)


def _write_header_only_safetensors(path, shapes):
    header, offset = {}, 0
    for name, shape in shapes.items():
        nbytes = 2 * int(torch.tensor(shape).prod()) if shape else 2
        header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)


@pytest.fixture(scope="module")
def good_models(tmp_path_factory, reference_dir):
    from diffueraser_core.models.checkpoints import load_unet_main
    from diffueraser_core.random_weights.diffusion import save_brushnet_folder, save_unet_main_folder

    root = tmp_path_factory.mktemp("models")
    save_unet_main_folder(root / "diffueraser" / "diffuEraser" / "unet_main")
    save_brushnet_folder(root / "diffueraser" / "diffuEraser" / "brushnet")
    unet = load_unet_main(str(root / "diffueraser" / "diffuEraser" / "unet_main"))
    save_pcm_lora(str(root / "diffueraser" / "pcm_sd15_smallcfg_2step_converted.safetensors"), unet)
    (root / "propainter").mkdir()
    for name, manifest in PROPAINTER_FILES.items():
        shapes = json.loads((reference_dir / manifest).read_text())["tensors"]
        _save_shapes_pth(str(root / "propainter" / name), shapes)
    save_vae(str(root / "vae" / "vae-ft-mse-840000-ema-pruned.safetensors"))
    save_text_encoder(str(root / "text_encoders" / "clip_l.safetensors"))
    return root


@pytest.fixture
def models(tmp_path, good_models):
    return shutil.copytree(good_models, tmp_path / "models")


def _run(models_dir):
    out = io.StringIO()
    code = doctor.main(["--models", str(models_dir)], stream=out)
    lines = {line.split()[1]: line for line in out.getvalue().splitlines()[1:-1]}
    return code, lines, out.getvalue()


def test_complete_folder_passes(models):
    code, lines, text = _run(models)
    assert code == 0, text
    for key in ("unet_main", "brushnet", "pcm_lora", "raft", "flow_completion", "propainter", "vae", "text_encoder"):
        assert lines[key].startswith("OK "), lines[key]
    assert "unet_main layers patched" in lines["pcm_lora"]
    assert lines["sd15_checkpoint"].startswith("- ") and "[optional]" in lines["sd15_checkpoint"]
    assert text.rstrip().endswith("all 8 needed model files are usable")
    assert find_model_files(str(models))["raft"] == str(models / "propainter" / "raft-things.pth")


def test_each_problem_is_reported_with_its_reason(models, tmp_path):
    os.remove(models / "diffueraser" / "pcm_sd15_smallcfg_2step_converted.safetensors")
    brushnet = models / "diffueraser" / "diffuEraser" / "brushnet"
    shutil.rmtree(brushnet)
    shutil.copytree(models / "diffueraser" / "diffuEraser" / "unet_main", brushnet)  # unet in the brushnet slot
    raft = models / "propainter" / "raft-things.pth"
    raft.write_bytes(raft.read_bytes()[:200])
    marker = tmp_path / "pwned"
    torch.save({"w": torch.zeros(1), "x": _RunsShellOnLoad(marker)}, models / "propainter" / "ProPainter.pth")
    flow = models / "propainter" / "recurrent_flow_completion.pth"
    shapes = {k: tuple(v.shape) for k, v in torch.load(flow, weights_only=True).items()}
    shapes["downsample.0.weight"] = (16, 3, 1, 5, 5)
    _save_shapes_pth(str(flow), shapes)
    from diffueraser_core.random_weights.sd15 import TINY_TEXT_CONFIG
    save_text_encoder(str(models / "text_encoders" / "clip_l.safetensors"), dict(TINY_TEXT_CONFIG, hidden_size=48))

    code, lines, text = _run(models)
    assert code == 1
    assert lines["pcm_lora"].startswith("MISSING") and "huggingface.co/wangfuyun/PCM_Weights" in lines["pcm_lora"]
    assert lines["brushnet"].startswith("INVALID") and "expected DiffuEraser brushnet" in lines["brushnet"]
    assert lines["raft"].startswith("INVALID") and "truncated" in lines["raft"]
    assert lines["propainter"].startswith("INVALID") and "refused for safety" in lines["propainter"]
    assert not marker.exists()
    assert lines["flow_completion"].startswith("INVALID") and "downsample.0.weight" in lines["flow_completion"]
    assert lines["text_encoder"].startswith("INVALID") and "width 48" in lines["text_encoder"]
    for key in ("unet_main", "vae"):
        assert lines[key].startswith("OK "), lines[key]
    assert "6 of 8 needed model files are missing or invalid: brushnet, pcm_lora, raft" in text


def test_sd15_checkpoint_stands_in_for_vae_and_text_encoder(models):
    from diffueraser_core.models.sd15_components import vae_diffusers_to_ldm
    from diffueraser_core.random_weights.sd15 import build_text_encoder, build_vae

    shutil.rmtree(models / "vae")
    shutil.rmtree(models / "text_encoders")
    vae = {k: tuple(v.shape) for k, v in vae_diffusers_to_ldm(build_vae().state_dict(), 4, 1).items()}
    # official checkpoints name the text tensors cond_stage_model.transformer.text_model.* whatever transformers
    # calls them (transformers 5 dropped the text_model. level from CLIPTextModel)
    text = {("" if k.startswith("text_model.") else "text_model.") + k: tuple(v.shape)
            for k, v in build_text_encoder().state_dict().items() if "position_ids" not in k}
    shapes = {"model.diffusion_model.input_blocks.0.0.weight": (32, 4, 3, 3),
              **{"first_stage_model." + k: v for k, v in vae.items()},
              **{"cond_stage_model.transformer." + k: v for k, v in text.items()}}
    (models / "checkpoints").mkdir()
    path = models / "checkpoints" / "v1-5-pruned-emaonly.safetensors"
    _write_header_only_safetensors(str(path), shapes)
    code, lines, text = _run(models)
    assert code == 0, text
    assert "inside the SD1.5 checkpoint" in lines["vae"] and "inside the SD1.5 checkpoint" in lines["text_encoder"]
    assert lines["sd15_checkpoint"].startswith("OK ")


def test_missing_folder_and_default_location(tmp_path, monkeypatch):
    assert doctor.main(["--models", str(tmp_path / "nope")], stream=io.StringIO()) == 1
    monkeypatch.setenv(doctor.ENV_MODELS_DIR, str(tmp_path))
    expected = str(tmp_path)
    if os.path.basename(os.path.dirname(doctor.PACK_DIR)) == "custom_nodes":
        expected = os.path.join(os.path.dirname(os.path.dirname(doctor.PACK_DIR)), "models")
    assert doctor.default_models_dir() == expected
    monkeypatch.delenv(doctor.ENV_MODELS_DIR)
    monkeypatch.chdir(tmp_path)
    if expected == str(tmp_path):
        assert doctor.default_models_dir() == str(tmp_path / "models")


def test_package_entry_point_runs_the_doctor(models, capsys):
    os.remove(models / "propainter" / "raft-things.pth")
    assert package_main(["doctor", "--models", str(models)]) == 1
    out = capsys.readouterr().out
    assert "MISSING" in out and "github.com/sczhou/ProPainter/releases/tag/v0.1.0" in out


def test_transformers_folder_text_encoder_is_accepted_and_loads(models):
    # a transformers folder (config.json + model.safetensors) whose tensors are named text_model.* as the official
    # files are: the loader maps them onto whatever the installed transformers builds, and the doctor checks the
    # folder through that same loader
    from diffueraser_core.models.sd15_components import TEXT_MODEL_PREFIX, encode_prompt, load_text_encoder
    from diffueraser_core.models.checkpoints import read_tensor_shapes

    shutil.rmtree(models / "text_encoders")
    folder = models / "text_encoders" / "sd15_text_encoder"
    save_text_encoder(str(folder), seed=3, layout="folder")
    keys = read_tensor_shapes(str(folder / "model.safetensors"))
    assert keys and all(k.startswith(TEXT_MODEL_PREFIX) for k in keys)
    code, lines, text = _run(models)
    assert code == 0, text
    assert lines["text_encoder"].startswith("OK ") and "model.safetensors" in lines["text_encoder"]
    model = load_text_encoder(str(folder))
    embedding = encode_prompt(model, "")
    assert embedding.shape == (1, 77, 32) and torch.isfinite(embedding).all()


def test_doctor_rejects_what_the_loader_rejects(models):
    # one tensor short: the loader's strict check fails, so the doctor's does too (same code)
    from safetensors.torch import load_file, save_file

    from diffueraser_core.models.sd15_components import load_text_encoder

    path = models / "text_encoders" / "clip_l.safetensors"
    tensors = load_file(str(path))
    dropped = sorted(k for k in tensors if k.endswith("final_layer_norm.bias"))[0]
    del tensors[dropped]
    save_file(tensors, str(path))
    with pytest.raises(ModelFileError, match="1 missing keys"):
        load_text_encoder(str(path))
    code, lines, text = _run(models)
    assert code == 1 and lines["text_encoder"].startswith("INVALID") and "1 missing keys" in lines["text_encoder"]
