"""DiffuEraser's two networks: motion UNet (DiffuEraser forward) and cross-attention BrushNet.

Layouts are checked against the official manifests at full size (meta device, no memory); behaviour on the tiny
configs with every weight random (zero-initialised taps made live), 4 frames, latent 16x16, 8 text tokens, t=999.
"""

import json

import pytest
import torch

from diffueraser_core.errors import InputError, ModelFileError
from diffueraser_core.models import configs
from diffueraser_core.models.brushnet import BrushNetModel
from diffueraser_core.models.checkpoints import load_brushnet, load_unet_main, read_state_dict
from diffueraser_core.models.unet_motion import DiffuEraserUNet
from diffueraser_core.random_weights import diffusion

FRAMES = 4
LATENT = 16
TOKENS = 8
TEXT_DIM = 32
TIMESTEP = 999
N_DOWN, N_UP = 12, 15

# Output of the reference classes (lixiaowen-xw/DiffuEraser libs/brushnet_CA.py + libs/unet_motion_model.py, run
# once offline with the tiny configs, weights from build_*(seed=0 / seed=1) and the inputs of _inputs()): sum, sum
# of absolute values, and every 997th element of the flattened [1, 4, 4, 16, 16] output.
REFERENCE_OUTPUT_SUM = None
REFERENCE_OUTPUT_ABS_SUM = None
REFERENCE_OUTPUT_SAMPLES = None


def _manifest_without_meta(config):
    return {k: v for k, v in config.items() if not k.startswith("_")}


@pytest.fixture(scope="module")
def nets():
    return diffusion.build_unet_main(seed=0), diffusion.build_brushnet(seed=1)


def _inputs(seed=0, batch=1):
    gen = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, FRAMES, LATENT, LATENT, generator=gen)
    cond = torch.randn(batch * FRAMES, 5, LATENT, LATENT, generator=gen)
    text = torch.randn(batch, TOKENS, TEXT_DIM, generator=gen)
    return sample, cond, text


def _frames_first(sample):
    """[B, C, F, h, w] -> [B*F, C, h, w] in (b f) order, as BrushNet takes frames."""
    b, c, f, h, w = sample.shape
    return sample.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)


def _run(unet, brushnet, sample, cond, text, scale=1.0):
    with torch.no_grad():
        down, mid, up = brushnet(_frames_first(sample), TIMESTEP, text.repeat_interleave(FRAMES, 0), cond, scale)
        return unet(sample, TIMESTEP, text, down, mid, up), (down, mid, up)


# ---------------------------------------------------------------- layouts


@pytest.mark.parametrize(
    "manifest, model_class, config",
    [
        ("diffuEraser_unet_main.json", DiffuEraserUNet, configs.UNET_MAIN_CONFIG),
        ("diffuEraser_brushnet.json", BrushNetModel, configs.BRUSHNET_CONFIG),
    ],
)
def test_full_size_layout_matches_manifest(reference_dir, manifest, model_class, config):
    reference = json.loads((reference_dir / manifest).read_text())
    with torch.device("meta"):
        model = model_class.from_config(config)
    shapes = {name: list(t.shape) for name, t in model.state_dict().items()}
    assert shapes == reference["tensors"]
    assert len(shapes) == reference["n_tensors"]
    assert sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers()) == reference["n_params"]
    assert _manifest_without_meta(config) == _manifest_without_meta(reference["config"])


def test_tiny_layouts_match_reference(reference_dir):
    tiny = json.loads((reference_dir / "tiny_configs.json").read_text())
    assert configs.TINY_UNET_MAIN_CONFIG == tiny["unet_main"]
    assert configs.TINY_BRUSHNET_CONFIG == tiny["brushnet"]
    for model_class, config, key in (
        (DiffuEraserUNet, configs.TINY_UNET_MAIN_CONFIG, "unet_main_tensors"),
        (BrushNetModel, configs.TINY_BRUSHNET_CONFIG, "brushnet_tensors"),
    ):
        with torch.device("meta"):
            model = model_class.from_config(config)
        assert {n: list(t.shape) for n, t in model.state_dict().items()} == tiny[key]


def test_brushnet_config_keys_are_the_official_ones(reference_dir):
    official = json.loads((reference_dir / "diffuEraser_brushnet.json").read_text())["config"]
    with torch.device("meta"):
        model = BrushNetModel.from_config(configs.BRUSHNET_CONFIG)
    assert set(_manifest_without_meta(model.config)) == set(_manifest_without_meta(official))
    assert model.config.conditioning_channels == 5


def test_brushnet_refuses_options_it_does_not_implement():
    for bad in ({"class_embed_type": "timestep"}, {"addition_embed_type": "text"},
                {"global_pool_conditions": True}, {"mid_block_type": "UNetMidBlock2D"}):
        with pytest.raises(ModelFileError, match="DiffuEraser BrushNet"):
            with torch.device("meta"):
                BrushNetModel.from_config({**configs.TINY_BRUSHNET_CONFIG, **bad})


# ---------------------------------------------------------------- files


def test_random_folders_round_trip(tmp_path, nets):
    unet, brushnet = nets
    unet_dir = diffusion.save_unet_main_folder(tmp_path / "unet_main", seed=0)
    brush_dir = diffusion.save_brushnet_folder(tmp_path / "brushnet", seed=1)
    for folder, class_name in ((unet_dir, "UNetMotionModel"), (brush_dir, "BrushNetModel")):
        assert sorted(p.name for p in folder.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
        assert json.loads((folder / "config.json").read_text())["_class_name"] == class_name

    stored = read_state_dict(str(brush_dir / "diffusion_pytorch_model.safetensors"))
    assert stored["brushnet_up_blocks.14.weight"].abs().sum() > 0  # taps are live, not zero-initialised

    loaded_unet, loaded_brushnet = load_unet_main(str(unet_dir)), load_brushnet(str(brush_dir))
    assert isinstance(loaded_unet, DiffuEraserUNet) and isinstance(loaded_brushnet, BrushNetModel)
    for original, loaded in ((unet, loaded_unet), (brushnet, loaded_brushnet)):
        ref_sd, new_sd = original.state_dict(), loaded.state_dict()
        assert ref_sd.keys() == new_sd.keys()
        assert all(torch.equal(ref_sd[k], new_sd[k]) for k in ref_sd)
    sample, cond, text = _inputs()
    assert torch.equal(_run(unet, brushnet, sample, cond, text)[0], _run(loaded_unet, loaded_brushnet, sample, cond,
                                                                          text)[0])


def test_fp16_folder_keeps_dtype(tmp_path):
    folder = diffusion.save_brushnet_folder(tmp_path / "brushnet16", dtype=torch.float16)
    stored = read_state_dict(str(folder / "diffusion_pytorch_model.safetensors"))
    assert {t.dtype for t in stored.values()} == {torch.float16}


# ---------------------------------------------------------------- forward behaviour


def test_brushnet_to_unet_clip(nets):
    unet, brushnet = nets
    sample, cond, text = _inputs()
    out, (down, mid, up) = _run(unet, brushnet, sample, cond, text)
    again, _ = _run(unet, brushnet, sample, cond, text)
    assert out.shape == (1, 4, FRAMES, LATENT, LATENT)
    assert torch.isfinite(out).all() and out.abs().mean() > 1e-3
    assert torch.equal(out, again)
    assert len(down) == N_DOWN and len(up) == N_UP
    # Tap resolutions in execution order (h, h, h, h/2 ... for the down path; back up for the decoder).
    assert [t.shape[-1] for t in down] == [16, 16, 16, 8, 8, 8, 4, 4, 4, 2, 2, 2]
    assert mid.shape == (FRAMES, 64, 2, 2)
    assert [t.shape[-1] for t in up] == [2, 2, 2, 4, 4, 4, 4, 8, 8, 8, 8, 16, 16, 16, 16]
    assert [t.shape[1] for t in up] == [64] * 8 + [32] * 7


@pytest.mark.skipif(REFERENCE_OUTPUT_SUM is None, reason="reference numbers not recorded")
def test_matches_reference_implementation_numbers(nets):
    unet, brushnet = nets
    out, _ = _run(unet, brushnet, *_inputs())
    assert out.double().sum().item() == pytest.approx(REFERENCE_OUTPUT_SUM, rel=1e-4, abs=1e-4)
    assert out.double().abs().sum().item() == pytest.approx(REFERENCE_OUTPUT_ABS_SUM, rel=1e-4)
    samples = out.flatten()[::997].tolist()
    assert samples == pytest.approx(REFERENCE_OUTPUT_SAMPLES, rel=1e-3, abs=1e-5)


def test_every_brushnet_tap_changes_the_output(nets):
    unet, brushnet = nets
    sample, cond, text = _inputs()
    out, (down, mid, up) = _run(unet, brushnet, sample, cond, text)
    scale = out.abs().mean()
    slots = [("down", i) for i in range(N_DOWN)] + [("mid", 0)] + [("up", i) for i in range(N_UP)]
    assert len(slots) == 28
    for kind, index in slots:
        d, m, u = list(down), mid, list(up)
        if kind == "down":
            d[index] = torch.zeros_like(d[index])
        elif kind == "mid":
            m = torch.zeros_like(m)
        else:
            u[index] = torch.zeros_like(u[index])
        with torch.no_grad():
            changed = unet(sample, TIMESTEP, text, d, m, u)
        assert (changed - out).abs().mean() > 1e-4 * scale, f"{kind} tap {index} has no effect"


def test_zero_conditioning_scale_equals_no_residuals(nets):
    unet, brushnet = nets
    sample, cond, text = _inputs()
    zero_out, (down, mid, up) = _run(unet, brushnet, sample, cond, text, scale=0.0)
    assert all(t.abs().max() == 0 for t in [*down, mid, *up])
    with torch.no_grad():
        plain = unet(sample, TIMESTEP, text)
    assert torch.equal(zero_out, plain)
    full_out, _ = _run(unet, brushnet, sample, cond, text, scale=1.0)
    assert (full_out - plain).abs().mean() > 1e-4
    _, (half_down, _, _) = _run(unet, brushnet, sample, cond, text, scale=0.5)
    _, (full_down, _, _) = _run(unet, brushnet, sample, cond, text, scale=1.0)
    assert torch.allclose(half_down[5] * 2, full_down[5])


def test_mid_block_applies_resnet1_twice(nets):
    unet, _ = nets
    sample, _, text = _inputs()
    mid_residual = torch.randn(FRAMES, 64, 2, 2, generator=torch.Generator().manual_seed(3))
    mid = unet.mid_block
    captured = {}
    calls = []

    def keep_input(module, args):
        captured["hidden"], captured["temb"] = args[0], args[1]

    def keep_output(module, args, output):
        calls.append(output)

    handles = [mid.resnets[0].register_forward_pre_hook(keep_input),
               mid.resnets[1].register_forward_hook(keep_output)]
    try:
        with torch.no_grad():
            unet(sample, TIMESTEP, text, mid_block_add_sample=mid_residual)
    finally:
        for handle in handles:
            handle.remove()
    assert len(calls) == 2
    hidden, temb = captured["hidden"], captured["temb"]
    frame_text = text.repeat_interleave(FRAMES, 0)
    with torch.no_grad():
        h = mid.resnets[0](hidden, temb)
        h = mid.attentions[0](h, encoder_hidden_states=frame_text, return_dict=False)[0]
        h = mid.resnets[1](h, temb) + mid_residual
        h = mid.motion_modules[0](h, num_frames=FRAMES)
        expected = mid.resnets[1](h, temb)
        # Stock diffusers order (resnet0 -> attn -> motion -> resnet1) must differ, or this test proves nothing.
        stock = mid.resnets[1](mid.motion_modules[0](mid.attentions[0](
            mid.resnets[0](hidden, temb), encoder_hidden_states=frame_text, return_dict=False)[0], num_frames=FRAMES),
            temb)
    assert torch.allclose(calls[-1], expected, atol=1e-6)
    assert not torch.allclose(stock, expected, atol=1e-3)


def test_motion_modules_mix_frames_brushnet_does_not(nets):
    unet, brushnet = nets
    sample, cond, text = _inputs()
    out, (down, mid, up) = _run(unet, brushnet, sample, cond, text)
    changed = sample.clone()
    changed[:, :, 0] += 1.0
    changed_cond = cond.clone()
    changed_cond[0] += 1.0
    out2, (down2, mid2, up2) = _run(unet, brushnet, changed, changed_cond, text)
    # UNet: frame 0's change reaches frame 3 through the motion modules.
    assert (out2[:, :, 3] - out[:, :, 3]).abs().mean() > 1e-4
    # BrushNet: frames 1..3 of every tap are untouched, frame 0's are not.
    for before, after in zip([*down, mid, *up], [*down2, mid2, *up2]):
        assert torch.allclose(before[1:], after[1:], atol=1e-6)
        assert not torch.allclose(before[0], after[0])


def test_clips_in_a_batch_are_independent(nets):
    unet, brushnet = nets
    sample, cond, text = _inputs(seed=5, batch=2)
    both, _ = _run(unet, brushnet, sample, cond, text)
    for clip in range(2):
        frames = slice(clip * FRAMES, (clip + 1) * FRAMES)
        alone, _ = _run(unet, brushnet, sample[clip:clip + 1], cond[frames], text[clip:clip + 1])
        assert torch.allclose(both[clip:clip + 1], alone, atol=1e-5)


def test_odd_latent_size_and_tensor_timestep(nets):
    unet, brushnet = nets
    gen = torch.Generator().manual_seed(7)
    sample = torch.randn(1, 4, 3, 12, 20, generator=gen)
    cond = torch.randn(3, 5, 12, 20, generator=gen)
    text = torch.randn(1, TOKENS, TEXT_DIM, generator=gen)
    with torch.no_grad():
        down, mid, up = brushnet(_frames_first(sample), torch.tensor(TIMESTEP), text.repeat(3, 1, 1), cond)
        out = unet(sample, torch.tensor([TIMESTEP]), text, down, mid, up)
    assert out.shape == (1, 4, 3, 12, 20) and torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_weights_run(dtype):
    unet = diffusion.build_unet_main(seed=0, dtype=dtype)
    brushnet = diffusion.build_brushnet(seed=1, dtype=dtype)
    out, (down, _, _) = _run(unet, brushnet, *_inputs())
    assert out.dtype == dtype and down[0].dtype == dtype
    assert torch.isfinite(out).all()


def test_wrong_residual_counts_are_refused(nets):
    unet, brushnet = nets
    sample, cond, text = _inputs()
    _, (down, mid, up) = _run(unet, brushnet, sample, cond, text)
    with pytest.raises(InputError, match="11 down residuals"):
        unet(sample, TIMESTEP, text, down[:-1], mid, up)
    with pytest.raises(InputError, match="14 up residuals"):
        unet(sample, TIMESTEP, text, down, mid, up[1:])
    with pytest.raises(InputError, match="brushnet_cond"):
        brushnet(_frames_first(sample), TIMESTEP, text.repeat(FRAMES, 1, 1), cond[:, :4])
