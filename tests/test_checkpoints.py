"""Checkpoint reading, family detection and the unet_main / brushnet loaders, on tiny files in the official layouts
and on full-size layouts checked through safetensors headers only (sparse files, no 5 GB of data)."""

import json
import os
import struct

import pytest
import torch
from safetensors.torch import save_file

from diffueraser_core.errors import ModelFileError
from diffueraser_core.models import checkpoints
from diffueraser_core.models.checkpoints import (
    detect_family,
    inspect_network,
    load_brushnet,
    load_unet_main,
    read_state_dict,
    read_tensor_shapes,
)
from diffueraser_core.models.configs import TINY_BRUSHNET_CONFIG, TINY_UNET_MAIN_CONFIG


class _RunsShellOnLoad:
    """Pickling this stores a call to os.system; a safe loader must refuse it without running it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def save_malicious_pth(path, marker):
    torch.save({"weight": torch.zeros(2), "payload": _RunsShellOnLoad(marker)}, path)


def _save_folder(model, folder, dtype=torch.float32):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump({k: v for k, v in model.config.items()}, f, default=list)
    save_file({k: v.to(dtype).contiguous() for k, v in model.state_dict().items()},
              os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    return folder


def build_tiny(kind, seed=0):
    """Tiny unet_main / brushnet with every parameter random (so tests compare real values)."""
    if kind == "unet_main":
        from diffueraser_core.models.unet_motion import DiffuEraserUNet as cls
        config = TINY_UNET_MAIN_CONFIG
    else:
        from diffueraser_core.models.brushnet import BrushNetModel as cls
        config = TINY_BRUSHNET_CONFIG
    gen = torch.Generator().manual_seed(seed)
    model = cls.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.eval()


def write_fake_safetensors(path, shapes, dtype_name="F16", itemsize=2):
    """A safetensors file whose header lists ``shapes``; the data area is a sparse hole (no disk use)."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        nbytes = itemsize
        for d in shape:
            nbytes *= d
        header[name] = {"dtype": dtype_name, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_nets")
    unet, brushnet = build_tiny("unet_main"), build_tiny("brushnet", seed=1)
    return {
        "root": root,
        "unet": unet,
        "brushnet": brushnet,
        "unet_folder": _save_folder(unet, str(root / "diffuEraser" / "unet_main")),
        "brushnet_folder": _save_folder(brushnet, str(root / "diffuEraser" / "brushnet")),
    }


# ------------------------------------------------------------------------------------------------ detection
def _manifest_shapes(reference_dir, name, key="tensors"):
    tensors = json.loads((reference_dir / name).read_text())[key]
    return {k: (tuple(v), torch.float32) for k, v in tensors.items()}


@pytest.mark.parametrize("manifest, family", [
    ("diffuEraser_unet_main.json", "unet_main"),
    ("diffuEraser_brushnet.json", "brushnet"),
    ("propainter_raft_things.json", "raft"),
    ("propainter_recurrent_flow_completion.json", "flow_completion"),
    ("propainter_ProPainter.json", "propainter"),
])
def test_detect_family_of_official_layouts(reference_dir, manifest, family):
    assert detect_family(_manifest_shapes(reference_dir, manifest)) == family


def test_detect_family_of_sd15_components(reference_dir):
    components = json.loads((reference_dir / "sd15_components.json").read_text())
    vae = {k: (tuple(v), torch.float32) for k, v in components["vae"]["tensors"].items()}
    text = {k: (tuple(v), torch.float32) for k, v in components["text_encoder"]["tensors"].items()}
    assert detect_family(vae) == "vae"
    assert detect_family(text) == "clip_text"
    assert detect_family({"cond_stage_model.transformer." + k: v for k, v in text.items()}) == "clip_text"
    ldm_vae = {"encoder.conv_in.weight": ((128, 3, 3, 3), None), "decoder.conv_out.weight": ((3, 128, 3, 3), None),
               "encoder.down.0.block.0.conv1.weight": ((128, 128, 3, 3), None)}
    assert detect_family(ldm_vae) == "vae"
    checkpoint = {"model.diffusion_model.input_blocks.0.0.weight": ((320, 4, 3, 3), None),
                  **{"first_stage_model." + k: v for k, v in ldm_vae.items()},
                  **{"cond_stage_model.transformer." + k: v for k, v in text.items()}}
    assert detect_family(checkpoint) == "sd15_checkpoint"
    assert detect_family({k: v for k, v in checkpoint.items() if k.startswith("model.")}) == "sd15_unet"


def test_detect_family_of_unets_loras_and_junk(tiny):
    unet_sd = tiny["unet"].state_dict()
    plain = {k: v for k, v in unet_sd.items() if "motion_modules" not in k}
    assert detect_family(plain) == "sd15_unet"
    motion_only = {k: v for k, v in unet_sd.items() if "motion_modules" in k}
    assert detect_family(motion_only) == "motion_adapter"
    kohya = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32, 1, 1),
             "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4, 1, 1)}
    assert detect_family(kohya) == "pcm_lora"
    peft = {"unet.mid_block.attentions.0.proj_out.lora_A.weight": torch.zeros(4, 32),
            "unet.mid_block.attentions.0.proj_out.lora_B.weight": torch.zeros(32, 4)}
    assert detect_family(peft) == "pcm_lora"
    sdxl = {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.zeros(4, 2048),
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.zeros(640, 4)}
    assert detect_family(sdxl) == "sdxl_lora"
    assert detect_family({"foo.weight": torch.zeros(1)}) == "unknown"


# ------------------------------------------------------------------------------------------ header-only reads
def test_read_tensor_shapes_reads_headers_and_sees_truncation(tmp_path):
    path = str(tmp_path / "a.safetensors")
    save_file({"x": torch.zeros(3, 5, dtype=torch.float16), "y": torch.ones(7)}, path)
    assert read_tensor_shapes(path) == {"x": ((3, 5), torch.float16), "y": ((7,), torch.float32)}
    data = open(path, "rb").read()
    cut = str(tmp_path / "cut.safetensors")
    open(cut, "wb").write(data[:-6])
    with pytest.raises(ModelFileError, match="truncated"):
        read_tensor_shapes(cut)
    garbage = str(tmp_path / "garbage.safetensors")
    open(garbage, "wb").write(os.urandom(64))
    with pytest.raises(ModelFileError, match="garbage.safetensors"):
        read_tensor_shapes(garbage)


def test_read_tensor_shapes_of_pth_and_refusal_of_code(tmp_path):
    path = str(tmp_path / "w.pth")
    torch.save({"module.a": torch.zeros(2, 3)}, path)
    assert read_tensor_shapes(path) == {"module.a": ((2, 3), torch.float32)}
    marker = tmp_path / "pwned"
    bad = str(tmp_path / "bad.pth")
    save_malicious_pth(bad, marker)
    for reader in (read_tensor_shapes, read_state_dict):
        with pytest.raises(ModelFileError, match="refused for safety"):
            reader(bad)
    with pytest.raises(ModelFileError, match="refused for safety"):
        load_unet_main(bad)
    assert not marker.exists()


# ------------------------------------------------------------------------------------- full size via headers
@pytest.mark.parametrize("family, manifest", [
    ("unet_main", "diffuEraser_unet_main.json"), ("brushnet", "diffuEraser_brushnet.json")])
def test_full_size_manifest_layout_passes_header_validation(tmp_path, reference_dir, family, manifest):
    tensors = json.loads((reference_dir / manifest).read_text())["tensors"]
    path = write_fake_safetensors(str(tmp_path / f"{family}.safetensors"), tensors)
    weights, model = inspect_network(path, family)  # no config.json: config derived from shapes
    assert weights == path
    assert next(model.parameters()).is_meta
    assert model.config.block_out_channels == [320, 640, 1280, 1280]
    assert model.config.cross_attention_dim == 768
    # One tensor short and one reshaped: both reported with counts and names.
    broken = dict(tensors)
    dropped = sorted(broken)[10]
    del broken[dropped]
    broken["conv_in.weight" if family == "unet_main" else "conv_in_condition.weight"][1] += 1
    (tmp_path / "bad").mkdir()
    from diffueraser_core.models.configs import BRUSHNET_CONFIG, UNET_MAIN_CONFIG
    config = UNET_MAIN_CONFIG if family == "unet_main" else BRUSHNET_CONFIG
    (tmp_path / "bad" / "config.json").write_text(json.dumps(config))
    bad = write_fake_safetensors(str(tmp_path / "bad" / "w.safetensors"), broken)
    with pytest.raises(ModelFileError) as info:
        inspect_network(bad, family)
    message = str(info.value)
    assert "1 missing keys" in message and dropped in message and "shape mismatch" in message


# ------------------------------------------------------------------------------------------------- loading
def _assert_same_weights(model, reference, dtype):
    loaded = model.state_dict()
    expected = reference if isinstance(reference, dict) else reference.state_dict()
    assert loaded.keys() == expected.keys()
    for k, v in expected.items():
        assert loaded[k].dtype == (dtype if v.is_floating_point() else v.dtype), k
        assert torch.equal(loaded[k], v.to(loaded[k].dtype)), k


def test_load_tiny_folders(tiny):
    unet = load_unet_main(tiny["unet_folder"])
    assert type(unet).__name__ == "DiffuEraserUNet" and not unet.training
    assert all(p.device.type == "cpu" and not p.requires_grad for p in unet.parameters())
    _assert_same_weights(unet, tiny["unet"], torch.float32)
    brushnet = load_brushnet(str(tiny["root"] / "diffuEraser"))  # the parent folder holding brushnet/
    assert type(brushnet).__name__ == "BrushNetModel"
    _assert_same_weights(brushnet, tiny["brushnet"], torch.float32)


@pytest.mark.parametrize("kind, dtype", [("unet", torch.float16), ("brushnet", torch.bfloat16)])
def test_load_single_files_in_half_dtypes_without_config(tmp_path, tiny, kind, dtype):
    loader = load_unet_main if kind == "unet" else load_brushnet
    path = str(tmp_path / f"{kind}.safetensors")
    save_file({k: v.to(dtype).contiguous() for k, v in tiny[kind].state_dict().items()}, path)
    model = loader(path)  # config derived from the shapes: must find the tiny config (8 norm groups)
    assert model.config.norm_num_groups == 8
    _assert_same_weights(model, tiny[kind], dtype)


def test_load_bin_folder_with_dtype_conversion_and_fp16_variant(tmp_path, tiny):
    folder = tmp_path / "unet_main"
    folder.mkdir()
    (folder / "config.json").write_text(open(os.path.join(tiny["unet_folder"], "config.json")).read())
    torch.save({k: v.half() for k, v in tiny["unet"].state_dict().items()}, folder / "diffusion_pytorch_model.bin")
    converted = load_unet_main(str(folder), dtype=torch.float32)
    _assert_same_weights(converted, {k: v.half() for k, v in tiny["unet"].state_dict().items()}, torch.float32)
    os.remove(folder / "diffusion_pytorch_model.bin")
    variant = folder / "diffusion_pytorch_model.fp16.safetensors"
    variant.write_bytes(b"")
    assert checkpoints._resolve_weights(str(folder), checkpoints.UNET_MAIN_SPEC) == (
        str(variant), str(folder / "config.json"))


def test_wrong_family_errors_name_the_file_and_the_expectation(tmp_path, tiny):
    with pytest.raises(ModelFileError, match="is DiffuEraser unet_main.*expected DiffuEraser brushnet"):
        load_brushnet(tiny["unet_folder"])
    with pytest.raises(ModelFileError, match="is DiffuEraser brushnet.*expected DiffuEraser unet_main"):
        load_unet_main(tiny["brushnet_folder"])
    plain = str(tmp_path / "sd15_unet.safetensors")
    save_file({k: v.contiguous() for k, v in tiny["unet"].state_dict().items() if "motion_modules" not in k}, plain)
    with pytest.raises(ModelFileError) as info:
        load_unet_main(plain)
    assert "sd15_unet.safetensors" in str(info.value)
    assert "is a plain SD1.5 UNet, expected DiffuEraser unet_main (a UNetMotionModel with motion_modules)" \
        in str(info.value)
    other = str(tmp_path / "random.safetensors")
    save_file({"foo.weight": torch.zeros(3)}, other)
    with pytest.raises(ModelFileError, match="not a model family this pack knows"):
        load_brushnet(other)


def test_truncated_corrupt_and_missing_files(tmp_path, tiny):
    data = open(os.path.join(tiny["unet_folder"], "diffusion_pytorch_model.safetensors"), "rb").read()
    cut = tmp_path / "cut" / "diffusion_pytorch_model.safetensors"
    cut.parent.mkdir()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="truncated"):
        load_unet_main(str(cut.parent))
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + os.urandom(100))
    with pytest.raises(ModelFileError, match="corrupt.safetensors"):
        load_unet_main(str(corrupt))
    with pytest.raises(ModelFileError, match="not found"):
        load_unet_main(str(tmp_path / "nowhere"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelFileError, match="holds none of"):
        load_brushnet(str(empty))


def test_config_json_that_does_not_fit_is_reported(tmp_path, tiny):
    folder = tmp_path / "unet_main"
    folder.mkdir()
    config = json.loads(open(os.path.join(tiny["unet_folder"], "config.json")).read())
    config["cross_attention_dim"] = 48
    (folder / "config.json").write_text(json.dumps(config))
    os.link(os.path.join(tiny["unet_folder"], "diffusion_pytorch_model.safetensors"),
            folder / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ModelFileError, match=r"shape mismatches \(.*attn2.to_k.weight: file \[.*, 32\] vs model"):
        load_unet_main(str(folder))
    state = {k: v.contiguous() for k, v in tiny["unet"].state_dict().items()}
    state["extra.weight"] = torch.zeros(1)
    del state["conv_out.bias"]
    path = str(tmp_path / "extra.safetensors")
    save_file(state, path)
    with pytest.raises(ModelFileError, match=r"1 missing keys \(conv_out.bias\); 1 unexpected keys \(extra.weight\)"):
        load_unet_main(path)


def test_config_fields_derived_from_shapes(tiny):
    keys = checkpoints._Keys({k: (tuple(v.shape), v.dtype) for k, v in tiny["unet"].state_dict().items()})
    derived = checkpoints._derive_unet_main(keys)
    assert derived["block_out_channels"] == [32, 32, 64, 64] and derived["cross_attention_dim"] == 32
    assert derived["motion_max_seq_length"] == 32 and derived["use_motion_mid_block"] is True
