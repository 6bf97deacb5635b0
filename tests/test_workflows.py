"""Every example_workflows/*.json (and every workflow saved with an earlier release) loads against the pack's
declarations and the core nodes it uses, and the shipped ones teach: stage groups, a Note with numbered steps,
model download metadata on every loader, no node hidden under another at load, one screen wide.

Core node declarations below are copied by hand from ComfyUI a125cd84 (nodes.py, comfy_extras/nodes_video.py,
comfy_extras/nodes_mask.py) and, for the SAM3 nodes, from current ComfyUI's comfy_extras/nodes_sam3.py: socket
inputs, outputs and widgets in the order the frontend stores widgets_values.
"""

import json
import pathlib

import pytest

import nodes as pack
from nodes import folders

REPO = pathlib.Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((REPO / "example_workflows").glob("*.json"))
# Workflows saved with earlier releases (tests/data/old_workflows/README.md): they must keep loading unchanged.
OLD_WORKFLOWS = sorted((REPO / "tests" / "data" / "old_workflows").glob("*.json"))
SOCKET_TYPES_OF_WIDGETS = {"INT", "FLOAT", "STRING", "BOOLEAN"}

# type -> (socket inputs {name: type}, outputs [type], widgets [(name, allowed values or None)])
CORE_NODES = {
    "LoadVideo": ({}, ["VIDEO"], [("file", None), ("upload", {"image"})]),
    "GetVideoComponents": ({"video": "VIDEO"}, ["IMAGE", "AUDIO", "FLOAT"], []),
    "ImageToMask": ({"image": "IMAGE"}, ["MASK"], [("channel", {"red", "green", "blue", "alpha"})]),
    "LoadImage": ({}, ["IMAGE", "MASK"], [("image", None), ("upload", {"image"})]),
    "VAELoader": ({}, ["VAE"], [("vae_name", None)]),
    "CLIPLoader": ({}, ["CLIP"], [("clip_name", None), ("type", {"stable_diffusion"}), ("device", {"default", "cpu"})]),
    "CLIPTextEncode": ({"clip": "CLIP"}, ["CONDITIONING"], [("text", None)]),
    "VAEDecode": ({"samples": "LATENT", "vae": "VAE"}, ["IMAGE"], []),
    "CreateVideo": ({"images": "IMAGE", "audio": "AUDIO", "fps": "FLOAT"}, ["VIDEO"], [("fps", None)]),
    "SaveVideo": ({"video": "VIDEO"}, [], [("filename_prefix", None), ("format", {"auto", "mp4"}),
                                           ("codec", {"auto", "h264"})]),
    "MaskToImage": ({"mask": "MASK"}, ["IMAGE"], []),
    "CheckpointLoaderSimple": ({}, ["MODEL", "CLIP", "VAE"], [("ckpt_name", None)]),
    "SAM3_VideoTrack": ({"images": "IMAGE", "model": "MODEL", "initial_mask": "MASK", "conditioning": "CONDITIONING"},
                        ["SAM3_TRACK_DATA"], [("detection_threshold", None), ("max_objects", None),
                                              ("detect_interval", None)]),
    "SAM3_TrackToMask": ({"track_data": "SAM3_TRACK_DATA"}, ["MASK"], [("object_indices", None)]),
    "Note": ({}, [], [("text", None)]),  # frontend-only node
}
LOADER_TYPES = {"VAELoader", "CLIPLoader", "CheckpointLoaderSimple", "DiffuEraserModelLoader",
                "DiffuEraserProPainterLoader"}
# LiteGraph draws a node's title bar above its pos: its box is [x, y - 30, w, h + 30].
TITLE_BAR_HEIGHT = 30
# "Readable without zooming past one screen width": the whole graph fits a 1920 px wide screen at 100%.
MAX_GRAPH_WIDTH = 1920
# Below this zoom the frontend draws neither titles nor widgets. Its canvas in a 1920x1080 window (frontend 1.27:
# right of a 64 px side bar, below a 76 px menu; seen in the browser test's screenshots).
MIN_READABLE_SCALE = 0.6
CANVAS = (1920 - 64, 1080 - 76)
CONTROL_AFTER_GENERATE = {"fixed", "increment", "decrement", "randomize"}


def _pack_widgets(cls):
    spec = cls.INPUT_TYPES()
    sockets, widgets = {}, []
    for section in ("required", "optional"):
        for name, (typ, *rest) in spec.get(section, {}).items():
            opts = rest[0] if rest else {}
            if typ == "COMBO":  # V3 schema: ("COMBO", {"options": [...]})
                widgets.append((name, list(opts["options"]), opts))
                sockets[name] = "COMBO"  # a widget may be linked
            elif typ in SOCKET_TYPES_OF_WIDGETS:
                widgets.append((name, typ, opts))
                sockets[name] = typ
            else:
                sockets[name] = typ
    return sockets, widgets


def _check_pack_widget_value(node_type, name, typ, opts, value):
    where = f"{node_type}.{name}={value!r}"
    if typ == "INT":
        assert isinstance(value, int) and not isinstance(value, bool), where
        assert opts.get("min", value) <= value <= opts.get("max", value), where
    elif typ == "FLOAT":
        assert isinstance(value, (int, float)) and not isinstance(value, bool), where
        assert opts.get("min", value) <= value <= opts.get("max", value), where
    elif typ == "BOOLEAN":
        assert isinstance(value, bool), where
    elif typ == "STRING":
        assert isinstance(value, str), where
    else:
        assert isinstance(value, str), where
        model_combo = node_type in ("DiffuEraserModelLoader", "DiffuEraserProPainterLoader")
        if not model_combo:
            assert value in typ, where


def _expected_widget_values(node_type, node):
    """[(name, validator)] in widgets_values order."""
    if node_type in CORE_NODES:
        return [(name, allowed) for name, allowed in CORE_NODES[node_type][2]]
    _, widgets = _pack_widgets(pack.NODE_CLASS_MAPPINGS[node_type])
    out = []
    for name, typ, opts in widgets:
        out.append((name, (typ, opts)))
        if opts.get("control_after_generate"):
            out.append((name + ":control_after_generate", CONTROL_AFTER_GENERATE))
    return out


@pytest.fixture(scope="module", params=[str(p.relative_to(REPO)) for p in WORKFLOWS + OLD_WORKFLOWS] or ["<none>"])
def workflow(request):
    if request.param == "<none>":
        pytest.fail("example_workflows/ has no .json file")
    with open(REPO / request.param, encoding="utf-8") as f:
        return json.load(f)


def test_old_workflows_are_kept():
    assert len(OLD_WORKFLOWS) >= 3


def test_the_workflows_ship_with_readable_titles_and_thumbnails():
    names = {p.stem for p in WORKFLOWS}
    assert {"DiffuEraser - remove an object from a video", "ProPainter - quick removal", "DiffuEraser - long video",
            "Make the mask with SAM3 (ComfyUI 0.19.3 or newer)"} <= names
    for path in WORKFLOWS:
        # the template browser shows the file name as the title and <name>.jpg as the card
        assert path.with_suffix(".jpg").is_file(), path.name
        assert path.with_suffix(".jpg").read_bytes()[:3] == b"\xff\xd8\xff"
    images = [p for p in REPO.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".gif", ".webp")
              and ".git" not in p.parts and ".venv" not in p.parts]
    assert sorted(images) == sorted(p.with_suffix(".jpg") for p in WORKFLOWS), "thumbnails are the only images"


def _box(node):
    x, y = node["pos"]
    w, h = node["size"]
    return x, y - TITLE_BAR_HEIGHT, x + w, y + h


def _overlap(a, b):
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.name for p in WORKFLOWS])
def test_shipped_layout_nothing_hidden_grouped_by_stage_one_screen_wide(path):
    workflow = json.loads(path.read_text())
    boxes = {n["id"]: _box(n) for n in workflow["nodes"]}
    for i, a in boxes.items():
        for j, b in boxes.items():
            assert i >= j or not _overlap(a, b), (path.name, i, j, a, b)
    groups = workflow["groups"]
    assert len(groups) >= 3
    for k, group in enumerate(groups):
        assert group["title"].startswith(f"{k + 1} - "), group["title"]  # numbered by stage, in order
        gx, gy, gw, gh = group["bounding"]
        for other in groups[k + 1:]:
            assert not _overlap((gx, gy, gx + gw, gy + gh), (other["bounding"][0], other["bounding"][1],
                                                             other["bounding"][0] + other["bounding"][2],
                                                             other["bounding"][1] + other["bounding"][3]))
    for node in workflow["nodes"]:
        if node["type"] == "Note":
            continue
        x0, y0, x1, y1 = boxes[node["id"]]
        inside = [g for g in groups if g["bounding"][0] <= x0 and x1 <= g["bounding"][0] + g["bounding"][2]
                  and g["bounding"][1] <= y0 and y1 <= g["bounding"][1] + g["bounding"][3]]
        assert len(inside) == 1, (path.name, node["type"], node["id"])
    xs = [b[0] for b in boxes.values()] + [b[2] for b in boxes.values()]
    assert max(xs) - min(xs) <= MAX_GRAPH_WIDTH, (path.name, max(xs) - min(xs))
    # the saved view shows every node on the canvas of a 1920x1080 window at a zoom with titles drawn
    view = workflow["extra"]["ds"]
    assert view["scale"] >= MIN_READABLE_SCALE
    for x0, y0, x1, y1 in boxes.values():
        sx0, sy0 = (x0 + view["offset"][0]) * view["scale"], (y0 + view["offset"][1]) * view["scale"]
        sx1, sy1 = (x1 + view["offset"][0]) * view["scale"], (y1 + view["offset"][1]) * view["scale"]
        assert 0 <= sx0 and sx1 <= CANVAS[0] and 0 <= sy0 and sy1 <= CANVAS[1], (path.name, x0, y0)


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.name for p in WORKFLOWS])
def test_shipped_note_has_numbered_steps_and_loaders_have_model_metadata(path):
    workflow = json.loads(path.read_text())
    notes = [n for n in workflow["nodes"] if n["type"] == "Note"]
    assert len(notes) == 1
    text = notes[0]["widgets_values"][0]
    for step in range(1, len(workflow["groups"]) + 1):
        assert f"\n{step}. " in text, (path.name, step)
    for node in workflow["nodes"]:
        if node["type"] in LOADER_TYPES:
            models = node["properties"].get("models")
            assert models, (path.name, node["type"])
            for model in models:
                assert set(model) == {"name", "url", "directory"}
                assert model["url"].startswith("https://") and model["url"].endswith(model["name"].split("/")[-1])
            names = {m["name"] for m in models}
            for value in node["widgets_values"]:
                if isinstance(value, str) and value.endswith((".safetensors", ".pth")):
                    assert value in names, (path.name, node["type"], value)


def test_ui_format_top_level(workflow):
    for key in ("last_node_id", "last_link_id", "nodes", "links", "version"):
        assert key in workflow
    assert workflow["last_node_id"] >= max(n["id"] for n in workflow["nodes"])
    assert workflow["last_link_id"] >= max(link[0] for link in workflow["links"])
    assert len({n["id"] for n in workflow["nodes"]}) == len(workflow["nodes"])


def test_node_types_and_widget_values(workflow):
    for node in workflow["nodes"]:
        node_type = node["type"]
        assert node_type in pack.NODE_CLASS_MAPPINGS or node_type in CORE_NODES, node_type
        expected = _expected_widget_values(node_type, node)
        values = node.get("widgets_values", [])
        assert len(values) == len(expected), (node_type, values, [n for n, _ in expected])
        for (name, check), value in zip(expected, values):
            if isinstance(check, tuple):
                _check_pack_widget_value(node_type, name, check[0], check[1], value)
            elif check is not None:
                assert value in check, (node_type, name, value)
            else:
                assert isinstance(value, (str, int, float)), (node_type, name, value)


def test_links_match_declared_sockets(workflow):
    by_id = {n["id"]: n for n in workflow["nodes"]}
    seen = set()
    for link_id, src, src_slot, dst, dst_slot, typ in workflow["links"]:
        s, d = by_id[src], by_id[dst]
        out = s["outputs"][src_slot]
        assert out["type"] == typ and link_id in out["links"]
        inp = d["inputs"][dst_slot]
        assert inp["link"] == link_id and typ in inp["type"].split(",")
        if d["type"] in CORE_NODES:
            declared = CORE_NODES[d["type"]][0]
        else:
            declared, _ = _pack_widgets(pack.NODE_CLASS_MAPPINGS[d["type"]])
        assert inp["name"] in declared and typ in declared[inp["name"]].split(","), (d["type"], inp["name"], typ)
        if s["type"] in CORE_NODES:
            assert CORE_NODES[s["type"]][1][src_slot] == typ
        else:
            assert pack.NODE_CLASS_MAPPINGS[s["type"]].RETURN_TYPES[src_slot] == typ
        assert inp["type"] in (declared[inp["name"]], typ)
        seen.add(link_id)
    for node in workflow["nodes"]:
        for inp in node.get("inputs", []):
            assert inp["link"] is None or inp["link"] in seen


def test_required_sockets_connected(workflow):
    for node in workflow["nodes"]:
        if node["type"] not in pack.NODE_CLASS_MAPPINGS:
            continue
        spec = pack.NODE_CLASS_MAPPINGS[node["type"]].INPUT_TYPES()["required"]
        linked = {i["name"] for i in node["inputs"] if i["link"] is not None}
        for name, (typ, *_) in spec.items():
            if typ != "COMBO" and typ not in SOCKET_TYPES_OF_WIDGETS:
                assert name in linked, (node["type"], name)


def test_model_names_are_the_official_layout(workflow, tmp_path, monkeypatch):
    """Model widget values are the official names, and the loaders offer them for the documented layout."""
    root = tmp_path / "models"
    for rel in ("diffuEraser/unet_main", "diffuEraser/brushnet"):
        d = root / "diffueraser" / rel
        d.mkdir(parents=True)
        (d / "config.json").write_text("{}")
        (d / "diffusion_pytorch_model.safetensors").write_bytes(b"x")
    (root / "diffueraser" / "pcm_sd15_smallcfg_2step_converted.safetensors").write_bytes(b"x")
    (root / "propainter").mkdir()
    for name in ("raft-things.pth", "recurrent_flow_completion.pth", "ProPainter.pth"):
        (root / "propainter" / name).write_bytes(b"x")
    monkeypatch.setenv(folders.MODELS_DIR_ENV, str(root))
    monkeypatch.delenv(folders.ALLOW_DOWNLOAD_ENV, raising=False)
    for node in workflow["nodes"]:
        if node["type"] in ("DiffuEraserModelLoader", "DiffuEraserProPainterLoader"):
            spec = pack.NODE_CLASS_MAPPINGS[node["type"]].INPUT_TYPES()["required"]
            combos = [(n, o["options"]) for n, (t, o) in spec.items() if t == "COMBO"]
            for (name, options), value in zip(combos, node["widgets_values"]):
                assert value in options, (node["type"], name, value, options)
                assert options[0] == value, "the official file should be the widget's default"
