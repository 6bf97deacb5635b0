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

# Output of the reference classes (lixiaowen-xw/DiffuEraser libs/brushnet_CA.py + libs/unet_motion_model.py), run
# once offline in float64 on the weights of build_unet_main(seed=0, std=0.1) / build_brushnet(seed=1, std=0.1) and
# the inputs of _inputs(): sum, sum of absolute values, and every 97th element of the [1, 4, 4, 16, 16] output.
# std 0.1 rather than 0.05: with 0.05 the random decoder attenuates the deep path so much that e.g. stock diffusers'
# mid-block order changes the output by only 5e-7 relative; with 0.1 by 2e-3. The weights come from torch's seeded
# CPU normal_; should a torch release ever change that stream, re-record these numbers.
REFERENCE_STD = 0.1
REFERENCE_OUTPUT_SUM = 399.5104890924491
REFERENCE_OUTPUT_ABS_SUM = 470.2345562526192
REFERENCE_OUTPUT_SAMPLES = [
    -0.022023363, 0.185230931, 0.144292831, 0.058931623, 0.006370032, 0.163695552, 0.00078405, 0.080447084,
    0.008430511, -0.002879773, -0.042105083, -0.072337639, -0.144871532, 0.035382688, 0.008401811, 0.029307746,
    0.042549038, -0.008350596, -0.029979841, 0.058984524, 0.04431719, 0.112674508, 0.091437436, 0.228138263,
    0.203164718, 0.122365591, 0.145165655, 0.29201236, 0.241659758, 0.201264483, 0.169694903, 0.232754132,
    0.139664438, 0.130996293, 0.074014174, 0.152746302, 0.086447147, 0.1450166, 0.078458376, 0.27947571,
    0.105014234, 0.066402397, 0.027652821,
]
# The reference's UpBlockMotion builds its motion modules with 32 norm groups whatever norm_num_groups says (stock
# diffusers uses norm_num_groups). Identical for the released weights (32 everywhere); the tiny config (8 groups)
# needs this to reproduce the reference numbers.
REFERENCE_UP_MOTION_NORM_GROUPS = 32


def _manifest_without_meta(config):
    return {k: v for k, v in config.items() if not k.startswith("_")}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny tensors: per-op thread synchronisation costs more than it saves on a shared CPU. Restored afterwards.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def nets(_one_thread):
    return diffusion.build_unet_main(seed=0), diffusion.build_brushnet(seed=1)


@pytest.fixture(scope="module")
def clip(nets):
    """The standard clip through BrushNet then the UNet: (inputs, output, taps)."""
    unet, brushnet = nets
    inputs = _inputs()
    out, taps = _run(unet, brushnet, *inputs)
    return inputs, out, taps


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
    # unet_main's file carries every key of the official config.json (official values where the tiny config has
    # none: the official pipeline reads some the class ignores, e.g. time_cond_proj_dim)
    official_unet = {k: v for k, v in configs.UNET_MAIN_CONFIG.items() if not k.startswith("_")}
    unet_file_config = {**official_unet, **configs.TINY_UNET_MAIN_CONFIG}
    assert "time_cond_proj_dim" in unet_file_config and set(official_unet) <= set(unet_file_config)
    for folder, config in ((unet_dir, unet_file_config), (brush_dir, configs.TINY_BRUSHNET_CONFIG)):
        assert sorted(p.name for p in folder.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
        assert json.loads((folder / "config.json").read_text()) == config  # _class_name included
    assert configs.TINY_UNET_MAIN_CONFIG["_class_name"] == "UNetMotionModel"
    assert configs.TINY_BRUSHNET_CONFIG["_class_name"] == "BrushNetModel"

    stored = read_state_dict(str(brush_dir / "diffusion_pytorch_model.safetensors"))
    assert stored["brushnet_up_blocks.14.weight"].abs().sum() > 0  # taps are live, not zero-initialised

    loaded_unet, loaded_brushnet = load_unet_main(str(unet_dir)), load_brushnet(str(brush_dir))
    assert isinstance(loaded_unet, DiffuEraserUNet) and isinstance(loaded_brushnet, BrushNetModel)
    for original, loaded in ((unet, loaded_unet), (brushnet, loaded_brushnet)):
        ref_sd, new_sd = original.state_dict(), loaded.state_dict()
        assert ref_sd.keys() == new_sd.keys()
        assert all(torch.equal(ref_sd[k], new_sd[k]) for k in ref_sd)


def test_fp16_folder_keeps_dtype(tmp_path):
    folder = diffusion.save_brushnet_folder(tmp_path / "brushnet16", dtype=torch.float16)
    stored = read_state_dict(str(folder / "diffusion_pytorch_model.safetensors"))
    assert {t.dtype for t in stored.values()} == {torch.float16}


# ---------------------------------------------------------------- forward behaviour


def test_brushnet_to_unet_clip(nets, clip):
    unet, brushnet = nets
    inputs, out, (down, mid, up) = clip
    again, _ = _run(unet, brushnet, *inputs)
    assert out.shape == (1, 4, FRAMES, LATENT, LATENT)
    assert torch.isfinite(out).all() and out.abs().mean() > 1e-3
    assert torch.equal(out, again)
    assert len(down) == N_DOWN and len(up) == N_UP
    # Tap resolutions in execution order (h, h, h, h/2 ... down the encoder, back up the decoder).
    assert [t.shape[-1] for t in down] == [16, 16, 16, 8, 8, 8, 4, 4, 4, 2, 2, 2]
    assert [t.shape[1] for t in down] == [32] * 7 + [64] * 5
    assert mid.shape == (FRAMES, 64, 2, 2)
    assert [t.shape[-1] for t in up] == [2, 2, 2, 4, 4, 4, 4, 8, 8, 8, 8, 16, 16, 16, 16]
    assert [t.shape[1] for t in up] == [64] * 8 + [32] * 7


def test_matches_reference_implementation_numbers():
    unet = diffusion.build_unet_main(seed=0, std=REFERENCE_STD, dtype=torch.float64)
    brushnet = diffusion.build_brushnet(seed=1, std=REFERENCE_STD, dtype=torch.float64)
    for block in unet.up_blocks:
        if not hasattr(block, "attentions"):  # UpBlockMotion
            for motion_module in block.motion_modules:
                motion_module.norm.num_groups = REFERENCE_UP_MOTION_NORM_GROUPS
    out, _ = _run(unet, brushnet, *(t.double() for t in _inputs()))
    assert out.sum().item() == pytest.approx(REFERENCE_OUTPUT_SUM, abs=1e-7)
    assert out.abs().sum().item() == pytest.approx(REFERENCE_OUTPUT_ABS_SUM, abs=1e-7)
    assert out.flatten()[::97].tolist() == pytest.approx(REFERENCE_OUTPUT_SAMPLES, abs=1e-8)


def test_every_brushnet_tap_changes_the_output(nets, clip):
    unet, _ = nets
    (sample, _, text), _, (down, mid, up) = clip
    slots = [("down", i) for i in range(N_DOWN)] + [("mid", 0)] + [("up", i) for i in range(N_UP)]
    assert len(slots) == 28
    # One batched UNet call. Clip 0 gets the taps as they are (the control); clip k+1 gets slot k amplified, since
    # random weights attenuate the deepest taps (zeroing the mid tap moves the output by ~1e-6 relative). Clips in
    # one batch compute identically (unamplified copies match the control bit for bit), so 1e-5 is far above noise;
    # the weakest tap (mid) moves the output by ~6e-5.
    boost = 100.0
    n = len(slots) + 1

    def batched(tensor, slot):
        per_clip = tensor.unsqueeze(0).repeat(n, 1, 1, 1, 1)
        per_clip[slots.index(slot) + 1] *= boost
        return per_clip.reshape(n * FRAMES, *tensor.shape[1:])

    down_b = [batched(t, ("down", i)) for i, t in enumerate(down)]
    mid_b = batched(mid, ("mid", 0))
    up_b = [batched(t, ("up", i)) for i, t in enumerate(up)]
    with torch.no_grad():
        out = unet(sample.repeat(n, 1, 1, 1, 1), TIMESTEP, text.repeat(n, 1, 1), down_b, mid_b, up_b)
    control = out[:1]
    effect = (out[1:] - control).abs().flatten(1).mean(1) / control.abs().mean()
    weak = [(slot, float(e)) for slot, e in zip(slots, effect) if e < 1e-5]
    assert not weak, f"taps without measurable effect: {weak}"


def test_zero_conditioning_scale_equals_no_residuals(nets, clip):
    unet, brushnet = nets
    (sample, cond, text), full_out, (full_down, full_mid, full_up) = clip
    zero_out, (down, mid, up) = _run(unet, brushnet, sample, cond, text, scale=0.0)
    assert all(t.abs().max() == 0 for t in [*down, mid, *up])
    with torch.no_grad():
        plain = unet(sample, TIMESTEP, text)
    assert torch.equal(zero_out, plain)
    assert (full_out - plain).abs().mean() > 1e-3 * full_out.abs().mean()
    with torch.no_grad():
        half_down, half_mid, half_up = brushnet(_frames_first(sample), TIMESTEP, text.repeat(FRAMES, 1, 1), cond, 0.5)
    for half, full in zip([*half_down, half_mid, *half_up], [*full_down, full_mid, *full_up]):
        assert torch.allclose(half * 2, full, atol=1e-6)


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


def test_motion_modules_mix_frames_brushnet_does_not(nets, clip):
    unet, brushnet = nets
    (sample, cond, text), out, taps = clip
    changed = sample.clone()
    changed[:, :, 0] += 1.0
    changed_cond = cond.clone()
    changed_cond[0] += 1.0
    out2, taps2 = _run(unet, brushnet, changed, changed_cond, text)
    # UNet: frame 0's change reaches frame 3 through the motion modules (attention over the frame axis).
    assert (out2[:, :, 3] - out[:, :, 3]).abs().mean() > 1e-4 * out.abs().mean()
    # BrushNet: frames 1..3 of every tap are untouched, frame 0's are not.
    for before, after in zip([*taps[0], taps[1], *taps[2]], [*taps2[0], taps2[1], *taps2[2]]):
        assert torch.allclose(before[1:], after[1:], atol=1e-6)
        assert not torch.allclose(before[0], after[0], atol=1e-4)


def test_clips_in_a_batch_are_independent(nets, clip):
    """Two clips in one call (time and text embeddings repeated per clip) give each clip's own result."""
    unet, brushnet = nets
    (sample, cond, text), out, _ = clip
    other_sample, other_cond, other_text = _inputs(seed=5)
    both, _ = _run(unet, brushnet, torch.cat([sample, other_sample]), torch.cat([cond, other_cond]),
                   torch.cat([text, other_text]))
    assert torch.allclose(both[:1], out, atol=1e-6)
    assert not torch.allclose(both[1:], out, atol=1e-3)


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
def test_low_precision_weights_run(dtype, clip):
    _, reference, _ = clip
    unet = diffusion.build_unet_main(seed=0, dtype=dtype)
    brushnet = diffusion.build_brushnet(seed=1, dtype=dtype)
    out, (down, _, _) = _run(unet, brushnet, *_inputs())
    assert out.dtype == dtype and down[0].dtype == dtype
    assert torch.isfinite(out).all()
    # Same weights rounded: close to the float32 result (bf16 keeps 8 mantissa bits, fp16 11).
    assert (out.float() - reference).abs().mean() < 0.1 * reference.abs().mean()


def test_one_prompt_embedding_serves_every_frame(nets, clip):
    _, brushnet = nets
    (sample, cond, text), _, (down, mid, up) = clip
    with torch.no_grad():
        down1, mid1, up1 = brushnet(_frames_first(sample), TIMESTEP, text, cond)  # [1, L, D] for 4 frames
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip([*down, mid, *up], [*down1, mid1, *up1]))


def test_bad_inputs_are_refused(nets, clip):
    unet, brushnet = nets
    (sample, cond, text), _, (down, mid, up) = clip
    with pytest.raises(InputError, match="11 down residuals"):
        unet(sample, TIMESTEP, text, down[:-1], mid, up)
    with pytest.raises(InputError, match="14 up residuals"):
        unet(sample, TIMESTEP, text, down, mid, up[1:])
    with pytest.raises(InputError, match="brushnet_cond"):
        brushnet(_frames_first(sample), TIMESTEP, text.repeat(FRAMES, 1, 1), cond[:, :4])
    with pytest.raises(InputError, match=r"encoder_hidden_states must be \[1 or 1, tokens, dim\], got shape \(3,"):
        unet(sample, TIMESTEP, text.repeat(3, 1, 1))
    with pytest.raises(InputError, match="a clip of 33 frames exceeds the motion modules' 32 positions"):
        unet(torch.zeros(1, 4, 33, 8, 8), TIMESTEP, text)
    with pytest.raises(InputError, match=r"sample must be \[B, C, F, h, w\]"):
        unet(sample[0], TIMESTEP, text)
