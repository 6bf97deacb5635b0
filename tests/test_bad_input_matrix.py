"""The bad-input matrix (tests/README.md): every row gets a clear error naming the node (or stage), the input and
the values, or a documented fallback that is checked here. Rows already checked elsewhere are pointed at from the
README instead of being repeated.

Runs through the user-facing entry points: the node classes (standalone runtime, no ComfyUI), the pipeline's
``remove_objects`` and the CLI, on tiny random networks in the official layouts.
"""

from __future__ import annotations

import ast
import os
import pathlib
import random
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import nodes as pack
from diffueraser_core.errors import InputError, ModelFileError
from diffueraser_core.masks import LUMA_WEIGHTS
from diffueraser_core.pipeline import DiffuEraserModels, remove_objects
from diffueraser_core.prior_propainter import ProPainterNets
from nodes import folders, nodes_loaders
from test_nodes import ComfyLikeVae  # noqa: E402  (ComfyUI VAE call shape around the tiny VAE)
from test_faults import TrackingRuntime, build_tiny_nets, make_clip, run_pipeline, text_embedding

REPO = pathlib.Path(__file__).resolve().parents[1]
N = pack.NODE_CLASS_MAPPINGS
PRIOR, INJECTION, SAMPLER, BLEND = (
    "DiffuEraser ProPainter Prior", "DiffuEraser Prior Injection", "DiffuEraser Sampler", "DiffuEraser Blend")


class ForbiddenHandle:
    """A network that must not be touched (the row is answered before any network runs)."""

    name = "forbidden"

    def acquire(self, memory_required=0):
        raise AssertionError("a network was acquired")

    def release(self):
        raise AssertionError("a network was released")


FORBIDDEN_PRIOR = ProPainterNets(ForbiddenHandle(), ForbiddenHandle(), ForbiddenHandle())
FORBIDDEN_MODELS = DiffuEraserModels(unet=ForbiddenHandle(), brushnet=ForbiddenHandle())


@pytest.fixture(scope="module")
def nets():
    return build_tiny_nets()


@pytest.fixture(scope="module")
def node_models(nets):
    from diffueraser_core.runtime import StandaloneRuntime

    runtime = StandaloneRuntime(device="cpu")
    unet, brushnet, vae = nets
    return {
        "model": DiffuEraserModels(unet=runtime.wrap(unet, "unet_main"), brushnet=runtime.wrap(brushnet, "brushnet")),
        "vae": ComfyLikeVae(vae),
        "positive": [[text_embedding(), {}]],
    }


def clip_image(frames=3, h=64, w=64, seed=0):
    images = torch.rand(frames, h, w, 3, generator=torch.Generator().manual_seed(seed))
    mask = torch.zeros(1, h, w)
    mask[:, 16:40, 20:44] = 1.0
    return images, mask


def run_node(node, images, mask, models=None, **widgets):
    """Call a node with its reference widget values, ``widgets`` overriding them."""
    if node == PRIOR:
        args = dict(images=images, mask=mask, propainter_model=FORBIDDEN_PRIOR, resize_ratio=1.0, max_side=960,
                    mask_dilation=4, ref_stride=10, neighbor_length=10, subvideo_length=80, raft_iter=1)
        args.update(widgets)
        return N["DiffuEraserProPainterPrior"].execute(**args)
    if node == SAMPLER:
        models = models or {"model": FORBIDDEN_MODELS, "vae": None, "positive": None}
        latent = {"samples": torch.zeros(images.shape[0], 4, images.shape[1] // 8, images.shape[2] // 8)}
        args = dict(diffueraser_model=models["model"], vae=models["vae"], positive=models["positive"],
                    images=images, mask=mask, latent=latent, steps=1, cfg=0.0, window_length=22, window_overlap=5,
                    brushnet_scale=1.0, pre_inference=True, mask_dilation=8)
        args.update(widgets)
        return N["DiffuEraserSampler"].execute(**args)
    if node == BLEND:
        args = dict(images=images, generated=widgets.pop("generated", images), mask=mask, mask_dilation=8,
                    feather=21)
        args.update(widgets)
        return N["DiffuEraserBlend"].execute(**args)
    raise ValueError(node)


def u8(image):
    return (image * 255).round().to(torch.uint8)


# ------------------------------------------------------------------------------------------------------------
# Frames and masks: clear errors, named by the node, before any network runs

MASK_NODES = [PRIOR, SAMPLER, BLEND]


@pytest.mark.parametrize("node", MASK_NODES)
def test_mask_frame_count_that_differs_is_an_error(node):
    images, _ = clip_image(frames=3)
    with pytest.raises(InputError, match=rf"^{node}: mask has 2 frames but the video has 3; give one mask per "
                                         r"frame or a single mask"):
        run_node(node, images, torch.zeros(2, 64, 64))


def test_mask_frame_count_that_differs_is_an_error_in_the_pipeline():
    frames, masks = make_clip(3, 64, 64)
    with pytest.raises(InputError, match=r"^DiffuEraser: mask has 2 frames but the video has 3"):
        remove_objects(frames, masks[:2], propainter_nets=FORBIDDEN_PRIOR, runtime=TrackingRuntime(),
                       models=FORBIDDEN_MODELS, codec=object(), text_embeddings=text_embedding())


@pytest.mark.parametrize("node", MASK_NODES)
@pytest.mark.parametrize("value, pattern", [
    (1.5, r"mask has 4 values outside 0\.\.1 \(from 1\.5 to 1\.5\)"),
    (-0.25, r"mask has 4 values outside 0\.\.1 \(from -0\.25 to -0\.25\)"),
    (255.0, r"mask has 4 values outside 0\.\.1 \(from 255 to 255\)"),  # an 8-bit mask in a float MASK
])
def test_mask_values_outside_0_1_are_an_error(node, value, pattern):
    images, mask = clip_image()
    mask[0, :2, :2] = value
    with pytest.raises(InputError, match=rf"^{node}: {pattern}"):
        run_node(node, images, mask)


@pytest.mark.parametrize("node", MASK_NODES)
@pytest.mark.parametrize("where", ["image", "mask"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_nan_or_inf_in_the_input_is_an_error(node, where, bad):
    images, mask = clip_image()
    if where == "image":
        images[1, 5, 5, :] = bad
        pattern = r"image contains 3 NaN/inf values"
    else:
        mask[0, 5, 5] = bad
        pattern = r"mask contains 1 NaN/inf values"
    with pytest.raises(InputError, match=rf"^{node}: {pattern}"):
        run_node(node, images, mask)


def test_nan_in_the_latent_is_an_error(node_models):
    images, mask = clip_image()
    latent = {"samples": torch.zeros(3, 4, 8, 8)}
    latent["samples"][0, 0, 0, 0] = float("nan")
    with pytest.raises(InputError, match=rf"^{SAMPLER}: .*NaN"):
        run_node(SAMPLER, images, mask, node_models, latent=latent)


@pytest.mark.parametrize("latent, pattern", [
    ({"samples": torch.zeros(2, 4, 8, 8)}, r"the latent has 2 frames but the video has 3; inject the prior of this "
                                           r"same video"),
    ({"prior": torch.zeros(3, 4, 8, 8)}, r"expected a LATENT dict with 'samples', got dict"),
    ({"samples": torch.zeros(3, 16, 8, 8)}, r"latent 'samples' must be \[frames, 4, h, w\] \(SD1\.5 VAE\), got "
                                            r"\(3, 16, 8, 8\)"),
], ids=["other frame count", "no samples", "not an SD1.5 latent"])
def test_a_latent_that_does_not_fit_the_video_is_an_error(node_models, latent, pattern):
    images, mask = clip_image()
    with pytest.raises(InputError, match=rf"^{SAMPLER}: {pattern}"):
        run_node(SAMPLER, images, mask, node_models, latent=latent)


# ------------------------------------------------------------------------------------------------------------
# Frames and masks: documented fallbacks


def test_a_single_mask_broadcasts_to_every_frame():
    images, mask = clip_image(frames=4)
    (one,) = run_node(BLEND, images, mask, generated=torch.zeros_like(images))
    (every,) = run_node(BLEND, images, mask.expand(4, 64, 64).clone(), generated=torch.zeros_like(images))
    assert torch.equal(one, every)
    assert bool((one[:, 28, 32] == 0).all())  # every frame got the hole


def test_a_mask_of_another_size_is_resized_nearest():
    images, _ = clip_image()
    small = torch.zeros(1, 32, 32)
    small[:, 8:20, 10:22] = 1.0
    big = small.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)
    (from_small,) = run_node(BLEND, images, small, generated=torch.zeros_like(images))
    (from_big,) = run_node(BLEND, images, big, generated=torch.zeros_like(images))
    assert torch.equal(from_small, from_big)


def test_an_rgb_image_as_mask_uses_its_luma():
    images, _ = clip_image()
    rgb = torch.zeros(3, 64, 64, 3)
    rgb[:, 10:30, 10:30] = torch.tensor([1.0, 1.0, 1.0])  # white: a hole
    rgb[:, 40:60, 40:60] = torch.tensor([1.0, 0.0, 0.0])  # red: luma 0.299, not a hole
    luma = (rgb * torch.tensor(LUMA_WEIGHTS)).sum(-1)
    (from_rgb,) = run_node(BLEND, images, rgb, generated=torch.zeros_like(images))
    (from_luma,) = run_node(BLEND, images, luma, generated=torch.zeros_like(images))
    assert torch.equal(from_rgb, from_luma)
    assert bool((from_rgb[:, 20, 20] == 0).all()) and torch.equal(u8(from_rgb[:, 50, 50]), u8(images[:, 50, 50]))


@pytest.mark.parametrize("channels", [1, 4], ids=["grayscale", "rgba"])
def test_grayscale_and_rgba_images_are_used_as_rgb(channels):
    """Gray is used as RGB; RGBA is blended on its RGB and its alpha comes back unchanged (issue 11)."""
    images, mask = clip_image()
    if channels == 1:
        given_images, rgb = images[..., :1], images[..., :1].expand(-1, -1, -1, 3)
    else:
        alpha = torch.rand(3, 64, 64, 1)
        given_images, rgb = torch.cat([images, alpha], -1), images
    (out,) = run_node(BLEND, given_images, mask, generated=given_images)
    (expected,) = run_node(BLEND, rgb.contiguous(), mask, generated=rgb.contiguous())
    assert out.shape == (3, 64, 64, 3 if channels == 1 else 4)
    assert torch.equal(out[..., :3], expected)
    if channels == 4:
        assert torch.equal(out[..., 3:], alpha)


def test_an_empty_mask_returns_the_input_at_once():
    frames, masks = make_clip(3, 64, 64)
    out = remove_objects(frames, torch.zeros_like(masks), propainter_nets=FORBIDDEN_PRIOR, runtime=TrackingRuntime(),
                         models=FORBIDDEN_MODELS, codec=object(), text_embeddings=text_embedding())
    assert torch.equal(out, frames)
    images, mask = clip_image()
    prior, dilated = run_node(PRIOR, images, torch.zeros_like(mask))  # networks are ForbiddenHandles
    assert torch.equal(u8(prior), u8(images)) and not bool(dilated.any())
    (blended,) = run_node(BLEND, images, torch.zeros_like(mask), generated=torch.zeros_like(images))
    assert torch.equal(u8(blended), u8(images))


@pytest.mark.parametrize("hw", [(40, 80), (64, 63)])
def test_frames_smaller_than_64_pixels_are_an_error(hw):
    frames = torch.zeros(2, *hw, 3, dtype=torch.uint8)
    masks = torch.ones(2, *hw, dtype=torch.bool)
    with pytest.raises(InputError, match=rf"^DiffuEraser: frames of {hw[1]}x{hw[0]} are too small; each side needs "
                                         r"at least 64 pixels"):
        remove_objects(frames, masks, propainter_nets=FORBIDDEN_PRIOR, runtime=TrackingRuntime(),
                       models=FORBIDDEN_MODELS, codec=object(), text_embeddings=text_embedding())
    images = torch.rand(2, *hw, 3)
    with pytest.raises(InputError, match=r"^(DiffuEraser ProPainter Prior|ProPainter prior): .*working size"):
        run_node(PRIOR, images, torch.ones(1, *hw))


def test_frames_larger_than_4096_pixels_are_an_error():
    frames = torch.zeros(1, 64, 4100, 3, dtype=torch.uint8)
    masks = torch.ones(1, 64, 4100, dtype=torch.bool)
    with pytest.raises(InputError, match=r"^DiffuEraser: frames of 4100x64 are too large; sides must be at most "
                                         r"4096 pixels"):
        remove_objects(frames, masks, propainter_nets=FORBIDDEN_PRIOR, runtime=TrackingRuntime(),
                       models=FORBIDDEN_MODELS, codec=object(), text_embeddings=text_embedding())
    with pytest.raises(InputError, match=rf"^{INJECTION}: frames of 4100x64 are too large"):
        N["DiffuEraserPriorInjection"].execute(None, torch.zeros(1, 64, 4100, 3), 0, "forward_noise", 1.0, 960, 1)


# ------------------------------------------------------------------------------------------------------------
# Sizes and lengths through the whole pipeline (tiny networks, stand-in prior)


@pytest.mark.parametrize("count, hw", [(1, (64, 64)), (2, (64, 64)), (3, (67, 75))], ids=["1-frame", "2-frame", "odd"])
def test_short_videos_and_odd_sizes_keep_every_frame_and_their_size(nets, count, hw):
    frames, masks = make_clip(count, *hw, seed=count)
    out = run_pipeline(nets, frames, masks, TrackingRuntime(), feather=3)
    assert out.shape == frames.shape and out.dtype == torch.uint8
    far = torch.ones(hw, dtype=torch.bool)
    far[hw[0] // 4 - 8 :, hw[1] // 4 - 8 :] = False  # top/left band well away from every mask
    assert torch.equal(out[:, far], frames[:, far])
    assert not torch.equal(out[masks], frames[masks])


def test_a_mask_covering_the_whole_frame_generates_every_pixel(nets):
    frames, _ = make_clip(2, 64, 64)
    out = run_pipeline(nets, frames, torch.ones(2, 64, 64, dtype=torch.bool), TrackingRuntime())
    assert out.shape == frames.shape
    assert (out != frames).any(-1).float().mean() > 0.5  # generated content, not the input passed through


def test_a_mask_covering_the_whole_frame_with_the_real_propainter_networks():
    # The official networks (random weights): flow completion with no known flow, propagation with no known pixel.
    from diffueraser_core.models.flow_completion import RecurrentFlowCompleteNet
    from diffueraser_core.models.propainter import InpaintGenerator
    from diffueraser_core.models.raft import RAFT
    from diffueraser_core.prior_propainter import ProPainterSettings, run_propainter_prior

    runtime = TrackingRuntime()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        nets = ProPainterNets(runtime.wrap(RAFT(), "raft"), runtime.wrap(RecurrentFlowCompleteNet(), "fc"),
                              runtime.wrap(InpaintGenerator(init_weights=True), "generator"))
    frames, _ = make_clip(2, 64, 64)
    result = run_propainter_prior(frames, torch.ones(1, 64, 64, dtype=torch.bool), nets,
                                  ProPainterSettings(resize_ratio=1.0, raft_iter=1), runtime)
    assert result.frames.shape == frames.shape and bool(result.masks.all())
    assert (result.frames != frames).any(-1).float().mean() > 0.5
    assert runtime.held() == []


# ------------------------------------------------------------------------------------------------------------
# Wrong model files in each loader slot


class _RunsShellOnLoad:
    """Unpickling this would run a shell command; every loader must refuse it without running it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


SLOTS = ["unet_main", "brushnet", "pcm_lora", "raft", "flow_completion", "propainter"]
BAD_KINDS = ["other network", "sd15 checkpoint", "sdxl lora", "random .safetensors", "random .pth", "truncated",
             "pickle with code"]
# random.Random(seed).randbytes: seed 2 makes torch's unpickler raise IndexError, which must still read as corrupt
RANDOM_PTH_SEED = 2


def _sd15_checkpoint_tensors():
    return {
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
        "first_stage_model.encoder.conv_in.weight": torch.zeros(8, 3, 3, 3),
        "first_stage_model.decoder.conv_out.weight": torch.zeros(3, 8, 3, 3),
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(16, 8),
    }


def _sdxl_lora_tensors():
    stem = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"
    return {f"{stem}.lora_down.weight": torch.zeros(4, 2048), f"{stem}.lora_up.weight": torch.zeros(640, 4),
            f"{stem}.alpha": torch.tensor(4.0)}


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    """Valid tiny files for every slot but ProPainter.pth (full size only), and the bad files for each slot."""
    from diffueraser_core.models.flow_completion import RecurrentFlowCompleteNet
    from diffueraser_core.models.raft import RAFT
    from diffueraser_core.random_weights import make_models_folder

    root = tmp_path_factory.mktemp("matrix_models")
    paths = make_models_folder(str(root), propainter=False)
    prop = root / "propainter"
    prop.mkdir()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        torch.save({"module." + k: v for k, v in RAFT().state_dict().items()}, prop / "raft-things.pth")
        torch.save(RecurrentFlowCompleteNet().state_dict(), prop / "recurrent_flow_completion.pth")
    # The loader resolves all three names first; ProPainter.pth (full size only) is never read in these tests.
    (prop / "ProPainter.pth").write_bytes(b"placeholder")
    unet_file = os.path.join(paths["unet_main"], "diffusion_pytorch_model.safetensors")
    valid_file = {"unet_main": unet_file,
                  "brushnet": os.path.join(paths["brushnet"], "diffusion_pytorch_model.safetensors"),
                  "pcm_lora": paths["pcm_lora"], "raft": str(prop / "raft-things.pth"),
                  "flow_completion": str(prop / "recurrent_flow_completion.pth"),
                  "propainter": str(prop / "recurrent_flow_completion.pth")}  # any valid torch file to cut
    other_network = {"unet_main": paths["brushnet"], "brushnet": paths["unet_main"], "pcm_lora": unet_file,
                     "raft": str(prop / "recurrent_flow_completion.pth"),
                     "flow_completion": str(prop / "raft-things.pth"), "propainter": str(prop / "raft-things.pth")}
    bad = {}
    for slot in SLOTS:
        folder = (root / "diffueraser" if slot in ("unet_main", "brushnet", "pcm_lora") else prop) / f"bad_{slot}"
        folder.mkdir()
        entries = {}
        # ComfyUI lists every weight file; the slot's loader decides by content, whatever the name says
        source = other_network[slot]
        if os.path.isdir(source):
            source = os.path.join(source, "diffusion_pytorch_model.safetensors")
        target = folder / ("other_network" + os.path.splitext(source)[1])
        os.link(source, target)
        entries["other network"] = target
        save_file(_sd15_checkpoint_tensors(), str(folder / "sd15_checkpoint.safetensors"))
        entries["sd15 checkpoint"] = folder / "sd15_checkpoint.safetensors"
        save_file(_sdxl_lora_tensors(), str(folder / "sdxl_lora.safetensors"))
        entries["sdxl lora"] = folder / "sdxl_lora.safetensors"
        (folder / "random.safetensors").write_bytes(random.Random(0).randbytes(4096))
        entries["random .safetensors"] = folder / "random.safetensors"
        (folder / "random.pth").write_bytes(random.Random(RANDOM_PTH_SEED).randbytes(4096))
        entries["random .pth"] = folder / "random.pth"
        data = pathlib.Path(valid_file[slot]).read_bytes()
        truncated = folder / ("truncated" + os.path.splitext(valid_file[slot])[1])
        truncated.write_bytes(data[: len(data) // 2])
        entries["truncated"] = truncated
        marker = root / f"pwned_{slot}"
        torch.save({"weight": torch.zeros(2), "payload": _RunsShellOnLoad(marker)}, folder / "pickle_with_code.pth")
        entries["pickle with code"] = folder / "pickle_with_code.pth"
        bad[slot] = {kind: path.relative_to(folder.parent).as_posix() for kind, path in entries.items()}
        bad[slot]["marker"] = marker
    mp = pytest.MonkeyPatch()
    mp.setenv(folders.MODELS_DIR_ENV, str(root))
    mp.delenv(folders.ALLOW_DOWNLOAD_ENV, raising=False)
    nodes_loaders.clear_cache()
    yield {"root": root, "bad": bad}
    mp.undo()
    nodes_loaders.clear_cache()


VALID_NAMES = {"unet_main": "diffuEraser/unet_main", "brushnet": "diffuEraser/brushnet",
               "pcm_lora": "pcm_sd15_smallcfg_2step_converted.safetensors", "raft": "raft-things.pth",
               "flow_completion": "recurrent_flow_completion.pth", "propainter": "ProPainter.pth"}


def _load_with(slot, name):
    names = dict(VALID_NAMES, **{slot: name})
    if slot in ("unet_main", "brushnet", "pcm_lora"):
        return N["DiffuEraserModelLoader"].execute(names["unet_main"], names["brushnet"], names["pcm_lora"], 1.0)
    return N["DiffuEraserProPainterLoader"].execute(names["raft"], names["flow_completion"], names["propainter"])


# Each kind of bad file: what the message must say about it (besides the file's name).
KIND_PATTERNS = {
    "other network": r"is |expected|missing keys|unexpected keys|not a LoRA",
    "sd15 checkpoint": r"SD1\.5 checkpoint|missing keys|unexpected keys|not a LoRA",
    "sdxl lora": r"SDXL LoRA|missing keys|unexpected keys",
    "random .safetensors": r"could not be read|not a safetensors|truncated or corrupt",
    "random .pth": r"not a readable PyTorch checkpoint \(truncated or corrupt\?\)",
    "truncated": r"truncated",
    "pickle with code": r"refused for safety",
}


@pytest.mark.parametrize("kind", BAD_KINDS)
@pytest.mark.parametrize("slot", SLOTS)
def test_a_wrong_model_file_in_each_loader_slot_is_a_clear_error(models_dir, slot, kind):
    name = models_dir["bad"][slot][kind]
    with pytest.raises(ModelFileError) as info:
        _load_with(slot, name)
    message = str(info.value)
    assert os.path.basename(name) in message, f"{slot}/{kind}: the message does not name the file: {message}"
    assert re.search(KIND_PATTERNS[kind], message), f"{slot}/{kind}: unclear message: {message}"
    assert not models_dir["bad"][slot]["marker"].exists(), "code from a model file was executed"


def test_the_valid_files_load(models_dir):
    (model,) = _load_with("pcm_lora", VALID_NAMES["pcm_lora"])
    assert type(model.unet.module).__name__ == "DiffuEraserUNet"


def test_missing_model_folders_name_the_node_the_file_and_where_it_was_looked_for(tmp_path, monkeypatch):
    monkeypatch.setenv(folders.MODELS_DIR_ENV, str(tmp_path / "no_such_models"))
    monkeypatch.delenv(folders.ALLOW_DOWNLOAD_ENV, raising=False)
    nodes_loaders.clear_cache()
    for cls in ("DiffuEraserModelLoader", "DiffuEraserProPainterLoader"):
        spec = N[cls].INPUT_TYPES()["required"]  # the node still shows, with empty lists
        assert all(isinstance(decl[0], (list, str)) for decl in spec.values())
    with pytest.raises(ModelFileError, match=r"^DiffuEraser Model Loader: model 'diffuEraser/unet_main' not found "
                                             r"in \[.*no_such_models.*diffueraser'\] \(published at https://"):
        _load_with("unet_main", VALID_NAMES["unet_main"])
    with pytest.raises(ModelFileError, match=r"^DiffuEraser ProPainter Loader: model 'raft-things.pth' not found "
                                             r"in \[.*no_such_models.*propainter'\] \(published at https://"):
        _load_with("raft", VALID_NAMES["raft"])


def test_cli_names_a_missing_models_folder_and_missing_files(tmp_path, capsys):
    from diffueraser_core import cli
    from diffueraser_core.media_out import write_video

    frames, masks = make_clip(2, 64, 64)
    video = write_video(tmp_path / "in", frames)
    mask = write_video(tmp_path / "mask.png", (masks[:1, ..., None] * 255).to(torch.uint8).expand(1, 64, 64, 3))
    args = [str(video), str(mask), str(tmp_path / "out.mp4"), "--device", "cpu"]
    assert cli.main(args + ["--models", str(tmp_path / "nowhere")]) == 1
    assert "nowhere' does not exist" in capsys.readouterr().err
    (tmp_path / "models").mkdir()
    assert cli.main(args + ["--models", str(tmp_path / "models")]) == 1
    err = capsys.readouterr().err
    assert "model file(s) missing" in err and "propainter/raft-things.pth" in err
    assert not (tmp_path / "out.mp4").exists()


# ------------------------------------------------------------------------------------------------------------
# Safety


def _python_files():
    for folder in ("diffueraser_core", "nodes"):
        yield from sorted((REPO / folder).rglob("*.py"))
    yield REPO / "__init__.py"


def test_model_files_are_only_read_as_safetensors_or_weights_only_torch_files():
    problems = []
    for path in _python_files():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            where = f"{path.relative_to(REPO)}:{node.lineno}"
            if name.endswith("torch.load"):
                flag = next((k.value for k in node.keywords if k.arg == "weights_only"), None)
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    problems.append(f"{where}: {name}(...) without weights_only=True")
            if name in ("pickle.load", "pickle.loads", "pickle.Unpickler", "dill.load", "eval", "exec",
                        "marshal.loads"):
                problems.append(f"{where}: {name}(...)")
            for keyword in node.keywords:
                if keyword.arg == "trust_remote_code":
                    problems.append(f"{where}: trust_remote_code")
    assert problems == []


NAME_PARTS = st.sampled_from(["..", ".", "", "diffuEraser", "unet_main", "x.safetensors", "~", "/", "\\", "C:",
                              "..\\..", "%2e%2e", "etc", "passwd", "\x00", " ", "brushnet"])


@settings(max_examples=150, deadline=None)
@given(st.lists(NAME_PARTS, min_size=1, max_size=6), st.sampled_from(["", "/", "\\"]),
       st.sampled_from(["diffueraser", "propainter"]))
def test_model_names_from_widgets_never_escape_the_models_folders(parts, lead, kind):
    root = REPO / "tests" / "reference"  # any existing folder; nothing is created
    name = lead + "/".join(parts)
    try:
        path = folders.resolve(kind, name, "Test Node", str(root))
    except ModelFileError:
        return
    folder = os.path.normpath(os.path.join(str(root), kind))
    assert os.path.commonpath([folder, os.path.normpath(path)]) == folder, (name, path)


# ------------------------------------------------------------------------------------------------------------
# Out-of-range widget values (an old workflow, or a value typed past the widget's range)

WIDGET_ERRORS = [
    (SAMPLER, {"steps": 0}, r"steps must be an integer in 1\.\.50, got 0"),
    (SAMPLER, {"steps": 51}, r"steps must be an integer in 1\.\.50, got 51"),
    (SAMPLER, {"window_length": 0, "window_overlap": 0}, r"window_overlap 0 must be smaller than window_length 0"),
    (SAMPLER, {"window_overlap": 22}, r"window_overlap 22 must be smaller than window_length 22"),
    (SAMPLER, {"window_overlap": -1}, r"overlap must be an integer in 0\.\.21 \(window length 22\), got -1"),
    (SAMPLER, {"mask_dilation": -1}, r"mask_dilation must be an integer >= 0, got -1"),
    (SAMPLER, {"cfg": -1.0}, r"guidance_scale must be >= 0, got -1\.0"),
    (BLEND, {"feather": 20}, r"feather must be an odd integer >= 1 \(1 = hard edge\), got 20"),
    (BLEND, {"feather": 0}, r"feather must be an odd integer >= 1 \(1 = hard edge\), got 0"),
    (BLEND, {"mask_dilation": -1}, r"mask dilation must be a non-negative integer, got -1"),
    (PRIOR, {"resize_ratio": 0.0}, r"resize_ratio must be in \(0, 4\], got 0\.0"),
    (PRIOR, {"max_side": 10}, r"max_side must be >= 64, got 10"),
    (PRIOR, {"mask_dilation": -1}, r"mask_dilation must be >= 0, got -1"),
    (PRIOR, {"ref_stride": 0}, r"ref_stride must be >= 1, got 0"),
    (PRIOR, {"neighbor_length": 1}, r"neighbor_length must be >= 2, got 1"),
    (PRIOR, {"subvideo_length": 1}, r"subvideo_length must be >= 2, got 1"),
    (PRIOR, {"raft_iter": 0}, r"raft_iter must be >= 1, got 0"),
    (INJECTION, {"strength": 0.0}, r"strength must be in 0\.02\.\.1 for 1 step\(s\), got 0\.0"),
    (INJECTION, {"strength": 1.5}, r"strength must be in 0\.02\.\.1 for 1 step\(s\), got 1\.5"),
    (INJECTION, {"max_side": 100}, r"max side must be an integer in 256\.\.1920, got 100"),
    (INJECTION, {"max_side": 4000}, r"max side must be an integer in 256\.\.1920, got 4000"),
    (INJECTION, {"seed": -1}, r"seed must be an integer >= 0, got -1"),
    (INJECTION, {"mode": "bogus"}, r"mode must be one of forward_noise, ddim_inversion, got 'bogus'"),
    (INJECTION, {"inversion_steps": 0}, r"steps must be an integer in 1\.\.50, got 0"),
]
# The stages' own names are accepted as the message's first words (the node calls the stage with the values).
STAGE_NAMES = {PRIOR: "ProPainter prior", SAMPLER: "Frame windows"}


def _injection(images, vae, **widgets):
    args = dict(vae=vae, prior=images, seed=0, mode="forward_noise", strength=1.0, max_side=960, inversion_steps=1)
    args.update(widgets)
    return N["DiffuEraserPriorInjection"].execute(**args)


WIDGET_IDS = [f"{n.split()[-1]}-{'-'.join(f'{k}={v}' for k, v in w.items())}" for n, w, _ in WIDGET_ERRORS]


@pytest.mark.parametrize("node, widgets, pattern", WIDGET_ERRORS, ids=WIDGET_IDS)
def test_out_of_range_widget_values_are_clear_errors(node_models, node, widgets, pattern):
    images, mask = clip_image()
    names = "|".join(filter(None, [node, STAGE_NAMES.get(node)]))
    with pytest.raises(InputError, match=rf"^({names}): {pattern}"):
        if node == INJECTION:
            _injection(images, node_models["vae"], **widgets)
        else:
            run_node(node, images, mask, node_models, **widgets)


def test_window_length_beyond_the_motion_modules_limit_is_a_clear_error(node_models):
    images, mask = clip_image()
    with pytest.raises(InputError, match=rf"^{SAMPLER}: window_length .*32.*got 40"):
        run_node(SAMPLER, images, mask, node_models, window_length=40)


def test_values_past_the_widget_range_that_the_math_accepts_are_used(node_models):
    # Documented fallback: ComfyUI's own validation refuses them in the UI; through the API they are used as given.
    images, mask = clip_image()
    (blended,) = run_node(BLEND, images, mask, generated=torch.zeros_like(images), feather=301, mask_dilation=70)
    assert blended.shape == images.shape and bool((blended[:, 28, 32] == 0).all())
    (latent,) = run_node(SAMPLER, images, mask, node_models, brushnet_scale=2.5, mask_dilation=70, window_length=3,
                         window_overlap=0)
    assert latent["samples"].shape == (3, 4, 8, 8) and bool(torch.isfinite(latent["samples"]).all())
