"""Media matrix, the Blend node's float precision and the terminal progress bars."""

import io

import pytest
import torch

from diffueraser_core.blend import blend_images
from diffueraser_core.cli import _ProgressPrinter
from diffueraser_core.errors import InputError


def test_blend_keeps_untouched_float_values_bit_for_bit():
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(3, 64, 64, 3, generator=gen, dtype=torch.float32) * 1.4 - 0.1  # HDR-ish: > 1 and < 0
    images[0, 0, 0] = torch.tensor([0.123456789, 1.0000001, 3.5])  # values no 8-bit level holds
    generated = torch.rand(3, 64, 64, 3, generator=gen)
    mask = torch.zeros(3, 64, 64)
    mask[:, 30:40, 30:40] = 1.0
    out = blend_images(images, generated, mask, mask_dilation=2, feather=5)
    assert out.dtype == images.dtype and out.shape == images.shape
    far = torch.ones(64, 64, dtype=torch.bool)
    far[24:46, 24:46] = False
    assert torch.equal(out[:, far], images[:, far])  # bit for bit, no rounding, no clamping
    assert float(out.max()) > 1.0 and float(out.min()) < 0.0
    inside = out[:, 34, 34]
    expected = (generated[:, 34, 34] * 255).round() / 255
    assert torch.allclose(inside, expected, atol=1e-6)  # the hole holds the generated pixels


def test_blend_keeps_alpha_and_other_float_dtypes():
    images = torch.rand(2, 64, 64, 4, dtype=torch.float64)
    generated = torch.zeros(2, 64, 64, 3)
    mask = torch.zeros(64, 64)
    mask[10:20, 10:20] = 1.0
    out = blend_images(images, generated, mask, mask_dilation=0, feather=1)
    assert out.dtype == torch.float64 and torch.equal(out[..., 3], images[..., 3])
    assert torch.equal(out[:, 40:, 40:], images[:, 40:, 40:])
    bad = images.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(InputError, match="NaN/inf"):
        blend_images(bad, generated, mask)


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bars_on_a_terminal_and_plain_lines_elsewhere():
    term = FakeTerminal()
    bars = _ProgressPrinter(term, quiet=False)
    for done in range(1, 6):
        bars("prior", done, 5)
    for done in range(1, 4):
        bars("sampling", done, 3)
    text = term.getvalue()
    assert "[diffueraser] prior" in text and "[diffueraser] sampling" in text
    assert "5/5" in text and "3/3" in text and "step/s" in text and "job" in text
    assert "\r" in text  # bars redraw in place
    plain = io.StringIO()
    lines = _ProgressPrinter(plain, quiet=False)
    lines("prior", 1, 2)
    lines("prior", 2, 2)
    assert plain.getvalue() == "[diffueraser] prior: 1/2\n[diffueraser] prior: 2/2\n"
    quiet = io.StringIO()
    _ProgressPrinter(FakeTerminal(), quiet=True)("prior", 1, 1)
    assert quiet.getvalue() == ""


def test_blend_mask_of_another_aspect_ratio_is_refused():
    images = torch.rand(1, 64, 64, 3)
    with pytest.raises(InputError, match="another aspect ratio"):
        blend_images(images, images, torch.ones(1, 32, 64))
