"""Staggered window schedule (reference section 5) and the crossfade merge."""

import pytest
import torch

from diffueraser_core.errors import InputError
from diffueraser_core.windows import (
    DEFAULT_WINDOW_LENGTH,
    WindowAccumulator,
    crossfade_weights,
    window_lists,
    windows_for_step,
)

LENGTHS = [1, 21, 22, 23, 44, 45, 250]


def covered_counts(windows, n):
    counts = [0] * n
    for start, stop in windows:
        for f in range(start, stop):
            counts[f] += 1
    return counts


@pytest.mark.parametrize("n", LENGTHS)
def test_every_frame_covered_on_every_step(n):
    for step in range(6):
        windows = windows_for_step(step, n)
        assert min(covered_counts(windows, n)) >= 1
        for start, stop in windows:
            assert 0 <= start < stop <= n
            assert stop - start == min(n, DEFAULT_WINDOW_LENGTH)
        starts = [s for s, _ in windows]
        assert starts == sorted(starts) and len(set(windows)) == len(windows)


@pytest.mark.parametrize("n", LENGTHS)
def test_list_a_and_b_follow_the_reference_layout(n):
    list_a, list_b = window_lists(n)
    if n <= DEFAULT_WINDOW_LENGTH:
        assert list_a == list_b == [(0, n)]
        return
    # A: starts 0, 17, 34, ... below n-22, then the tail; B: [0,22), 11, 28, ... below n-22, then the tail.
    assert [s for s, _ in list_a[:-1]] == list(range(0, n - 22, 17))
    assert list_b[0] == (0, 22)
    assert [s for s, _ in list_b[1:-1]] == list(range(11, n - 22, 17))
    assert list_a[-1] == list_b[-1] == (n - 22, n)


def test_known_lists():
    assert window_lists(23) == ([(0, 22), (1, 23)], [(0, 22), (1, 23)])
    assert window_lists(34) == ([(0, 22), (12, 34)], [(0, 22), (11, 33), (12, 34)])
    assert window_lists(45) == ([(0, 22), (17, 39), (23, 45)], [(0, 22), (11, 33), (23, 45)])


def test_steps_alternate_and_b_is_shifted_by_half_a_window():
    list_a, list_b = window_lists(250)
    assert windows_for_step(0, 250) == windows_for_step(2, 250) == list_a
    assert windows_for_step(1, 250) == windows_for_step(3, 250) == list_b
    assert list_a != list_b
    interior_a = [s for s, _ in list_a[:-1]]
    interior_b = [s for s, _ in list_b[1:-1]]
    shift = DEFAULT_WINDOW_LENGTH // 2
    assert interior_b == [s + shift for s in interior_a][: len(interior_b)]
    # A seam (start of an A window past 0) lies strictly inside some B window, and vice versa.
    for start in interior_a[1:]:
        assert any(s < start < e - 1 for s, e in list_b)


def test_custom_length_and_overlap():
    assert window_lists(10, length=4, overlap=1) == (
        [(0, 4), (3, 7), (6, 10)],
        [(0, 4), (2, 6), (5, 9), (6, 10)],
    )
    # length 1: list B does not run the first window twice
    assert window_lists(3, length=1) == ([(0, 1), (1, 2), (2, 3)], [(0, 1), (1, 2), (2, 3)])
    for bad in [dict(length=0), dict(length=4, overlap=4), dict(length=4, overlap=-1)]:
        with pytest.raises(InputError):
            window_lists(10, **bad)
    with pytest.raises(InputError, match="at least 1 frame"):
        window_lists(0)


def test_crossfade_weights_values():
    torch.testing.assert_close(crossfade_weights(5), torch.tensor([1 / 6, 2 / 6, 3 / 6, 4 / 6, 1.0]))
    torch.testing.assert_close(
        crossfade_weights(5, overwrite_last_overlap=False), torch.tensor([1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6])
    )
    assert crossfade_weights(0).numel() == 0


def merge_oracle(n, windows, results, overwrite_last_overlap=True):
    """Section 5 written frame by frame in float64."""
    value = [None] * n
    seen = [False] * n
    for (start, stop), res in zip(windows, results):
        frames = list(range(start, stop))
        m = sum(seen[f] for f in frames)
        for q, f in enumerate(frames):
            if q < m:
                r = (q + 1) / (m + 1)
                if overwrite_last_overlap and q == m - 1:
                    r = 1.0
                value[f] = value[f] * (1 - r) + res[q].double() * r
            else:
                value[f] = res[q].double()
            seen[f] = True
    return torch.stack(value)


@pytest.mark.parametrize("n", [23, 45, 100])
@pytest.mark.parametrize("overwrite", [True, False])
def test_accumulator_matches_oracle(n, overwrite):
    gen = torch.Generator().manual_seed(n)
    for step in range(2):
        windows = windows_for_step(step, n)
        results = [torch.randn(e - s, 2, 3, 3, generator=gen) for s, e in windows]
        acc = WindowAccumulator(n, overwrite_last_overlap=overwrite)
        for (s, e), res in zip(windows, results):
            acc.add(s, e, res)
        out = acc.result()
        assert out.shape == (n, 2, 3, 3) and out.dtype == torch.float32 and out.device.type == "cpu"
        torch.testing.assert_close(out.double(), merge_oracle(n, windows, results, overwrite), atol=1e-6, rtol=0)


def test_accumulator_crossfade_values_on_constant_windows():
    acc = WindowAccumulator(39)
    acc.add(0, 22, torch.zeros(22, 1))
    acc.add(17, 39, torch.ones(22, 1))
    out = acc.result()[:, 0]
    assert torch.all(out[:17] == 0) and torch.all(out[22:] == 1)
    torch.testing.assert_close(out[17:22], torch.tensor([1 / 6, 2 / 6, 3 / 6, 4 / 6, 1.0]))
    blended = WindowAccumulator(39, overwrite_last_overlap=False)
    blended.add(0, 22, torch.zeros(22, 1))
    blended.add(17, 39, torch.ones(22, 1))
    assert blended.result()[21, 0].item() == pytest.approx(5 / 6)


def test_accumulator_rejects_bad_use():
    acc = WindowAccumulator(30)
    with pytest.raises(InputError, match="not covered"):
        acc.result()
    acc.add(5, 10, torch.zeros(5, 1))
    with pytest.raises(InputError, match="leading frames"):
        acc.add(0, 8, torch.zeros(8, 1))  # covered frames 5..7 are not a prefix of [0, 8)
    with pytest.raises(InputError, match="has 5 frames"):
        acc.add(10, 15, torch.zeros(4, 1))
    with pytest.raises(InputError, match="outside"):
        acc.add(25, 31, torch.zeros(6, 1))
    with pytest.raises(InputError, match="25 of 30 frames"):
        acc.result()


def test_accumulator_keeps_requested_dtype_and_overlap_zero():
    acc = WindowAccumulator(8, dtype=torch.float64)
    for s, e in window_lists(8, length=4, overlap=0)[0]:
        acc.add(s, e, torch.full((e - s, 1), float(s), dtype=torch.float16))
    out = acc.result()
    assert out.dtype == torch.float64
    assert out[:, 0].tolist() == [0, 0, 0, 0, 4, 4, 4, 4]
