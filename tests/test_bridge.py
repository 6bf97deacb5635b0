"""The ComfyUI bridge, exercised with a minimal fake ``comfy`` package injected into sys.modules.

The fake records what the bridge asks ComfyUI to do (ModelPatcher creation, load_models_gpu, ProgressBar updates,
interrupt checks) and emulates the parts that change numbers (casting ops, weight patches applied at load).
"""

import sys
import types

import pytest
import torch
import torch.nn.functional as F

from diffueraser_core.errors import InputError
from diffueraser_core.runtime import StandaloneRuntime
from nodes import bridge


class FakeInterrupt(Exception):
    pass


def _cast_classes(record):
    def cast(t, like):
        return None if t is None else t.to(device=like.device, dtype=like.dtype)

    class Linear(torch.nn.Linear):
        comfy_cast_weights = True

        def forward(self, input):
            record["cast_forwards"] += 1
            return F.linear(input, cast(self.weight, input), cast(self.bias, input))

    class Conv2d(torch.nn.Conv2d):
        comfy_cast_weights = True

        def forward(self, input):
            record["cast_forwards"] += 1
            return self._conv_forward(input, cast(self.weight, input), cast(self.bias, input))

    class GroupNorm(torch.nn.GroupNorm):
        comfy_cast_weights = True

        def forward(self, input):
            record["cast_forwards"] += 1
            return F.group_norm(input, self.num_groups, cast(self.weight, input), cast(self.bias, input), self.eps)

    class LayerNorm(torch.nn.LayerNorm):
        comfy_cast_weights = True

        def forward(self, input):
            record["cast_forwards"] += 1
            return F.layer_norm(input, self.normalized_shape, cast(self.weight, input), cast(self.bias, input), self.eps)

    return types.SimpleNamespace(Linear=Linear, Conv2d=Conv2d, GroupNorm=GroupNorm, LayerNorm=LayerNorm)


def make_fake_comfy(record):
    """Modules comfy, comfy.model_management, comfy.model_patcher, comfy.utils, comfy.ops (fake, recording)."""
    comfy = types.ModuleType("comfy")
    comfy.__path__ = []
    mm = types.ModuleType("comfy.model_management")
    mm.get_torch_device = lambda: torch.device("cpu")
    mm.unet_offload_device = lambda: torch.device("cpu")
    mm.unet_dtype = lambda device=None, model_params=0, supported_dtypes=None, weight_dtype=None: torch.float32
    mm.OOM_EXCEPTION = torch.OutOfMemoryError
    mm.InterruptProcessingException = FakeInterrupt
    mm.soft_empty_cache = lambda *a, **k: record.__setitem__("empty_cache", record["empty_cache"] + 1)

    def throw_exception_if_processing_interrupted():
        record["interrupt_checks"] += 1
        if record["interrupt"]:
            raise FakeInterrupt("interrupted")

    mm.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted

    def load_models_gpu(models, memory_required=0, **kwargs):
        record["loads"].append(([id(m) for m in models], memory_required))
        for patcher in models:
            patcher.fake_load()

    mm.load_models_gpu = load_models_gpu

    mp = types.ModuleType("comfy.model_patcher")

    class ModelPatcher:
        def __init__(self, model, load_device, offload_device, size=0):
            record["patchers"].append(self)
            self.model, self.load_device, self.offload_device = model, load_device, offload_device
            self.patches = {}

        def clone(self):
            n = ModelPatcher(self.model, self.load_device, self.offload_device)
            n.patches = {k: list(v) for k, v in self.patches.items()}
            return n

        def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
            sd = self.model.state_dict()
            applied = []
            for key, value in patches.items():
                if key in sd:
                    self.patches.setdefault(key, []).append((strength_patch, value))
                    applied.append(key)
            return applied

        def fake_load(self):
            # As ComfyUI: weights = backup + sum(strength * diff) of the patcher being loaded.
            model = self.model
            if getattr(model, "fake_current", None) is self:
                return
            backup = model.__dict__.setdefault("fake_backup", {})
            params = dict(model.named_parameters())
            with torch.no_grad():
                for key, orig in backup.items():
                    params[key].copy_(orig)
                for key, lst in self.patches.items():
                    backup.setdefault(key, params[key].detach().clone())
                    for strength, (diff,) in lst:
                        params[key].add_(strength * diff.to(params[key].dtype))
            model.fake_current = self
            model.to(self.load_device)

    mp.ModelPatcher = ModelPatcher

    utils = types.ModuleType("comfy.utils")

    class ProgressBar:
        def __init__(self, total, node_id=None):
            self.total, self.node_id = total, node_id
            record["bars"].append(self)
            self.updates = []

        def update_absolute(self, value, total=None, preview=None):
            self.updates.append((value, total, preview))

    utils.ProgressBar = ProgressBar
    ops = types.ModuleType("comfy.ops")
    ops.manual_cast = _cast_classes(record)
    comfy.model_management, comfy.model_patcher, comfy.utils, comfy.ops = mm, mp, utils, ops
    return {"comfy": comfy, "comfy.model_management": mm, "comfy.model_patcher": mp, "comfy.utils": utils,
            "comfy.ops": ops}


@pytest.fixture
def fake_comfy(monkeypatch):
    record = {"loads": [], "patchers": [], "bars": [], "interrupt_checks": 0, "interrupt": False,
              "cast_forwards": 0, "empty_cache": 0}
    for name, module in make_fake_comfy(record).items():
        monkeypatch.setitem(sys.modules, name, module)
    return record


def tiny_net(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.GroupNorm(2, 8), torch.nn.SiLU(),
        torch.nn.Flatten(1), torch.nn.Linear(8 * 4 * 4, 6), torch.nn.LayerNorm(6),
    )


def test_standalone_without_comfy():
    assert not bridge.comfy_available()
    assert isinstance(bridge.get_runtime("DiffuEraser Sampler"), StandaloneRuntime)


def test_comfy_runtime_wraps_and_loads_through_comfy(fake_comfy):
    rt = bridge.get_runtime("DiffuEraser Sampler", unique_id="7")
    assert isinstance(rt, bridge.ComfyRuntime)
    assert rt.device == torch.device("cpu") and rt.dtype == torch.float32
    net = tiny_net()
    x = torch.randn(2, 3, 4, 4)
    expected = net(x)
    handle = rt.wrap(net, "tiny")
    assert len(fake_comfy["patchers"]) == 1
    assert all(getattr(m, "comfy_cast_weights", False) for m in net.modules()
               if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm)))
    module = handle.acquire(memory_required=1234)
    assert module is net
    assert fake_comfy["loads"] == [([id(handle.patcher)], 1234)]
    out = module(x)
    assert fake_comfy["cast_forwards"] == 4  # conv, groupnorm, linear, layernorm went through the casting ops
    torch.testing.assert_close(out, expected)


def test_handles_acquired_in_one_node_run_load_together(fake_comfy):
    rt = bridge.get_runtime("DiffuEraser Sampler")
    a, b = rt.wrap(tiny_net(0), "a"), rt.wrap(tiny_net(1), "b")
    a.acquire(10)
    b.acquire(20)
    # Loading b must keep a (ComfyUI only keeps what it is given).
    assert fake_comfy["loads"][-1] == ([id(a.patcher), id(b.patcher)], 20)
    b.release()
    a.acquire(5)
    assert fake_comfy["loads"][-1] == ([id(a.patcher)], 5)
    bridge.get_runtime("DiffuEraser Blend")  # a new node run starts with nothing active
    b.acquire(1)
    assert fake_comfy["loads"][-1] == ([id(b.patcher)], 1)


def test_weight_patches_agree_with_standalone_and_restrength_without_reload(fake_comfy):
    x = torch.randn(2, 3, 4, 4)
    deltas = {"4.weight": torch.randn(6, 128) * 0.1, "0.bias": torch.randn(8) * 0.1}

    rt = bridge.get_runtime("DiffuEraser Model Loader")
    base = rt.wrap(tiny_net(), "unet_main")
    patched_half = bridge.with_weight_patches(base, deltas, 0.5)
    patched_one = bridge.with_weight_patches(base, deltas, 1.0)
    assert patched_half.module is base.module  # one set of weights, patches only
    out_one = patched_one.acquire()(x)
    out_half = patched_half.acquire()(x)
    out_base = base.acquire()(x)

    st = StandaloneRuntime(device="cpu")
    ref = st.wrap(tiny_net(), "unet_main")
    ref_base = ref.acquire()(x)
    bridge.with_weight_patches(ref, deltas, 1.0)
    ref_one = ref.acquire()(x)
    bridge.with_weight_patches(ref, deltas, 0.5)  # in place, only the difference is added
    ref_half = ref.acquire()(x)
    torch.testing.assert_close(out_base, ref_base)
    torch.testing.assert_close(out_one, ref_one)
    torch.testing.assert_close(out_half, ref_half, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out_one, out_half)


def test_weight_patches_naming_no_weight_are_an_error(fake_comfy):
    rt = bridge.get_runtime("DiffuEraser Model Loader")
    handle = rt.wrap(tiny_net(), "unet_main")
    with pytest.raises(InputError, match="match no weight"):
        bridge.with_weight_patches(handle, {"nope.weight": torch.zeros(1)}, 1.0)


def test_progress_interrupt_oom(fake_comfy):
    rt = bridge.get_runtime("DiffuEraser Sampler", unique_id="12")
    rt.progress("sampling", 1, 4)
    rt.progress("sampling", 2, 4, preview=torch.zeros(8, 8, 3, dtype=torch.uint8))
    rt.progress("decode", 1, 2)
    bars = fake_comfy["bars"]
    assert len(bars) == 2 and bars[0].node_id == "12"
    assert bars[0].updates[0] == (1, 4, None)
    fmt, image, _ = bars[0].updates[1][2]
    assert fmt == "JPEG" and image.size == (8, 8)
    rt.check_interrupt()
    fake_comfy["interrupt"] = True
    with pytest.raises(FakeInterrupt):
        rt.check_interrupt()
    assert rt.is_oom(torch.OutOfMemoryError("x")) and not rt.is_oom(RuntimeError("x"))
    rt.empty_cache()
    assert fake_comfy["empty_cache"] == 1


class ComfyLikeVae:
    """ComfyUI's VAE API shape (encode IMAGE 0..1 [B,H,W,C] -> raw latent; decode -> [B,H,W,C]) on a diffusers VAE."""

    def __init__(self, vae):
        self.vae = vae
        self.calls = []

    def encode(self, pixels):
        self.calls.append(("encode", tuple(pixels.shape)))
        with torch.no_grad():
            x = pixels.movedim(-1, 1) * 2 - 1
            return self.vae.encode(x).latent_dist.mean.float()

    def decode(self, latent):
        self.calls.append(("decode", tuple(latent.shape)))
        with torch.no_grad():
            return ((self.vae.decode(latent).sample + 1) / 2).clamp(0, 1).movedim(1, -1).float()


def test_comfy_vae_codec_chunks_and_matches_diffusers_codec():
    sd15 = pytest.importorskip("diffueraser_core.random_weights.sd15")
    pipeline = pytest.importorskip("diffueraser_core.pipeline")
    vae = sd15.build_vae()
    frames = torch.randint(0, 256, (5, 32, 32, 3), dtype=torch.uint8)
    comfy_vae = ComfyLikeVae(vae)
    codec = bridge.ComfyVaeCodec(comfy_vae, chunk=2)
    lat = codec.encode(frames)
    assert lat.shape == (5, 4, 4, 4) and lat.dtype == torch.float32
    assert [c[1][0] for c in comfy_vae.calls] == [2, 2, 1]
    st = StandaloneRuntime(device="cpu")
    ref = pipeline.DiffusersVaeCodec(st.wrap(vae, "vae"), st)
    torch.testing.assert_close(lat, ref.encode(frames), rtol=1e-4, atol=1e-4)
    out = codec.decode(lat)
    assert out.dtype == torch.uint8 and out.shape == (5, 32, 32, 3)
    assert (out.int() - ref.decode(lat).int()).abs().max() <= 1
    with pytest.raises(InputError, match="uint8"):
        codec.encode(frames.float())
    with pytest.raises(InputError, match="expected a VAE"):
        bridge.ComfyVaeCodec(object(), node="DiffuEraser Sampler")


def test_codec_checks_interrupt_per_chunk(fake_comfy):
    sd15 = pytest.importorskip("diffueraser_core.random_weights.sd15")
    rt = bridge.get_runtime("DiffuEraser Prior Injection")
    codec = bridge.ComfyVaeCodec(ComfyLikeVae(sd15.build_vae()), rt, chunk=1)
    fake_comfy["interrupt"] = True
    with pytest.raises(FakeInterrupt):
        codec.encode(torch.zeros(50, 32, 32, 3, dtype=torch.uint8))
    assert fake_comfy["interrupt_checks"] == 1  # stopped before the first chunk, not after the video


def test_conditioning_to_embeddings():
    cond = torch.randn(1, 77, 32)
    emb = bridge.conditioning_to_embeddings([[cond, {"pooled_output": None}]], "DiffuEraser Sampler", 32)
    torch.testing.assert_close(emb, cond)
    with pytest.raises(InputError, match=r"DiffuEraser Sampler: conditioning width 768 .* 32"):
        bridge.conditioning_to_embeddings([[torch.zeros(1, 77, 768), {}]], "DiffuEraser Sampler", 32)
    with pytest.raises(InputError, match="empty"):
        bridge.conditioning_to_embeddings([], "DiffuEraser Sampler")
