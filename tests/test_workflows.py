"""Every workflows/*.json loads against the pack's declarations and the core nodes it uses.

Core node declarations below are copied by hand from ComfyUI a125cd84 (nodes.py, comfy_extras/nodes_video.py,
comfy_extras/nodes_mask.py): socket inputs, outputs and widgets in the order the frontend stores widgets_values.
"""

import json
import pathlib

import pytest

import nodes as pack
from nodes import folders

WORKFLOWS = sorted((pathlib.Path(__file__).resolve().parents[1] / "workflows").glob("*.json"))
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
    "Note": ({}, [], [("text", None)]),  # frontend-only node
}
CONTROL_AFTER_GENERATE = {"fixed", "increment", "decrement", "randomize"}


def _pack_widgets(cls):
    spec = cls.INPUT_TYPES()
    sockets, widgets = {}, []
    for section in ("required", "optional"):
        for name, (typ, *rest) in spec.get(section, {}).items():
            opts = rest[0] if rest else {}
            if isinstance(typ, list) or typ in SOCKET_TYPES_OF_WIDGETS:
                widgets.append((name, typ, opts))
                sockets[name] = typ if not isinstance(typ, list) else "COMBO"  # a widget may be linked
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


@pytest.fixture(scope="module", params=[p.name for p in WORKFLOWS] or ["<none>"])
def workflow(request):
    if request.param == "<none>":
        pytest.fail("workflows/ has no .json file")
    with open(pathlib.Path(__file__).resolve().parents[1] / "workflows" / request.param, encoding="utf-8") as f:
        return json.load(f)


def test_three_workflows_ship():
    names = {p.name for p in WORKFLOWS}
    assert {"diffueraser_video_object_removal.json", "propainter_quick_removal.json",
            "diffueraser_long_video.json"} <= names


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
        assert inp["link"] == link_id and inp["type"] == typ
        if d["type"] in CORE_NODES:
            declared = CORE_NODES[d["type"]][0]
        else:
            declared, _ = _pack_widgets(pack.NODE_CLASS_MAPPINGS[d["type"]])
        assert inp["name"] in declared and declared[inp["name"]] == typ, (d["type"], inp["name"], typ)
        if s["type"] in CORE_NODES:
            assert CORE_NODES[s["type"]][1][src_slot] == typ
        else:
            assert pack.NODE_CLASS_MAPPINGS[s["type"]].RETURN_TYPES[src_slot] == typ
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
            if not isinstance(typ, list) and typ not in SOCKET_TYPES_OF_WIDGETS:
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
            combos = [(n, t) for n, (t, *_) in spec.items() if isinstance(t, list)]
            for (name, options), value in zip(combos, node["widgets_values"]):
                assert value in options, (node["type"], name, value, options)
                assert options[0] == value, "the official file should be the widget's default"
