"""The CLI's own VAE and text encoder loaders, on the file layouts ComfyUI users keep."""

import pytest
import torch
from safetensors.torch import save_file

from diffueraser_core.errors import InputError, ModelFileError
from diffueraser_core.models import sd15_components as sc
from diffueraser_core.random_weights import sd15


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_vae_ldm_single_file_roundtrip(tmp_path):
    path = sd15.save_vae(str(tmp_path / "vae-ft-mse-840000-ema-pruned.safetensors"), seed=3, layout="ldm")
    reference = sd15.build_vae(seed=3)
    vae = sc.load_vae(path)
    for k, v in _state(reference).items():
        assert torch.equal(vae.state_dict()[k], v), k
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(vae.encode(x).latent_dist.mean, reference.encode(x).latent_dist.mean)


def test_vae_full_size_ldm_key_names_match_the_original_file_layout():
    mapping = sc._vae_key_map(4, 2)
    ldm = set(mapping.values())
    # A few names exactly as in vae-ft-mse-840000-ema-pruned.safetensors
    for name in ("encoder.down.0.block.1.conv2", "encoder.down.1.block.0.nin_shortcut", "encoder.mid.attn_1.q",
                 "decoder.up.3.block.2.norm1", "decoder.up.0.upsample.conv", "decoder.norm_out", "post_quant_conv"):
        assert name in ldm, name
    assert mapping["decoder.up_blocks.0.upsamplers.0.conv"] == "decoder.up.3.upsample.conv"


def test_vae_from_sd15_checkpoint_prefix_and_diffusers_folder(tmp_path):
    path = sd15.save_vae(str(tmp_path / "v.safetensors"), seed=1, layout="ldm")
    from safetensors.torch import load_file

    ckpt = {"first_stage_model." + k: v for k, v in load_file(path).items()}
    ckpt["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(4, 4, 3, 3)
    save_file(ckpt, str(tmp_path / "sd15.safetensors"))
    a = sc.load_vae(str(tmp_path / "sd15.safetensors"))
    folder = sd15.save_vae(str(tmp_path / "sd-vae-ft-mse"), seed=1, layout="diffusers")
    b = sc.load_vae(folder)
    for k, v in a.state_dict().items():
        assert torch.equal(b.state_dict()[k], v)


def test_vae_wrong_file_is_a_clear_error(tmp_path):
    save_file({"foo.weight": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ModelFileError, match="not an SD1.5 VAE"):
        sc.load_vae(str(tmp_path / "x.safetensors"))
    (tmp_path / "trunc.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    with pytest.raises(ModelFileError, match="trunc.safetensors"):
        sc.load_vae(str(tmp_path / "trunc.safetensors"))


@pytest.mark.parametrize("layout", ["single", "folder"])
def test_text_encoder_layouts_and_empty_prompt(tmp_path, layout):
    name = "clip_l.safetensors" if layout == "single" else "text_encoder"
    path = sd15.save_text_encoder(str(tmp_path / name), seed=2, layout=layout)
    te = sc.load_text_encoder(path)
    reference = sd15.build_text_encoder(seed=2)
    ids = sc.empty_prompt_token_ids()
    assert ids[0, 0] == sc.CLIP_BOS_TOKEN and (ids[0, 1:] == sc.CLIP_EOS_TOKEN).all() and ids.shape == (1, 77)
    emb = sc.encode_prompt(te, "")
    assert emb.shape == (1, 77, 32) and torch.isfinite(emb).all()
    with torch.no_grad():
        assert torch.allclose(emb, reference(ids)[0], atol=1e-6)


def test_text_encoder_from_sd15_checkpoint_prefix(tmp_path):
    model = sd15.build_text_encoder(seed=4)
    flat = {k.removeprefix(sc.TEXT_MODEL_PREFIX): v for k, v in model.state_dict().items() if "position_ids" not in k}
    # An SD1.5 checkpoint names them cond_stage_model.transformer.text_model.*
    sd = {"cond_stage_model.transformer.text_model." + k: v for k, v in flat.items()}
    sd["first_stage_model.encoder.conv_in.weight"] = torch.zeros(1)
    save_file(sd, str(tmp_path / "ckpt.safetensors"))
    te = sc.load_text_encoder(str(tmp_path / "ckpt.safetensors"))
    loaded = {k.removeprefix(sc.TEXT_MODEL_PREFIX): v for k, v in te.state_dict().items()}
    for k, v in flat.items():
        assert torch.equal(loaded[k], v), k


def test_text_encoder_errors(tmp_path):
    save_file({"encoder.conv_in.weight": torch.zeros(1)}, str(tmp_path / "vae.safetensors"))
    with pytest.raises(ModelFileError, match="no CLIP text model"):
        sc.load_text_encoder(str(tmp_path / "vae.safetensors"))
    te = sc.load_text_encoder(sd15.save_text_encoder(str(tmp_path / "c.safetensors")))
    with pytest.raises(InputError, match="tokenizer"):
        sc.encode_prompt(te, "a cat")
