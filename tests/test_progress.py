"""Progress inside ComfyUI: reported through the V3 API's set_progress (with previews), from the first chunk of
every stage and from inside long network forwards (heartbeats), each report also a cancel point."""

import sys
import time
import types

import pytest
import torch

from nodes import bridge
from test_bridge import FakeInterrupt, make_fake_comfy


@pytest.fixture()
def host(monkeypatch):
    """Fake comfy modules plus a fake comfy_api.latest whose ComfyAPISync().execution records set_progress."""
    record = {"loads": [], "patchers": [], "bars": [], "interrupt_checks": 0, "interrupt": False,
              "cast_forwards": 0, "empty_cache": 0, "set_progress": []}
    for name, module in make_fake_comfy(record).items():
        monkeypatch.setitem(sys.modules, name, module)

    class Execution:
        def set_progress(self, value, max_value, node_id=None, preview_image=None, ignore_size_limit=False):
            record["set_progress"].append((time.monotonic(), value, max_value, node_id, preview_image))

    class ComfyAPISync:
        def __init__(self):
            self.execution = Execution()

    latest = types.ModuleType("comfy_api.latest")
    latest.ComfyAPISync = ComfyAPISync
    api = types.ModuleType("comfy_api")
    api.__path__ = []
    api.latest = latest
    monkeypatch.setitem(sys.modules, "comfy_api", api)
    monkeypatch.setitem(sys.modules, "comfy_api.latest", latest)
    monkeypatch.setattr(bridge, "HEARTBEAT_INTERVAL_S", 0.0)
    yield record
    bridge.set_current_runtime(None)


def test_progress_goes_through_set_progress_with_the_node_id_and_a_preview(host):
    runtime = bridge.get_runtime("DiffuEraser Test", "17")
    runtime.progress("prior", 3, 10, preview=torch.full((8, 8, 3), 200, dtype=torch.uint8))
    (_, value, max_value, node_id, image) = host["set_progress"][-1]
    assert (value, max_value, node_id) == (3.0, 10.0, "17")
    assert image is not None and image.size == (8, 8)  # a PIL image: set_progress sends it as the preview
    assert not host["bars"]  # the legacy ProgressBar is only the fallback of hosts without the V3 API
    host["interrupt"] = True
    with pytest.raises(FakeInterrupt):
        runtime.progress("prior", 4, 10)  # every report is a cancel point


class Blocks(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(3))
        self.head = torch.nn.Linear(4, 4)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def test_heartbeats_move_the_bar_inside_a_forward_without_passing_the_next_unit(host):
    net = Blocks()
    assert bridge.install_heartbeats(net) == 5  # blocks (the list itself has no forward), head
    assert bridge.install_heartbeats(net) == 0  # once per module
    runtime = bridge.get_runtime("DiffuEraser Test", "5")
    runtime.progress("sampling", 2, 6)
    before = len(host["set_progress"])
    with torch.no_grad():
        for _ in range(10):
            net(torch.zeros(1, 4))
    values = [v for _, v, m, _, _ in host["set_progress"][before:]]
    assert len(values) == 40  # one per block call (interval 0 here)
    assert all(2.0 < v < 3.0 for v in values) and values == sorted(values)
    runtime.progress("sampling", 3, 6)
    assert host["set_progress"][-1][1] == 3.0


def test_cancel_inside_a_forward(host):
    net = Blocks()
    bridge.install_heartbeats(net)
    bridge.get_runtime("DiffuEraser Test", "5")
    host["interrupt"] = True
    checks = host["interrupt_checks"]
    with pytest.raises(FakeInterrupt), torch.no_grad():
        net(torch.zeros(1, 4))
    assert host["interrupt_checks"] == checks + 1  # stopped at the first block


def test_heartbeats_are_throttled(host, monkeypatch):
    monkeypatch.setattr(bridge, "HEARTBEAT_INTERVAL_S", 3600.0)
    net = Blocks()
    bridge.install_heartbeats(net)
    runtime = bridge.get_runtime("DiffuEraser Test", "5")
    runtime.progress("sampling", 0, 6)
    before = len(host["set_progress"])
    with torch.no_grad():
        for _ in range(20):
            net(torch.zeros(1, 4))
    assert len(host["set_progress"]) == before


def test_prior_injection_reports_every_vae_chunk_from_the_start(monkeypatch):
    """The Prior Injection node reports progress (it sent none before): announced at 0, then every encoded chunk,
    the first report before 10% of the node's run."""
    import diffueraser_core.pipeline  # noqa: F401 - imported before timing, as in a running host
    import diffueraser_core.prior_injection  # noqa: F401
    import nodes as pack
    from diffueraser_core.runtime import StandaloneRuntime
    from nodes import nodes_prior

    events = []

    class Recording(StandaloneRuntime):
        def progress(self, stage, done, total, preview=None, preview_latent=None):
            events.append((time.monotonic(), stage, done, total))

    monkeypatch.setattr(nodes_prior, "get_runtime", lambda name, uid=None: Recording())

    class SlowVae:  # ComfyUI's VAE API: IMAGE [n,H,W,3] 0..1 -> raw latent [n,4,H/8,W/8]
        def encode(self, pixels):
            time.sleep(0.1 * pixels.shape[0])  # a VAE chunk takes a while
            return torch.zeros(pixels.shape[0], 4, pixels.shape[1] // 8, pixels.shape[2] // 8)

        def decode(self, latent):
            raise AssertionError("not used")

    frames = torch.rand(40, 64, 96, 3)
    start = time.monotonic()
    (latent,) = pack.NODE_CLASS_MAPPINGS["DiffuEraserPriorInjection"].execute(
        vae=SlowVae(), prior=frames, seed=0, mode="forward_noise", strength=1.0, max_side=960, inversion_steps=2)
    duration = time.monotonic() - start
    assert latent["samples"].shape == (40, 4, 8, 12)
    assert [e[1:] for e in events] == [("encode", 0, 40), ("encode", 16, 40), ("encode", 32, 40), ("encode", 40, 40)]
    assert events[0][0] - start < 0.10 * duration
