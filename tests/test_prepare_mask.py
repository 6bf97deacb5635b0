"""DiffuEraser Prepare Mask: a mask drawn in any colour gives the same hole (issue 15 item 6), and its one
mask_dilation is what the Prior, the Sampler and the Blend apply (issue 13: one setting, not three)."""

import json
import pathlib

import pytest
import torch

import nodes as pack
from diffueraser_core.errors import InputError
from nodes.common import PreparedMask

REPO = pathlib.Path(__file__).resolve().parents[1]
PREPARE = pack.NODE_CLASS_MAPPINGS["DiffuEraserPrepareMask"]
BLEND = pack.NODE_CLASS_MAPPINGS["DiffuEraserBlend"]
MASK_VIDEO_WORKFLOWS = ("DiffuEraser - remove an object from a video.json", "DiffuEraser - long video.json")
SHIPPED = sorted((REPO / "example_workflows").glob("*.json"))


def _hole(frames=3, h=40, w=48):
    hole = torch.zeros(frames, h, w, dtype=torch.bool)
    hole[:, 10:25, 12:30] = True
    hole[1, 5:8, 40:44] = True  # a second blob on one frame only
    return hole


def _mask_video(hole, rgb):
    """A mask video as GetVideoComponents gives it: ``rgb`` (0..255) on black, lightly noisy as a lossy codec."""
    color = torch.tensor(rgb, dtype=torch.float32) / 255.0
    images = hole.unsqueeze(-1).float() * color
    noise = torch.rand(images.shape, generator=torch.Generator().manual_seed(0)) * (6 / 255)
    return (images + noise).clamp(0, 1)


def _node_widgets(workflow, node_type):
    nodes = [n for n in workflow["nodes"] if n["type"] == node_type]
    assert len(nodes) == 1, (node_type, len(nodes))
    spec = PREPARE.INPUT_TYPES()
    names = [name for section in ("required", "optional") for name, (typ, *_) in spec.get(section, {}).items()
             if typ in ("INT", "FLOAT", "BOOLEAN", "STRING", "COMBO")]
    return dict(zip(names, nodes[0]["widgets_values"]))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_workflows_build_the_mask_with_prepare_mask_not_one_channel(path):
    workflow = json.loads(path.read_text())
    types = [n["type"] for n in workflow["nodes"]]
    assert "ImageToMask" not in types  # one channel: a green or blue mask would be an empty hole
    assert types.count("DiffuEraserPrepareMask") == 1


@pytest.mark.parametrize("name", MASK_VIDEO_WORKFLOWS)
def test_green_and_blue_masks_give_the_white_hole_through_the_shipped_conversion(name):
    workflow = json.loads((REPO / "example_workflows" / name).read_text())
    prepare = next(n for n in workflow["nodes"] if n["type"] == "DiffuEraserPrepareMask")
    linked = {i["name"] for i in prepare["inputs"] if i["link"] is not None}
    assert linked == {"mask_video"}  # the mask video's frames go straight into the conversion
    widgets = _node_widgets(workflow, "DiffuEraserPrepareMask")
    hole = _hole()
    results = {}
    for label, rgb in {"white": (255, 255, 255), "red": (255, 0, 0), "green": (0, 255, 0),
                       "blue": (0, 0, 255)}.items():
        prepared, preview = PREPARE.execute(mask_video=_mask_video(hole, rgb), **widgets)
        assert isinstance(prepared, PreparedMask) and prepared.dilation == widgets["mask_dilation"]
        results[label] = prepared.holes
        assert torch.equal(preview.bool(), prepared.holes)
    for label, holes in results.items():
        assert torch.equal(holes, hole), label


def test_exactly_one_mask_source_and_an_empty_mask_is_an_error():
    with pytest.raises(InputError, match=r"DiffuEraser Prepare Mask: connect exactly one of mask_video and mask"):
        PREPARE.execute(mask_dilation=8, threshold=0.5)
    with pytest.raises(InputError, match=r"connect exactly one"):
        PREPARE.execute(mask_dilation=8, threshold=0.5, mask_video=torch.zeros(1, 8, 8, 3), mask=torch.ones(1, 8, 8))
    with pytest.raises(InputError, match=r"DiffuEraser Prepare Mask: the mask is empty"):
        PREPARE.execute(mask_dilation=8, threshold=0.5, mask_video=torch.zeros(2, 8, 8, 3))
    (prepared, _) = PREPARE.execute(mask_dilation=3, threshold=0.5, mask=torch.ones(8, 8))
    assert prepared.holes.shape == (1, 8, 8) and prepared.dilation == 3


def test_prepared_dilation_is_the_one_the_blend_applies_whatever_its_widget():
    hole = _hole()
    g = torch.Generator().manual_seed(1)
    images = torch.rand(*hole.shape, 3, generator=g)
    generated = torch.rand(*hole.shape, 3, generator=g)
    (prepared, _) = PREPARE.execute(mask_dilation=2, threshold=0.5, mask=hole.float())
    (with_prepared,) = BLEND.execute(images=images, generated=generated, mask=prepared, mask_dilation=8, feather=5)
    (with_plain,) = BLEND.execute(images=images, generated=generated, mask=hole.float(), mask_dilation=2, feather=5)
    (with_plain_8,) = BLEND.execute(images=images, generated=generated, mask=hole.float(), mask_dilation=8,
                                    feather=5)
    assert torch.equal(with_prepared, with_plain)
    assert not torch.equal(with_prepared, with_plain_8)  # the widget really is ignored, not coincidentally equal
