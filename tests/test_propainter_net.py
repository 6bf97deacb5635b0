"""ProPainter InpaintGenerator: official layout, loading, forward, image propagation, warping."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from diffueraser_core.errors import InputError, ModelFileError
from diffueraser_core.models.propainter import InpaintGenerator, SparseWindowAttention, load_propainter
from diffueraser_core.models.warping import fb_consistency_check, flow_warp

BUFFER_SUFFIX = "attention.valid_ind_rolled"


@pytest.fixture(scope="module")
def manifest(reference_dir):
    return json.loads((reference_dir / "propainter_ProPainter.json").read_text())


@pytest.fixture(scope="module")
def generator():
    torch.manual_seed(0)
    return InpaintGenerator().eval()


@pytest.fixture(scope="module")
def checkpoint(generator, tmp_path_factory):
    path = tmp_path_factory.mktemp("propainter") / "ProPainter.pth"
    torch.save(generator.state_dict(), path)
    return path


def test_state_dict_matches_official_manifest(generator, manifest):
    state = generator.state_dict()
    assert list(state) == list(manifest["tensors"])
    for name, shape in manifest["tensors"].items():
        assert list(state[name].shape) == shape, name
        expected_dtype = torch.int64 if name.endswith(BUFFER_SUFFIX) else torch.float32
        assert state[name].dtype == expected_dtype, name
    assert sum(name.endswith(BUFFER_SUFFIX) for name in state) == 8


def _expected_rolled_indices(window=(5, 9)):
    # Written from the definition: four shifted copies of a window, each minus the corner block that overlaps
    # the window itself (rows/cols measured with expand = ceil(window / 2)).
    wh, ww = window
    eh, ew = (wh + 1) // 2, (ww + 1) // 2
    kept = []
    for copy, (top, left) in enumerate(((True, True), (True, False), (False, True), (False, False))):
        for r in range(wh):
            for c in range(ww):
                in_rows = r < wh - eh if top else r >= eh
                in_cols = c < ww - ew if left else c >= ew
                if not (in_rows and in_cols):
                    kept.append(copy * wh * ww + r * ww + c)
    return kept


def test_valid_ind_rolled_buffers_are_the_official_values(generator):
    expected = _expected_rolled_indices()
    assert len(expected) == 148
    for name, buffer in generator.state_dict().items():
        if name.endswith(BUFFER_SUFFIX):
            assert buffer.tolist() == expected, name


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return load_propainter(checkpoint)


def test_random_checkpoint_loads_with_identical_tensors(generator, loaded):
    assert not loaded.training
    reference = generator.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, reference[name]), name


def _clip(height=64, width=32, frames=4, local=2, seed=1):
    gen = torch.Generator().manual_seed(seed)
    masked_frames = torch.rand(1, frames, 3, height, width, generator=gen) * 2 - 1
    masks = torch.zeros(1, frames, 1, height, width)
    masks[..., 4:20, 8:24] = 1  # hole only in the top token window: both attention paths run
    masked_frames = masked_frames * (1 - masks)
    updated = masks.clone()
    updated[..., 4:8, :] = 0
    flows = tuple(torch.randn(1, local - 1, 2, height, width, generator=gen) for _ in range(2))
    return masked_frames, flows, masks, updated


def test_forward_tiny_clip_is_finite_deterministic_and_shape_preserving(generator, loaded):
    masked_frames, flows, masks, updated = _clip()
    with torch.no_grad():
        out = generator(masked_frames, flows, masks, updated, num_local_frames=2)
        out_loaded = loaded(masked_frames, flows, masks, updated, num_local_frames=2)
    assert out.shape == (1, 2, 3, 64, 32)
    assert torch.isfinite(out).all()
    assert out.abs().max() <= 1.0
    assert out.std() > 0
    assert torch.equal(out, out_loaded)


def test_forward_rejects_bad_sizes_and_dilation(generator):
    masked_frames, flows, masks, updated = _clip()
    with pytest.raises(InputError, match="t_dilation 3"):
        generator(masked_frames, flows, masks, updated, num_local_frames=2, t_dilation=3)
    with pytest.raises(InputError, match="62x32"):
        generator(masked_frames[..., :62, :], flows, masks[..., :62, :], updated[..., :62, :], 2)
    with pytest.raises(InputError, match="backward flows"):
        generator(masked_frames, (flows[0], flows[1][:, :, :1]), masks, updated, 2)


def _naive_sparse_attention(module, x, mask, frame_index):
    """Straightforward (slow) version of the reference algorithm: roll the key map four ways, per window build
    the key set, explicit softmax."""
    b, t, h, w, c = x.shape
    wh, ww = module.window_size
    eh, ew = module.expand_size
    heads, hd = module.num_heads, c // module.num_heads
    rows, cols = math.ceil(h / wh), math.ceil(w / ww)
    ph, pw = rows * wh, cols * ww
    x = F.pad(x, (0, 0, 0, pw - w, 0, ph - h))
    mask = F.pad(mask, (0, 0, 0, pw - w, 0, ph - h))
    q, k, v = module.query(x), module.key(x), module.value(x)
    pooled = module.pool_layer(x.reshape(b * t, ph, pw, c).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    pooled = pooled.reshape(b, t, -1, c)
    pk, pv = module.key(pooled), module.value(pooled)
    shifts = ((-eh, -ew), (-eh, ew), (eh, -ew), (eh, ew))
    out = torch.zeros_like(q)
    for bi in range(b):
        for r in range(rows):
            for cc in range(cols):
                ys, xs = slice(r * wh, (r + 1) * wh), slice(cc * ww, (cc + 1) * ww)
                has_hole = mask[bi, :, ys, xs].sum() > 0
                for head in range(heads):
                    hs = slice(head * hd, (head + 1) * hd)
                    if has_hole:
                        keys, values = [], []
                        for f in frame_index.tolist():
                            keys.append(k[bi, f, ys, xs, hs].reshape(-1, hd))
                            values.append(v[bi, f, ys, xs, hs].reshape(-1, hd))
                            rolled_k = torch.cat([torch.roll(k[bi, f], s, (0, 1))[ys, xs, hs].reshape(-1, hd)
                                                  for s in shifts])
                            rolled_v = torch.cat([torch.roll(v[bi, f], s, (0, 1))[ys, xs, hs].reshape(-1, hd)
                                                  for s in shifts])
                            keys.append(rolled_k[module.valid_ind_rolled])
                            values.append(rolled_v[module.valid_ind_rolled])
                            keys.append(pk[bi, f, :, hs])
                            values.append(pv[bi, f, :, hs])
                        keys, values = torch.cat(keys), torch.cat(values)
                        query = q[bi, :, ys, xs, hs].reshape(-1, hd)
                        weights = torch.softmax(query @ keys.T / math.sqrt(hd), dim=-1)
                        out[bi, :, ys, xs, hs] = (weights @ values).view(t, wh, ww, hd)
                    else:
                        for f in range(t):
                            query = q[bi, f, ys, xs, hs].reshape(-1, hd)
                            key = k[bi, f, ys, xs, hs].reshape(-1, hd)
                            weights = torch.softmax(query @ key.T / math.sqrt(hd), dim=-1)
                            out[bi, f, ys, xs, hs] = (weights @ v[bi, f, ys, xs, hs].reshape(-1, hd)).view(wh, ww, hd)
    return module.proj(out[:, :, :h, :w])


def test_sparse_window_attention_matches_naive_reference_algorithm():
    torch.manual_seed(3)
    # float64: the two algorithms sum in different orders, and with weights this large float32 rounding alone
    # reaches ~2e-5 on some CPUs' kernels; in float64 any real difference still shows far above rounding
    module = SparseWindowAttention(dim=16, num_heads=2).eval().double()
    with torch.no_grad():
        for param in module.parameters():
            param.normal_(0, 0.3)
        x = torch.randn(2, 4, 7, 12, 16, dtype=torch.float64)
        mask = torch.zeros(2, 3, 7, 12, 1, dtype=torch.float64)
        mask[0, 1, 2, 3] = 1  # batch 0: hole in window (0, 0) only
        mask[1, 2, 6, 11] = 1  # batch 1: hole in the padded bottom-right window only
        frame_index = torch.tensor([1, 3])
        fast = module(x, mask, frame_index)
        slow = _naive_sparse_attention(module, x, mask, frame_index)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)


def test_img_propagation_fills_from_neighbours_and_keeps_known_pixels(generator):
    gen = torch.Generator().manual_seed(5)
    frames = torch.rand(1, 3, 3, 16, 20, generator=gen)
    masks = torch.zeros(1, 3, 1, 16, 20)
    masks[0, 1, :, 4:10, 5:12] = 1  # hole in the middle frame only, neighbours know those pixels
    masked = frames * (1 - masks)
    zero = torch.zeros(1, 2, 2, 16, 20)
    out, new_masks = generator.img_propagation(masked, (zero, zero), masks)
    assert out.shape == masked.shape and new_masks.shape == masks.shape
    # backward pass runs first: the hole is filled from the next frame (zero flow = same position)
    torch.testing.assert_close(out[0, 1, :, 4:10, 5:12], frames[0, 2, :, 4:10, 5:12], rtol=0, atol=0)
    assert new_masks.sum() == 0

    # random, inconsistent flows: whatever gets filled, known pixels stay bit-identical and holes never grow
    flows = tuple(torch.randn(1, 2, 2, 16, 20, generator=gen) * 3 for _ in range(2))
    masks[0, 0, :, 0:6, 0:6] = 1
    masked = frames * (1 - masks)
    out, new_masks = generator.img_propagation(masked, flows, masks)
    known = (masks == 0).expand_as(masked)
    assert torch.equal(out[known], masked[known])
    assert (new_masks <= masks).all()
    assert new_masks.sum() < masks.sum()


def test_flow_warp_zero_flow_is_identity_and_shift_moves_pixels():
    x = torch.randn(2, 3, 6, 7)
    zero = torch.zeros(2, 6, 7, 2)
    for mode in ("bilinear", "nearest"):
        torch.testing.assert_close(flow_warp(x, zero, interpolation=mode), x, rtol=0, atol=1e-6)
    right = zero.clone()
    right[..., 0] = 1  # sample one pixel to the right
    warped = flow_warp(x, right)
    torch.testing.assert_close(warped[..., :-1], x[..., 1:], rtol=0, atol=1e-5)
    assert torch.equal(warped[..., -1], torch.zeros_like(warped[..., -1]))
    with pytest.raises(InputError, match="flow_warp"):
        flow_warp(x, torch.zeros(2, 5, 7, 2))


def test_fb_consistency_check_accepts_inverse_flows_only():
    forward = torch.zeros(1, 2, 8, 8)
    forward[:, 0] = 2.0
    assert fb_consistency_check(forward, -forward)[..., :, :6].eq(1).all()  # inside the frame after the move
    assert fb_consistency_check(forward, forward).eq(0).all()
    assert fb_consistency_check(torch.zeros(1, 2, 8, 8), torch.zeros(1, 2, 8, 8)).eq(1).all()


def test_corrupt_and_foreign_files_raise_model_file_error(tmp_path):
    corrupt = tmp_path / "ProPainter.pth"
    corrupt.write_bytes(b"PK\x03\x04 definitely not a torch zip")
    with pytest.raises(ModelFileError, match="ProPainter.pth"):
        load_propainter(corrupt)

    foreign = tmp_path / "raft-things.pth"
    torch.save({"encoder.layers.0.weight": torch.zeros(64, 5, 3, 3), "fnet.conv1.weight": torch.zeros(1)}, foreign)
    with pytest.raises(ModelFileError, match=r"raft-things\.pth.*missing.*'encoder\.layers\.0\.bias'.*fnet\.conv1"):
        load_propainter(foreign)
