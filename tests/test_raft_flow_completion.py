"""RAFT and the recurrent flow completion network: official layouts, loading, and forward behaviour on tiny inputs."""

import json

import pytest
import torch

from diffueraser_core.errors import InputError, ModelFileError
from diffueraser_core.models import deform_conv
from diffueraser_core.models.flow_completion import (
    RecurrentFlowCompleteNet,
    SecondOrderDeformableAlignment,
    load_flow_completion,
)
from diffueraser_core.models.raft import RAFT, CorrBlock, compute_bidirectional_flow, load_raft

SIZE = 64  # smallest size RAFT's 4-level correlation pyramid accepts


def _manifest(reference_dir, name):
    return json.loads((reference_dir / f"{name}.json").read_text())["tensors"]


def _shapes(state_dict, prefix=""):
    return {prefix + key: list(value.shape) for key, value in state_dict.items()}


def _random_state_dict(model, seed):
    """Random values for every tensor (incl. BatchNorm statistics) so a load is distinguishable from init."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    by_storage = {}
    for key, value in model.state_dict().items():
        # RAFT stores one norm under two names (norm3 and downsample.1): keep the copies identical, as in the file.
        if value.data_ptr() in by_storage:
            out[key] = out[by_storage[value.data_ptr()]]
            continue
        by_storage[value.data_ptr()] = key
        if key.endswith("num_batches_tracked"):
            out[key] = torch.tensor(1234, dtype=torch.int64)
        elif key.endswith("running_var"):
            out[key] = torch.rand(value.shape, generator=gen) + 0.5
        else:
            out[key] = torch.randn(value.shape, generator=gen) * 0.05
    return out


@pytest.fixture(scope="module")
def raft_file(tmp_path_factory):
    state = _random_state_dict(RAFT(), seed=1)
    path = tmp_path_factory.mktemp("propainter") / "raft-things.pth"
    # Official layout: the state dict of nn.DataParallel(RAFT), every key under "module.".
    torch.save({"module." + key: value for key, value in state.items()}, path)
    return path, state


@pytest.fixture(scope="module")
def raft(raft_file):
    return load_raft(raft_file[0])


@pytest.fixture(scope="module")
def flow_net_file(tmp_path_factory):
    state = _random_state_dict(RecurrentFlowCompleteNet(), seed=2)
    path = tmp_path_factory.mktemp("propainter") / "recurrent_flow_completion.pth"
    torch.save(state, path)
    return path, state


@pytest.fixture(scope="module")
def flow_net(flow_net_file):
    return load_flow_completion(flow_net_file[0])


def _frames(batch, length, seed):
    gen = torch.Generator().manual_seed(seed)
    base = torch.rand(batch, 1, 3, SIZE, SIZE, generator=gen) * 2 - 1
    # Later frames are the first one shifted right by 2 px per frame: a real motion for RAFT to look at.
    return torch.cat([torch.roll(base, shifts=2 * t, dims=-1) for t in range(length)], dim=1)


# ---------------------------------------------------------------------------------------------------------------
# Layouts


def test_raft_layout_matches_official_manifest(reference_dir):
    manifest = _manifest(reference_dir, "propainter_raft_things")
    assert _shapes(RAFT().state_dict(), prefix="module.") == manifest


def test_flow_completion_layout_matches_official_manifest(reference_dir):
    manifest = _manifest(reference_dir, "propainter_recurrent_flow_completion")
    assert _shapes(RecurrentFlowCompleteNet().state_dict()) == manifest


# ---------------------------------------------------------------------------------------------------------------
# Loading


def test_load_raft_official_dataparallel_file(raft, raft_file):
    _, state = raft_file
    loaded = raft.state_dict()
    assert set(loaded) == set(state)
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key
    assert not raft.training  # BatchNorm must use the stored statistics
    assert int(loaded["cnet.norm1.num_batches_tracked"]) == 1234


def test_load_raft_without_prefix(tmp_path, raft_file):
    _, state = raft_file
    path = tmp_path / "raft_plain.pth"
    torch.save(state, path)
    assert torch.equal(load_raft(path).state_dict()["update_block.mask.2.bias"], state["update_block.mask.2.bias"])


def test_load_flow_completion(flow_net, flow_net_file):
    _, state = flow_net_file
    loaded = flow_net.state_dict()
    assert all(torch.equal(loaded[key], value) for key, value in state.items())
    assert not flow_net.training


def test_missing_and_unexpected_keys_name_the_file_and_keys(tmp_path, raft_file):
    _, state = raft_file
    broken = {("module." + key): value for key, value in state.items() if key != "fnet.conv1.weight"}
    broken["module.extra.weight"] = torch.zeros(1)
    path = tmp_path / "raft-broken.pth"
    torch.save(broken, path)
    with pytest.raises(ModelFileError, match="raft-broken.pth") as info:
        load_raft(path)
    assert "fnet.conv1.weight" in str(info.value) and "extra.weight" in str(info.value)


def test_wrong_shape_is_reported(tmp_path, flow_net_file):
    _, state = flow_net_file
    broken = dict(state)
    broken["feat_prop_module.fusion.weight"] = torch.zeros(128, 128, 1, 1)
    path = tmp_path / "flow_shape.pth"
    torch.save(broken, path)
    with pytest.raises(ModelFileError, match=r"feat_prop_module\.fusion\.weight: \(128, 128, 1, 1\)"):
        load_flow_completion(path)


def test_wrong_family_and_corrupt_files(tmp_path, raft_file, flow_net_file):
    with pytest.raises(ModelFileError, match="raft"):
        load_raft(flow_net_file[0])
    with pytest.raises(ModelFileError, match="flow completion"):
        load_flow_completion(raft_file[0])
    truncated = tmp_path / "recurrent_flow_completion.pth"
    truncated.write_bytes(flow_net_file[0].read_bytes()[:5000])
    with pytest.raises(ModelFileError, match="recurrent_flow_completion.pth"):
        load_flow_completion(truncated)
    with pytest.raises(ModelFileError, match="not found"):
        load_raft(tmp_path / "missing.pth")


# ---------------------------------------------------------------------------------------------------------------
# RAFT behaviour


def test_correlation_lookup_order_and_values():
    gen = torch.Generator().manual_seed(3)
    fmap1 = torch.randn(1, 8, 16, 16, generator=gen)
    fmap2 = torch.randn(1, 8, 16, 16, generator=gen)
    corr = CorrBlock(fmap1, fmap2, num_levels=2, radius=1)
    coords = torch.zeros(1, 2, 16, 16)
    x, y = 5, 9
    coords[0, 0], coords[0, 1] = float(x), float(y)  # every pixel looks around (x=5, y=9)
    out = corr(coords)
    assert out.shape == (1, 2 * 9, 16, 16) and out.dtype == torch.float32
    pixel = (3, 4)  # (row, column) of the query pixel in fmap1
    query = fmap1[0, :, pixel[0], pixel[1]]
    for a, dx in enumerate((-1, 0, 1)):
        for b, dy in enumerate((-1, 0, 1)):
            expected = torch.dot(query, fmap2[0, :, y + dy, x + dx]) / 8 ** 0.5
            # Channel a*3+b: the x offset varies slowest, as in the reference lookup.
            torch.testing.assert_close(out[0, a * 3 + b, pixel[0], pixel[1]], expected, rtol=1e-5, atol=1e-5)


def test_convex_upsampling_of_constant_flow_is_eight_times_flow():
    flow = torch.empty(1, 2, 3, 4)
    flow[:, 0], flow[:, 1] = 0.5, -1.25
    mask = torch.randn(1, 9 * 64, 3, 4)
    up = RAFT.upsample_flow(flow, mask)
    assert up.shape == (1, 2, 24, 32)
    # Interior pixels mix 9 equal values; border pixels also see the zero padding, so check the interior only.
    torch.testing.assert_close(up[0, 0, 8:16, 8:24], torch.full((8, 16), 4.0))
    torch.testing.assert_close(up[0, 1, 8:16, 8:24], torch.full((8, 16), -10.0))
    assert not torch.allclose(up[0, 0, :8], torch.full((8, 32), 4.0))  # the border does see the padding


def test_raft_forward_shapes_determinism_and_modes(raft):
    frames = _frames(1, 2, seed=4)
    with torch.no_grad():
        low, up = raft(frames[:, 0], frames[:, 1], iters=2)
        predictions = raft(frames[:, 0], frames[:, 1], iters=2, test_mode=False)
    assert low.shape == (1, 2, SIZE // 8, SIZE // 8) and up.shape == (1, 2, SIZE, SIZE)
    assert torch.isfinite(up).all() and up.abs().max() > 0
    # A second run gives bit-identical flow (same result in both modes).
    assert len(predictions) == 2 and torch.equal(predictions[-1], up)


def test_bidirectional_flow_matches_pairwise_calls(raft):
    frames = _frames(2, 2, seed=5)
    forward, backward = compute_bidirectional_flow(raft, frames, iters=1)
    assert forward.shape == backward.shape == (2, 1, 2, SIZE, SIZE)
    with torch.no_grad():
        _, expected_forward = raft(frames[1:, 0], frames[1:, 1], iters=1)
        _, expected_backward = raft(frames[1:, 1], frames[1:, 0], iters=1)
    torch.testing.assert_close(forward[1:, 0], expected_forward, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(backward[1:, 0], expected_backward, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(forward[1], backward[1])


@pytest.mark.parametrize("size", [(60, 64), (64, 56)])
def test_raft_rejects_bad_sizes(raft, size):
    image = torch.zeros(1, 3, *size)
    with pytest.raises(InputError, match="RAFT"):
        raft(image, image, iters=1)


# ---------------------------------------------------------------------------------------------------------------
# Flow completion behaviour


def _flow_inputs(length, seed):
    gen = torch.Generator().manual_seed(seed)
    flows = torch.randn(1, length - 1, 2, SIZE, SIZE, generator=gen) * 3
    masks = torch.zeros(1, length, 1, SIZE, SIZE)
    masks[..., 16:40, 20:44] = 1.0
    return (flows, -flows), masks


def test_alignment_with_initial_offsets_is_half_a_plain_conv(monkeypatch):
    # Fresh alignment: zero offsets and sigmoid(0) = 0.5 masks, so it equals 0.5 * conv2d (+ bias).
    monkeypatch.setenv(deform_conv.NO_TORCHVISION_ENV, "1")
    torch.manual_seed(0)
    align = SecondOrderDeformableAlignment(32, 16, 3, padding=1, deform_groups=4)
    with torch.no_grad():
        align.bias.normal_()
        x = torch.randn(1, 32, 8, 8)
        out = align(x, torch.randn(1, 48, 8, 8))
        expected = 0.5 * torch.nn.functional.conv2d(x, align.weight, None, padding=1) + align.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_flow_completion_forward_and_edges(flow_net):
    (flows, _), masks = _flow_inputs(3, seed=6)
    with torch.no_grad():
        pred, edge = flow_net(flows, masks[:, :-1])
        pred2, _ = flow_net(flows, masks[:, :-1])
        pred3, edge3 = flow_net(flows, masks[:, :-1], return_edge=True)
    assert pred.shape == (1, 2, 2, SIZE, SIZE) and edge is None  # eval mode: no edges, as the reference
    assert torch.isfinite(pred).all() and torch.equal(pred, pred2) and torch.equal(pred, pred3)
    assert edge3.shape == (1, 2, 1, SIZE, SIZE) and edge3.min() >= 0 and edge3.max() <= 1


def test_bidirect_ignores_flow_inside_holes_and_combine_keeps_known_flow(flow_net):
    flows_bi, masks = _flow_inputs(3, seed=7)
    with torch.no_grad():
        pred_bi, edges = flow_net.forward_bidirect_flow(flows_bi, masks)
        # Garbage inside the holes must not matter: the network only sees flow outside them.
        noisy = tuple(f + 100 * m for f, m in zip(flows_bi, (masks[:, :-1], masks[:, 1:])))
        pred_noisy, _ = flow_net.forward_bidirect_flow(noisy, masks)
    assert edges == [None, None]
    for a, b in zip(pred_bi, pred_noisy):
        assert a.shape == (1, 2, 2, SIZE, SIZE)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)

    forward, backward = flow_net.combine_flow(flows_bi, pred_bi, masks)
    hole_f, hole_b = masks[:, :-1].bool().expand_as(forward), masks[:, 1:].bool().expand_as(backward)
    assert torch.equal(forward[~hole_f], flows_bi[0][~hole_f])
    assert torch.equal(forward[hole_f], pred_bi[0][hole_f])
    assert torch.equal(backward[~hole_b], flows_bi[1][~hole_b])
    assert torch.equal(backward[hole_b], pred_bi[1][hole_b])


def test_flow_completion_rejects_bad_shapes(flow_net):
    with pytest.raises(InputError, match="multiple of 8"):
        flow_net(torch.zeros(1, 2, 2, 60, 64), torch.zeros(1, 2, 1, 60, 64))
    with pytest.raises(InputError, match="masks"):
        flow_net(torch.zeros(1, 2, 2, 64, 64), torch.zeros(1, 3, 1, 64, 64))
