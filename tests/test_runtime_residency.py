"""Standalone runtime: which networks stay on the device, and where networks are built at load time.

CI has no GPU, so the device is simulated: networks report their location and size, and the runtime's free
device memory is a ledger of what is resident. The policy under test is the runtime's own code.
"""

import pytest
import torch

from diffueraser_core.runtime import RESIDENCY_MARGIN_BYTES, StandaloneRuntime, module_bytes

MB = 1024 ** 2
DEVICE = torch.device("meta")  # stands in for a GPU: not the CPU, so released networks are candidates to offload


class _FakeParam:
    """What the runtime reads from a parameter: where it is, its dtype and its size."""

    def __init__(self, owner):
        self.owner = owner
        self.dtype = torch.float16

    @property
    def device(self):
        return self.owner.location

    def numel(self):
        return self.owner.nbytes // 2

    def element_size(self):
        return 2

    def is_floating_point(self):
        return True

    def requires_grad_(self, flag=True):
        return self


class FakeNet(torch.nn.Module):
    def __init__(self, name, nbytes, moves):
        super().__init__()
        self.name, self.nbytes, self.moves = name, nbytes, moves
        self.location = torch.device("cpu")

    def parameters(self, recurse=True):
        yield _FakeParam(self)

    def to(self, device=None, dtype=None, **kwargs):
        if device is not None and torch.device(device) != self.location:
            self.location = torch.device(device)
            self.moves.append((self.name, self.location.type))
        return self


class LedgerRuntime(StandaloneRuntime):
    def __init__(self, capacity):
        super().__init__(device=torch.device("cpu"), dtype=torch.float16)
        self.device = DEVICE
        self.capacity = capacity
        self.nets = []
        self.moves = []

    def net(self, name, nbytes):
        module = FakeNet(name, nbytes, self.moves)
        self.nets.append(module)
        return self.wrap(module, name)

    def free_device_memory(self):
        return self.capacity - sum(n.nbytes for n in self.nets if n.location == DEVICE)


def test_released_networks_stay_resident_when_the_card_has_room():
    runtime = LedgerRuntime(capacity=10_000 * MB)
    unet, vae = runtime.net("unet", 2600 * MB), runtime.net("vae", 160 * MB)
    unet.acquire(memory_required=3000 * MB)
    unet.release()
    vae.acquire(memory_required=500 * MB)
    vae.release()
    unet.acquire(memory_required=3000 * MB)
    assert runtime.moves == [("unet", "meta"), ("vae", "meta")], "a network left the card although it had room"
    assert [h.name for h in runtime.released] == ["vae"]


def test_released_networks_are_offloaded_oldest_first_until_the_request_fits():
    runtime = LedgerRuntime(capacity=3900 * MB)
    raft, vae, unet = runtime.net("raft", 100 * MB), runtime.net("vae", 160 * MB), runtime.net("unet", 2600 * MB)
    for handle in (raft, vae):
        handle.acquire(memory_required=200 * MB)
        handle.release()
    # unet (2600) + its activations (700) + margin fit only when both raft and vae leave, raft first
    unet.acquire(memory_required=700 * MB)
    assert runtime.moves[-3:] == [("raft", "cpu"), ("vae", "cpu"), ("unet", "meta")]
    assert runtime.released == []


def test_only_as_much_is_offloaded_as_the_request_needs():
    runtime = LedgerRuntime(capacity=3300 * MB + RESIDENCY_MARGIN_BYTES)
    raft, vae, unet = runtime.net("raft", 100 * MB), runtime.net("vae", 160 * MB), runtime.net("unet", 2600 * MB)
    for handle in (raft, vae):
        handle.acquire()
        handle.release()
    unet.acquire(memory_required=500 * MB)  # needs 3100 + margin: evicting raft (100) is enough
    assert ("raft", "cpu") in runtime.moves and ("vae", "cpu") not in runtime.moves
    assert [h.name for h in runtime.released] == ["vae"]


def test_a_held_network_is_never_offloaded_and_release_is_idempotent():
    runtime = LedgerRuntime(capacity=1000 * MB)
    vae = runtime.net("vae", 160 * MB)
    vae.acquire()
    vae.release()
    vae.release()
    assert runtime.released == [vae]
    vae.acquire(memory_required=10_000 * MB)  # even when memory is short, the network being acquired stays
    assert ("vae", "cpu") not in runtime.moves and runtime.released == []


def test_placement_device_builds_on_the_device_only_when_it_fits():
    runtime = LedgerRuntime(capacity=4000 * MB)
    assert runtime.placement_device(2600 * MB) == DEVICE
    assert runtime.placement_device(4000 * MB) == torch.device("cpu")  # no room for the margin
    cpu = StandaloneRuntime(device=torch.device("cpu"))
    assert cpu.free_device_memory() is None and cpu.placement_device(1) == torch.device("cpu")


def test_module_bytes_counts_floating_tensors_in_the_target_dtype():
    net = torch.nn.Linear(10, 4)  # 44 float32 values
    net.register_buffer("steps", torch.zeros(3, dtype=torch.int64))
    assert module_bytes(net) == 44 * 4 + 3 * 8
    assert module_bytes(net, torch.float16) == 44 * 2 + 3 * 8


def test_cli_builds_diffusion_networks_where_the_runtime_places_them(tmp_path, monkeypatch):
    from diffueraser_core import cli
    from diffueraser_core.models.checkpoints import network_file_bytes
    from diffueraser_core.random_weights import make_models_folder

    folder = tmp_path / "models"
    found = make_models_folder(str(folder), size="tiny", propainter=False)
    asked = []

    class Recording(StandaloneRuntime):
        def placement_device(self, nbytes):
            asked.append(nbytes)
            return torch.device("cpu")

    runtime = Recording(device=torch.device("cpu"))
    args = type("Args", (), {"prompt": "", "lora": None, "lora_strength": 1.0, "tokenizer": None})()
    models, codec, text = cli._load_diffusion(found, str(folder), args, runtime)
    expected = [network_file_bytes(found["unet_main"], "unet_main", torch.float32),
                network_file_bytes(found["brushnet"], "brushnet", torch.float32)]
    assert asked == expected
    # the estimate is the loaded network's size, read from the header alone
    assert expected[0] == module_bytes(models.unet.module)
    assert expected[1] == module_bytes(models.brushnet.module)
    assert all(p.dtype == torch.float32 for p in models.unet.module.parameters())


def test_channels_last_gives_the_same_sampling_result_and_skips_3d_convolutions():
    from diffueraser_core.pipeline import DiffuEraserModels
    from diffueraser_core.random_weights.diffusion import build_brushnet, build_unet_main
    from diffueraser_core.temporal_sampling import Conditioning, WindowSettings, denoise_windows

    unet, brushnet = build_unet_main(seed=1), build_brushnet(seed=2)
    gen = torch.Generator().manual_seed(0)
    cond = Conditioning(torch.randn((10, 4, 4, 6), generator=gen), torch.rand((10, 4, 6), generator=gen) > 0.3)
    latents = torch.randn((10, 4, 4, 6), generator=gen)
    text = torch.randn((1, 8, 32), generator=gen)

    def run(**options):
        runtime = StandaloneRuntime(device=torch.device("cpu"), **options)
        models = DiffuEraserModels(unet=runtime.wrap(unet, "u"), brushnet=runtime.wrap(brushnet, "b"))
        return denoise_windows(latents, [(999, 499), (499, 0)], cond, text, None, models,
                               WindowSettings(window_length=8), runtime)

    plain = run()
    fast = run(channels_last=True)
    convs = [m for m in unet.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    assert torch.allclose(plain, fast, atol=1e-5, rtol=1e-5)  # measured: 3.8e-6

    mixed = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.Conv3d(2, 3, 3))  # ProPainter-like
    StandaloneRuntime(device=torch.device("cpu"), channels_last=True).wrap(mixed, "m").acquire()
    assert mixed[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert mixed[1].weight.is_contiguous()


def test_compile_wraps_only_the_named_networks_and_shares_their_weights():
    runtime = StandaloneRuntime(device=torch.device("cpu"), compile_networks=("unet",))
    unet, vae = runtime.wrap(torch.nn.Linear(3, 3), "unet"), runtime.wrap(torch.nn.Linear(3, 3), "vae")
    compiled = unet.acquire()
    assert compiled is not unet.module and compiled is unet.acquire()  # compiled once, lazily
    assert list(compiled.parameters())[0] is unet.module.weight
    assert vae.acquire() is vae.module
