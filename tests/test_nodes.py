"""Node declarations are well formed, and the nodes run end to end (standalone runtime) on tiny random models
written in the official layouts."""

import dataclasses
import os

import pytest
import torch

import nodes as pack
from nodes.comfy_io import io
from diffueraser_core.errors import InputError, ModelFileError
from nodes import folders, nodes_loaders
from nodes.nodes_prior import PROPAINTER_DEFAULTS

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}
CUSTOM_TYPES = {"DIFFUERASER_MODEL", "PROPAINTER_MODEL", "DIFFUERASER_MASK"}
MASK_SOCKET = "MASK,DIFFUERASER_MASK"  # the mask input of the Prior, Sampler and Blend: prepared or plain
CORE_SOCKET_TYPES = {"IMAGE", "MASK", "LATENT", "VAE", "CONDITIONING"}


# ---------------------------------------------------------------- declarations

def test_mappings_ids_and_display_names():
    assert set(pack.NODE_CLASS_MAPPINGS) == set(pack.NODE_DISPLAY_NAME_MAPPINGS)
    assert set(pack.NODE_CLASS_MAPPINGS) == {
        "DiffuEraserModelLoader", "DiffuEraserProPainterLoader", "DiffuEraserProPainterPrior",
        "DiffuEraserPriorInjection", "DiffuEraserSampler", "DiffuEraserBlend", "DiffuEraserPrepareMask",
    }
    for node_id, name in pack.NODE_DISPLAY_NAME_MAPPINGS.items():
        assert node_id.startswith("DiffuEraser") and name != node_id and " " in name


@pytest.mark.parametrize("node_id", sorted(pack.NODE_CLASS_MAPPINGS))
def test_declaration_well_formed(node_id):
    cls = pack.NODE_CLASS_MAPPINGS[node_id]
    spec = cls.INPUT_TYPES()
    assert set(spec) <= {"required", "optional", "hidden"}
    assert cls.CATEGORY.startswith("DiffuEraser/")
    assert isinstance(cls.DESCRIPTION, str) and len(cls.DESCRIPTION) > 30
    assert callable(cls.execute) and issubclass(cls, io.ComfyNode)
    assert cls.define_schema().node_id == node_id
    assert isinstance(cls.RETURN_TYPES, list) and cls.RETURN_TYPES
    assert len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES) == len(cls.OUTPUT_TOOLTIPS)
    for rt in cls.RETURN_TYPES:
        assert rt in CORE_SOCKET_TYPES | CUSTOM_TYPES
    for section in ("required", "optional"):
        for name, decl in spec.get(section, {}).items():
            typ, opts = decl[0], decl[1]
            assert isinstance(opts.get("tooltip"), str) and opts["tooltip"], (node_id, name)
            if typ == "COMBO":
                assert all(isinstance(v, str) for v in opts["options"])
                assert "enable" not in opts["options"] and "disable" not in opts["options"]  # booleans: BOOLEAN
            elif typ in ("INT", "FLOAT"):
                assert opts["min"] <= opts["default"] <= opts["max"], (node_id, name)
                assert "step" in opts
            elif typ == "BOOLEAN":
                assert isinstance(opts["default"], bool)
            else:
                assert typ in CORE_SOCKET_TYPES | CUSTOM_TYPES | {MASK_SOCKET}, (node_id, name, typ)
    # execute accepts exactly the declared inputs (hidden values come on cls.hidden).
    import inspect

    params = set(inspect.signature(cls.execute).parameters)
    declared = set(spec.get("required", {})) | set(spec.get("optional", {}))
    assert params == declared, (node_id, params ^ declared)


def test_propainter_node_defaults_are_the_settings_defaults():
    from diffueraser_core.prior_propainter import ProPainterSettings

    defaults = {f.name: f.default for f in dataclasses.fields(ProPainterSettings)}
    spec = pack.NODE_CLASS_MAPPINGS["DiffuEraserProPainterPrior"].INPUT_TYPES()["required"]
    for name, value in PROPAINTER_DEFAULTS.items():
        assert value == spec[name][1]["default"], name
        if name != "subvideo_length":
            assert defaults[name] == value, name
    # the node's prior feeds DiffuEraser, whose reference run passes subvideo_length=50 (issue 15 item 4)
    assert spec["subvideo_length"][1]["default"] == 50


def test_sampler_defaults_are_the_reference():
    from diffueraser_core.pipeline import SamplerSettings

    spec = pack.NODE_CLASS_MAPPINGS["DiffuEraserSampler"].INPUT_TYPES()["required"]
    ref = SamplerSettings()
    assert spec["steps"][1]["default"] == ref.steps == 2
    assert spec["window_length"][1]["default"] == ref.window_length == 22
    assert spec["window_overlap"][1]["default"] == 22 // 4
    assert spec["mask_dilation"][1]["default"] == ref.mask_dilation == 8
    assert spec["pre_inference"][1]["default"] is True and spec["pre_inference"][0] == "BOOLEAN"


def test_import_is_cheap():
    import subprocess
    import sys

    code = ("import sys, nodes; heavy = [m for m in ('diffusers', 'transformers', 'diffueraser_core.pipeline', "
            "'diffueraser_core.prior_propainter') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------- model folders

def test_folders_list_diffusers_folders_and_files(tmp_path, monkeypatch):
    monkeypatch.delenv(folders.ALLOW_DOWNLOAD_ENV, raising=False)
    d = tmp_path / "diffueraser"
    (d / "diffuEraser" / "unet_main").mkdir(parents=True)
    (d / "diffuEraser" / "unet_main" / "config.json").write_text("{}")
    (d / "diffuEraser" / "unet_main" / "diffusion_pytorch_model.safetensors").write_bytes(b"x")
    (d / "diffuEraser" / "incomplete").mkdir()
    (d / "diffuEraser" / "incomplete" / "config.json").write_text("{}")
    (d / "pcm_sd15_smallcfg_2step_converted.safetensors").write_bytes(b"x")
    (d / "notes.txt").write_text("x")
    entries = folders.list_entries("diffueraser", str(tmp_path))
    assert entries == ["diffuEraser/unet_main", "pcm_sd15_smallcfg_2step_converted.safetensors"]
    assert folders.choices("diffueraser", "pcm_sd15", str(tmp_path))[0].startswith("pcm_sd15")
    path = folders.resolve("diffueraser", "diffuEraser/unet_main", "DiffuEraser Model Loader", str(tmp_path))
    assert path == str(d / "diffuEraser" / "unet_main")
    with pytest.raises(ModelFileError, match=r"DiffuEraser Model Loader: model 'diffuEraser/brushnet' not found.*"
                                             r"huggingface.co/lixiaowen"):
        folders.resolve("diffueraser", "diffuEraser/brushnet", "DiffuEraser Model Loader", str(tmp_path))
    with pytest.raises(ModelFileError, match="invalid model name"):
        folders.resolve("diffueraser", "../secrets", "DiffuEraser Model Loader", str(tmp_path))


def test_downloads_off_by_default_and_official_names_offered_when_on(tmp_path, monkeypatch):
    monkeypatch.delenv(folders.ALLOW_DOWNLOAD_ENV, raising=False)
    assert folders.list_entries("propainter", str(tmp_path)) == []
    with pytest.raises(ModelFileError, match="downloads are off"):
        folders.download("propainter", "ProPainter.pth", str(tmp_path), "DiffuEraser ProPainter Loader")
    monkeypatch.setenv(folders.ALLOW_DOWNLOAD_ENV, "1")
    assert set(folders.list_entries("propainter", str(tmp_path))) == {
        "raft-things.pth", "recurrent_flow_completion.pth", "ProPainter.pth"}


def test_register_folders_with_comfy_folder_paths(tmp_path, monkeypatch):
    import sys
    import types

    fp = types.ModuleType("folder_paths")
    fp.models_dir = str(tmp_path)
    registered = {}
    fp.add_model_folder_path = lambda name, path, is_default=False: registered.setdefault(name, []).append(path)
    fp.get_folder_paths = lambda name: list(registered[name])
    monkeypatch.setitem(sys.modules, "folder_paths", fp)
    monkeypatch.delenv(folders.MODELS_DIR_ENV, raising=False)
    folders.register_folders()
    assert registered == {"diffueraser": [str(tmp_path / "diffueraser")],
                          "propainter": [str(tmp_path / "propainter")]}
    assert folders.folder_dirs("propainter") == [str(tmp_path / "propainter")]


# ---------------------------------------------------------------- end to end (standalone runtime)

class ComfyLikeVae:
    """ComfyUI's VAE API shape around a diffusers AutoencoderKL (encode IMAGE 0..1 -> raw latent, decode)."""

    def __init__(self, vae):
        self.vae = vae

    def encode(self, pixels):
        with torch.no_grad():
            return self.vae.encode(pixels.movedim(-1, 1) * 2 - 1).latent_dist.mean.float()

    def decode(self, latent):
        with torch.no_grad():
            return ((self.vae.decode(latent).sample + 1) / 2).clamp(0, 1).movedim(1, -1).float()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    random_weights = pytest.importorskip("diffueraser_core.random_weights")
    if not hasattr(random_weights, "make_models_folder"):
        pytest.skip("random_weights.make_models_folder not written yet")
    pytest.importorskip("diffueraser_core.random_weights.diffusion")
    from diffueraser_core.models import sd15_components

    root = tmp_path_factory.mktemp("models")
    # ProPainter's networks only exist full size (slow on a CPU): written only for the slow test below.
    paths = random_weights.make_models_folder(str(root), propainter=False)
    mp = pytest.MonkeyPatch()
    mp.setenv(folders.MODELS_DIR_ENV, str(root))
    mp.delenv(folders.ALLOW_DOWNLOAD_ENV, raising=False)
    nodes_loaders.clear_cache()
    vae = ComfyLikeVae(sd15_components.load_vae(paths["vae"]))
    text_encoder = sd15_components.load_text_encoder(paths["text_encoder"])
    positive = [[sd15_components.encode_prompt(text_encoder, ""), {}]]
    yield {"root": root, "vae": vae, "positive": positive}
    mp.undo()
    nodes_loaders.clear_cache()


def _clip(frames=4, h=64, w=96):
    g = torch.Generator().manual_seed(3)
    images = torch.rand(frames, h, w, 3, generator=g)
    mask = torch.zeros(1, h, w)
    mask[:, 20:40, 30:60] = 1.0
    return images, mask


def _sampler_args(models, images, mask, latent, **kw):
    args = dict(diffueraser_model=None, vae=models["vae"], positive=models["positive"], images=images, mask=mask,
                latent=latent, steps=2, cfg=0.0, window_length=22, window_overlap=5, brushnet_scale=1.0,
                pre_inference=True, mask_dilation=8)
    args.update(kw)
    return args


@pytest.fixture(scope="module")
def run(models):
    """Prior injection -> loader -> sampler -> decode -> blend once through the standalone runtime (shared by the
    tests below: CPU time is scarce). The prior is the video itself (any IMAGE is a valid prior)."""
    N = pack.NODE_CLASS_MAPPINGS
    images, mask = _clip()
    (latent,) = N["DiffuEraserPriorInjection"].execute(models["vae"], images, 5, "forward_noise", 1.0, 960, 2)
    (model,) = N["DiffuEraserModelLoader"].execute("diffuEraser/unet_main", "diffuEraser/brushnet",
                                                  "pcm_sd15_smallcfg_2step_converted.safetensors", 1.0)
    (out,) = N["DiffuEraserSampler"].execute(**_sampler_args(models, images, mask, latent, diffueraser_model=model))
    generated = models["vae"].decode(out["samples"])
    (blended,) = N["DiffuEraserBlend"].execute(images, generated, mask, 8, 21)
    return dict(images=images, mask=mask, latent=latent, samples=out["samples"], blended=blended)


def test_nodes_end_to_end(run):
    images = run["images"]
    frames, h, w = images.shape[:3]
    as_u8 = (images * 255).round()
    assert run["latent"]["samples"].shape == (frames, 4, h // 8, w // 8)
    assert "diffueraser" in run["latent"]  # what the sampler needs beyond the start latent
    assert run["samples"].shape == (frames, 4, h // 8, w // 8) and torch.isfinite(run["samples"]).all()
    blended = run["blended"]
    assert blended.shape == images.shape
    changed = ((blended * 255).round() != as_u8).any(-1)
    assert changed[:, 30, 45].all()  # the hole was filled
    assert not changed[:, :, :4].any()  # far from the mask: the original, bit for bit


@pytest.mark.slow
def test_propainter_nodes_end_to_end(models):
    from diffueraser_core.random_weights.propainter import save_propainter_weights

    save_propainter_weights(str(models["root"] / "propainter"))
    N = pack.NODE_CLASS_MAPPINGS
    images, mask = _clip(frames=3)
    (pnets,) = N["DiffuEraserProPainterLoader"].execute("raft-things.pth", "recurrent_flow_completion.pth",
                                                      "ProPainter.pth")
    prior, dilated = N["DiffuEraserProPainterPrior"].execute(images, mask, pnets, 1.0, 960, 4, 10, 10, 80, 1)
    assert prior.shape == images.shape and prior.dtype == torch.float32
    assert dilated.shape == (3, 64, 96) and bool(dilated[:, 30, 45].all())
    as_u8 = (images * 255).round()
    outside = ~dilated.bool()
    assert torch.equal((prior * 255).round()[outside], as_u8[outside])  # ProPainter touched only the hole
    assert not torch.equal((prior * 255).round(), as_u8)


def _with_unique_id(cls, node_id):
    """What the host does before a run: a class clone whose ``hidden`` carries the node's prompt id."""
    return type(cls.__name__, (cls,), {"hidden": io.HiddenHolder(unique_id=node_id)})


def test_comfy_path_agrees_with_standalone_and_cancels(models, run, monkeypatch):
    """Same nodes with a fake ComfyUI injected: ModelPatcher/load_models_gpu/ProgressBar used, same latents."""
    import sys

    from test_bridge import FakeInterrupt, make_fake_comfy

    record = {"loads": [], "patchers": [], "bars": [], "interrupt_checks": 0, "interrupt": False,
              "cast_forwards": 0, "empty_cache": 0}
    for name, module in make_fake_comfy(record).items():
        monkeypatch.setitem(sys.modules, name, module)
    nodes_loaders.clear_cache()
    try:
        N = pack.NODE_CLASS_MAPPINGS
        (model,) = N["DiffuEraserModelLoader"].execute("diffuEraser/unet_main", "diffuEraser/brushnet",
                                                      "pcm_sd15_smallcfg_2step_converted.safetensors", 1.0)
        assert len(record["patchers"]) == 3  # unet, brushnet, and the unet clone carrying the LoRA patches
        args = _sampler_args(models, run["images"], run["mask"], run["latent"], diffueraser_model=model)
        sampler = _with_unique_id(N["DiffuEraserSampler"], "42")
        (out,) = sampler.execute(**args)
        torch.testing.assert_close(out["samples"], run["samples"], rtol=1e-4, atol=1e-4)
        assert record["loads"] and record["cast_forwards"] > 0
        assert record["bars"] and all(bar.node_id == "42" for bar in record["bars"])
        assert record["bars"][-1].updates[-1][0] == record["bars"][-1].updates[-1][1]  # ran to completion
        assert record["interrupt_checks"] > 0
        record["interrupt"], record["interrupt_checks"] = True, 0
        with pytest.raises(FakeInterrupt):
            sampler.execute(**args)
        assert record["interrupt_checks"] == 1  # stopped at the first check
    finally:
        nodes_loaders.clear_cache()


def test_lora_strength_repatches_without_reloading(models):
    loader = pack.NODE_CLASS_MAPPINGS["DiffuEraserModelLoader"]
    names = ("diffuEraser/unet_main", "diffuEraser/brushnet", "pcm_sd15_smallcfg_2step_converted.safetensors")
    (m1,) = loader.execute(*names, 1.0)
    w1 = {k: v.clone() for k, v in m1.unet.module.state_dict().items()}
    (m0,) = loader.execute(*names, 0.0)
    assert m0.unet.module is m1.unet.module and m0.brushnet is m1.brushnet  # same weights, no reload
    changed = [k for k, v in m0.unet.module.state_dict().items() if not torch.equal(v, w1[k])]
    assert changed and all("motion_modules" not in k for k in changed)
    (none,) = loader.execute(names[0], names[1], nodes_loaders.NO_LORA, 1.0)
    assert none.unet.module is not m0.unet.module  # no LoRA: fresh base weights from the file
    base = none.unet.module.state_dict()
    at_zero = m0.unet.module.state_dict()
    for k in changed:
        torch.testing.assert_close(at_zero[k], base[k], rtol=1e-5, atol=1e-6)
        assert not torch.allclose(w1[k], base[k])


def test_bad_values_name_the_node(models):
    N = pack.NODE_CLASS_MAPPINGS
    images, mask = _clip(frames=3)
    latent = {"samples": torch.zeros(3, 4, 8, 12)}
    with pytest.raises(InputError, match=r"DiffuEraser Sampler: window_overlap 22 must be smaller than "
                                         r"window_length 22"):
        N["DiffuEraserSampler"].execute(**_sampler_args(models, images, mask, latent, window_overlap=22))
    bad_mask = torch.zeros(2, 64, 96)
    with pytest.raises(InputError, match=r"DiffuEraser Blend: mask has 2 frames but the video has 3"):
        N["DiffuEraserBlend"].execute(images, images, bad_mask, 8, 21)
    with pytest.raises(InputError, match="DiffuEraser Prior Injection: mode 'ddim_inversion' needs"):
        N["DiffuEraserPriorInjection"].execute(models["vae"], images, 0, "ddim_inversion", 1.0, 960, 2)
    with pytest.raises(ModelFileError, match="DiffuEraser ProPainter Loader: model 'missing.pth' not found"):
        N["DiffuEraserProPainterLoader"].execute("missing.pth", "recurrent_flow_completion.pth", "ProPainter.pth")


def test_lcm_like_lora_selects_the_lcm_scheduler(models):
    # the reference samples pcm_sd15_lcmlike_lora_converted with LCMScheduler; the loader says so to the sampler
    import shutil

    folder = models["root"] / "diffueraser"
    lcm_name = "pcm_sd15_lcmlike_lora_converted.safetensors"
    shutil.copy(folder / "pcm_sd15_smallcfg_2step_converted.safetensors", folder / lcm_name)
    loader = pack.NODE_CLASS_MAPPINGS["DiffuEraserModelLoader"]
    try:
        (lcm,) = loader.execute("diffuEraser/unet_main", "diffuEraser/brushnet", lcm_name, 1.0)
        (tcd,) = loader.execute("diffuEraser/unet_main", "diffuEraser/brushnet",
                             "pcm_sd15_smallcfg_2step_converted.safetensors", 1.0)
    finally:
        (folder / lcm_name).unlink()
    assert lcm.scheduler == "lcm" and tcd.scheduler == "tcd"


def test_node_masks_of_another_size_are_resized_once_by_the_stage_not_by_the_node():
    # issue 15 item 7: a half-size mask reaches the stage at its own size (the stage resizes it once, straight to
    # its working size); another aspect ratio is an error, never a stretch
    from nodes.common import PreparedMask, masks_and_dilation

    half = torch.zeros(1, 32, 48)
    half[0, 10:14, 20:23] = 1.0
    holes, dilation = masks_and_dilation(half, 8, 5, (64, 96), "DiffuEraser Sampler")
    assert holes.dtype == torch.bool and tuple(holes.shape) == (5, 32, 48) and dilation == 8
    assert torch.equal(holes[3], half[0] > 0.5)
    prepared = PreparedMask(holes=half.bool(), dilation=4)
    holes, dilation = masks_and_dilation(prepared, 8, 5, (64, 96), "DiffuEraser Blend")
    assert tuple(holes.shape) == (5, 32, 48) and dilation == 4
    # through a node: the half-size mask blends like the full-size one it stands for; another aspect ratio fails
    blend = pack.NODE_CLASS_MAPPINGS["DiffuEraserBlend"]
    images, generated = torch.rand(5, 64, 96, 3), torch.rand(5, 64, 96, 3)
    full = torch.nn.functional.interpolate(half[None], size=(64, 96), mode="nearest")[0]
    (from_half,) = blend.execute(images, generated, half, 2, 5)
    (from_full,) = blend.execute(images, generated, full, 2, 5)
    assert torch.equal(from_half, from_full)
    with pytest.raises(InputError, match="DiffuEraser Blend.*aspect"):
        blend.execute(images, generated, torch.zeros(1, 32, 32), 2, 5)
