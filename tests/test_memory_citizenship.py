"""Every network the pack loads, ProPainter's included, sits in ComfyUI's model management: wrapped in the host's
model patcher class (CoreModelPatcher, which current ComfyUI makes ModelPatcherDynamic under dynamic VRAM), with
its layers on ComfyUI's casting ops, and loaded through load_models_gpu."""

import sys

import torch

from nodes import bridge, nodes_loaders
from test_bridge import fake_comfy, tiny_net  # noqa: F401 - fixture


def test_wrap_uses_the_hosts_core_model_patcher_when_it_has_one(fake_comfy, monkeypatch):  # noqa: F811
    patcher_mod = sys.modules["comfy.model_patcher"]
    made = []

    class DynamicPatcher(patcher_mod.ModelPatcher):
        def __init__(self, *args, **kwargs):
            made.append(self)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(patcher_mod, "CoreModelPatcher", DynamicPatcher, raising=False)
    runtime = bridge.get_runtime("DiffuEraser Test", "1")
    handle = runtime.wrap(tiny_net(), "tiny")
    assert made == [handle.patcher]


def test_propainter_networks_load_through_the_hosts_model_management(fake_comfy, monkeypatch, tmp_path):  # noqa: F811
    from diffueraser_core.models import flow_completion, propainter, raft
    from nodes import folders

    (tmp_path / "propainter").mkdir()
    for name in ("raft-things.pth", "recurrent_flow_completion.pth", "ProPainter.pth"):
        (tmp_path / "propainter" / name).write_bytes(b"x")
    monkeypatch.setenv(folders.MODELS_DIR_ENV, str(tmp_path))
    # stand-ins for the three full-size networks (their real builders are tested in their own files)
    monkeypatch.setattr(raft, "load_raft", lambda path: tiny_net(1))
    monkeypatch.setattr(flow_completion, "load_flow_completion", lambda path: tiny_net(2))
    monkeypatch.setattr(propainter, "load_propainter", lambda path: tiny_net(3))
    nodes_loaders.clear_cache()
    try:
        (nets,) = nodes_loaders.DiffuEraserProPainterLoader.execute(
            raft="raft-things.pth", flow_completion="recurrent_flow_completion.pth", propainter="ProPainter.pth")
        handles = (nets.raft, nets.flow_completion, nets.generator)
        assert len(fake_comfy["patchers"]) == 3
        assert [h.patcher for h in handles] == fake_comfy["patchers"]
        for h in handles:
            assert all(getattr(m, "comfy_cast_weights", False) for m in h.module.modules()
                       if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
            assert getattr(h.module, "_diffueraser_heartbeats", False)
        nets.raft.acquire(1024)
        assert fake_comfy["loads"] and fake_comfy["loads"][-1][1] == 1024  # load_models_gpu decides placement
    finally:
        nodes_loaders.clear_cache()
