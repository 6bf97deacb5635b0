"""PCM LoRA: kohya and peft files change exactly the targeted 2D weights by strength * alpha/rank * up @ down."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffueraser_core.errors import ModelFileError
from diffueraser_core.models.configs import TINY_UNET_MAIN_CONFIG
from diffueraser_core.models.lora import apply_lora, lora_deltas, read_lora
from diffueraser_core.random_weights.lora import PCM_TARGET_MODULES, pcm_target_module_names, save_pcm_lora


@pytest.fixture(scope="module")
def unet():
    from diffueraser_core.models.unet_motion import DiffuEraserUNet

    torch.manual_seed(0)
    return DiffuEraserUNet.from_config(TINY_UNET_MAIN_CONFIG).eval().requires_grad_(False)


def _expected_delta(raw, stem_down, stem_up, scale, shape):
    down, up = raw[stem_down].float(), raw[stem_up].float()
    return (scale * (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1))).reshape(shape)


@pytest.mark.parametrize("style, alpha, strength", [("kohya", 8.0, 0.7), ("peft", 2.0, 1.0), ("peft", None, 0.5)])
def test_lora_changes_exactly_the_targeted_weights(tmp_path, unet, style, alpha, strength):
    rank = 4
    path = save_pcm_lora(str(tmp_path / f"pcm_sd15_{style}.safetensors"), unet, rank=rank, style=style, seed=3,
                         alpha=alpha, dtype=torch.float32)
    raw = load_file(path)
    targets = pcm_target_module_names(unet)
    assert targets and not any("motion_modules" in t for t in targets)
    # Every PCM target kind is present in the tiny UNet (shortcut convs, samplers, time projections, ff...).
    assert all(any(t == kind or t.endswith("." + kind) for t in targets) for kind in PCM_TARGET_MODULES)

    patched = _copy(unet)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    changed = apply_lora(patched, read_lora(path), strength=strength)
    assert changed == sorted(f"{t}.weight" for t in targets)
    after = patched.state_dict()
    scale = strength * (alpha if alpha is not None else rank) / rank  # peft without alpha: scale 1
    for name in targets:
        key = f"{name}.weight"
        if style == "kohya":
            stem = "lora_unet_" + name.replace(".", "_")
            down, up = f"{stem}.lora_down.weight", f"{stem}.lora_up.weight"
        else:
            down, up = f"unet.{name}.lora_A.weight", f"unet.{name}.lora_B.weight"
        expected = before[key] + _expected_delta(raw, down, up, scale, before[key].shape)
        torch.testing.assert_close(after[key], expected, rtol=1e-5, atol=1e-6)
        assert not torch.equal(after[key], before[key])
    untouched = [k for k in before if k not in changed]
    assert any("motion_modules" in k for k in untouched)
    for key in untouched:
        assert torch.equal(after[key], before[key]), key


def test_deltas_keep_the_parameter_dtype_and_do_not_modify(tmp_path, unet):
    path = save_pcm_lora(str(tmp_path / "l.safetensors"), unet, rank=2, style="kohya", alpha=1.0)
    half = _copy(unet).half()
    before = {k: v.clone() for k, v in half.state_dict().items()}
    deltas = lora_deltas(half, read_lora(path), strength=1.0)
    assert all(d.dtype == torch.float16 for d in deltas.values())
    now = half.state_dict()
    assert all(torch.equal(v, now[k]) for k, v in before.items())
    zero = lora_deltas(half, read_lora(path), strength=0.0)
    assert all(not d.any() for d in zero.values())


def test_keys_that_match_no_layer_are_listed(tmp_path, unet):
    path = save_pcm_lora(str(tmp_path / "l.safetensors"), unet, rank=2, style="kohya")
    raw = load_file(path)
    motion = "lora_unet_down_blocks_0_motion_modules_0_proj_in"
    bogus = "lora_unet_down_blocks_9_resnets_0_conv1"
    for stem in (motion, bogus):
        raw[f"{stem}.lora_down.weight"] = torch.zeros(2, 32)
        raw[f"{stem}.lora_up.weight"] = torch.zeros(32, 2)
    bad = str(tmp_path / "bad.safetensors")
    save_file(raw, bad)
    with pytest.raises(ModelFileError) as info:
        apply_lora(_copy(unet), read_lora(bad))
    assert "2 of" in str(info.value) and motion in str(info.value) and bogus in str(info.value)


def test_sdxl_and_non_lora_files_are_refused(tmp_path):
    sdxl = {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.zeros(4, 2048),
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.zeros(640, 4),
            "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 1280),
            "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(5120, 4)}
    save_file(sdxl, str(tmp_path / "sdxl.safetensors"))
    with pytest.raises(ModelFileError, match="SDXL LoRA"):
        read_lora(str(tmp_path / "sdxl.safetensors"))
    save_file({"conv_in.weight": torch.zeros(3)}, str(tmp_path / "not_lora.safetensors"))
    with pytest.raises(ModelFileError, match="is not a LoRA"):
        read_lora(str(tmp_path / "not_lora.safetensors"))


def test_text_encoder_keys_are_skipped_and_alpha_defaults_to_rank(tmp_path, unet):
    name = "down_blocks.0.attentions.0.proj_in"
    stem = "lora_unet_" + name.replace(".", "_")
    down, up = torch.randn(3, 32, 1, 1), torch.randn(32, 3, 1, 1)
    lora = {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up,
            "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(3, 32),
            "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(64, 3)}
    save_file(lora, str(tmp_path / "l.safetensors"))
    normalised = read_lora(str(tmp_path / "l.safetensors"))
    assert float(normalised[f"{stem}.alpha"]) == 3.0 and not any(k.startswith("lora_te") for k in normalised)
    deltas = lora_deltas(unet, normalised, strength=2.0)
    assert list(deltas) == [f"{name}.weight"]
    torch.testing.assert_close(deltas[f"{name}.weight"], 2.0 * (up.flatten(1) @ down.flatten(1)).reshape(32, 32, 1, 1))


def _copy(module):
    import copy

    return copy.deepcopy(module)
