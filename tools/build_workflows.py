"""Writes example_workflows/*.json (and their template-browser thumbnails) from one description per workflow.

Run from the repository root: ``python tools/build_workflows.py [--screenshots DIR]``; the thumbnails are made
from real screenshots of the loaded workflows when given (tests/integration/test_browser.py with
DIFFUERASER_SCREENSHOTS=DIR), kept when present, drawn when missing. The JSON is what the frontend saves (UI format,
version 0.4); the pack's socket and widget order are read from the node declarations, so a workflow cannot drift
from them. Layout rules the tests check (tests/test_workflows.py): every node inside its stage's group, no two
boxes (title bar included) overlapping, the whole graph at most one screen (1920 px) wide.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from typing import Dict, List, Optional, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import nodes as pack  # noqa: E402

OUT_DIR = os.path.join(REPO, "example_workflows")
FRONTEND_VERSION = "1.27.10"
WIDGETS = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
COL = 350  # column pitch: 300 px nodes, 50 px for two group margins and a gap
NODE_W = 300
GROUP_PAD = 20
GROUP_TITLE = 40
STAGE_COLORS = ("#3f789e", "#8a5a3b", "#6b4f9e", "#3f7f5a", "#7a7a3b")
# The view saved with the workflow (extra.ds, in canvas pixels): the whole graph on the canvas of a 1920x1080
# window (frontend 1.27: the canvas starts right of the 64 px side bar and below the 76 px menu), at most 80% zoom
# and never below 60% (where the frontend stops drawing titles and widgets).
SCREEN_W, SCREEN_H = 1920 - 64, 1080 - 76
VIEW_LEFT, VIEW_TOP, VIEW_MARGIN = 16, 16, 16
MAX_SCALE, MIN_SCALE = 0.8, 0.6
# Heights the frontend gives the nodes with a media preview (it grows them to fit; seen in the browser test's
# layout report), and the rows below them.
LOAD_VIDEO_H = 320
LOAD_IMAGE_H = 340
ROW2 = LOAD_VIDEO_H + 70
ROW3 = ROW2 + LOAD_VIDEO_H + 110

# Core nodes used (ComfyUI 0.3.64 declarations; SAM3 ones from ComfyUI >= 0.19.3): sockets in, outputs.
CORE = {
    "LoadVideo": ([], [("VIDEO", "VIDEO")]),
    "GetVideoComponents": ([("video", "VIDEO")], [("images", "IMAGE"), ("audio", "AUDIO"), ("fps", "FLOAT")]),
    "LoadImage": ([], [("IMAGE", "IMAGE"), ("MASK", "MASK")]),
    "VAELoader": ([], [("VAE", "VAE")]),
    "CLIPLoader": ([], [("CLIP", "CLIP")]),
    "CLIPTextEncode": ([("clip", "CLIP")], [("CONDITIONING", "CONDITIONING")]),
    "VAEDecode": ([("samples", "LATENT"), ("vae", "VAE")], [("IMAGE", "IMAGE")]),
    "CreateVideo": ([("images", "IMAGE"), ("audio", "AUDIO")], [("VIDEO", "VIDEO")]),
    "SaveVideo": ([("video", "VIDEO")], []),
    "MaskToImage": ([("mask", "MASK")], [("IMAGE", "IMAGE")]),
    "CheckpointLoaderSimple": ([], [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")]),
    "SAM3_VideoTrack": ([("images", "IMAGE"), ("model", "MODEL"), ("initial_mask", "MASK"),
                         ("conditioning", "CONDITIONING")], [("track_data", "SAM3_TRACK_DATA")]),
    "SAM3_TrackToMask": ([("track_data", "SAM3_TRACK_DATA")], [("masks", "MASK")]),
    "Note": ([], []),
}
# CreateVideo's fps is a widget that the workflows feed from the source video (a linked widget input).
LINKED_WIDGETS = {"CreateVideo": [("fps", "FLOAT")]}

MODELS = {
    "vae": [dict(name="vae-ft-mse-840000-ema-pruned.safetensors", directory="vae",
                 url="https://huggingface.co/stabilityai/sd-vae-ft-mse-original/resolve/main/"
                     "vae-ft-mse-840000-ema-pruned.safetensors")],
    "clip": [dict(name="clip_l.safetensors", directory="text_encoders",
                  url="https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/clip_l.safetensors")],
    "propainter": [dict(name=name, directory="propainter",
                        url=f"https://github.com/sczhou/ProPainter/releases/download/v0.1.0/{name}")
                   for name in ("raft-things.pth", "recurrent_flow_completion.pth", "ProPainter.pth")],
    "diffueraser": [dict(name=f"diffuEraser/{part}/{f}", directory="diffueraser",
                         url=f"https://huggingface.co/lixiaowen/diffuEraser/resolve/main/{part}/{f}")
                    for part in ("unet_main", "brushnet")
                    for f in ("config.json", "diffusion_pytorch_model.safetensors")]
    + [dict(name="pcm_sd15_smallcfg_2step_converted.safetensors", directory="diffueraser",
            url="https://huggingface.co/wangfuyun/PCM_Weights/resolve/main/sd15/"
                "pcm_sd15_smallcfg_2step_converted.safetensors")],
    # Comfy-Org's repackaged SAM 3.1 checkpoint (docs.comfy.org, "SAM 3.1" tutorial)
    "sam3": [dict(name="sam3.1_multiplex_fp16.safetensors", directory="checkpoints",
                  url="https://huggingface.co/Comfy-Org/SAM3/resolve/main/sam3.1_multiplex_fp16.safetensors")],
}


def _pack_sockets(node_type: str) -> Tuple[List[Tuple[str, str]], List[Tuple[str, str]], List[str]]:
    cls = pack.NODE_CLASS_MAPPINGS[node_type]
    spec = cls.INPUT_TYPES()
    sockets, widgets = [], []
    for section in ("required", "optional"):
        for name, (typ, *_rest) in spec.get(section, {}).items():
            (widgets if typ in WIDGETS else sockets).append((name, typ) if typ not in WIDGETS else name)
    outputs = list(zip(cls.RETURN_NAMES, cls.RETURN_TYPES))
    return sockets, outputs, widgets


def _height(n_in: int, n_out: int, n_widgets: int, extra: int = 0) -> int:
    """Body height (below the 30 px title bar) that shows every slot and widget at frontend 1.27 sizes."""
    return 26 * max(n_in, n_out, 0) + 28 * n_widgets + 16 + extra


class Graph:
    def __init__(self, name: str):
        self.name = name
        self.nodes: List[dict] = []
        self.links: List[list] = []
        self.groups: List[dict] = []

    def add(self, node_type: str, col: float, y: int, widgets: Sequence = (), title: Optional[str] = None,
            height: Optional[int] = None, width: int = NODE_W, models: Optional[List[dict]] = None) -> int:
        node_id = len(self.nodes) + 1
        if node_type in pack.NODE_CLASS_MAPPINGS:
            sockets, outputs, widget_names = _pack_sockets(node_type)
            n_widgets = len(widget_names) + (1 if "seed" in widget_names else 0)
            properties = {"Node name for S&R": node_type}
        else:
            sockets, outputs = CORE[node_type]
            sockets = list(sockets) + LINKED_WIDGETS.get(node_type, [])
            n_widgets = len(widgets)
            properties = {"Node name for S&R": node_type, "cnr_id": "comfy-core"}
        if models:
            properties["models"] = models
        inputs = [{"name": n, "type": t, "link": None} for n, t in sockets]
        for inp in inputs:
            if node_type in LINKED_WIDGETS and inp["name"] in dict(LINKED_WIDGETS[node_type]):
                inp["widget"] = {"name": inp["name"]}
        node = {
            "id": node_id, "type": node_type, "pos": [int(col * COL), y],
            "size": [width, height or _height(len(sockets), len(outputs), n_widgets)],
            "flags": {}, "order": node_id - 1, "mode": 0, "inputs": inputs,
            "outputs": [{"name": n, "type": t, "links": [], "slot_index": i} for i, (n, t) in enumerate(outputs)],
            "properties": properties, "widgets_values": list(widgets),
        }
        if title:
            node["title"] = title
        self.nodes.append(node)
        return node_id

    def link(self, src: int, src_slot: int, dst: int, dst_name: str) -> None:
        link_id = len(self.links) + 1
        out = self.nodes[src - 1]["outputs"][src_slot]
        dst_node = self.nodes[dst - 1]
        inp = next(i for i in dst_node["inputs"] if i["name"] == dst_name)
        dst_slot = dst_node["inputs"].index(inp)
        assert inp["link"] is None, (dst_node["type"], dst_name)
        inp["link"] = link_id
        out["links"].append(link_id)
        self.links.append([link_id, src, src_slot, dst, dst_slot, out["type"]])

    def group(self, title: str, member_ids: Sequence[int]) -> None:
        boxes = [self.box(self.nodes[i - 1]) for i in member_ids]
        x0 = min(b[0] for b in boxes) - GROUP_PAD
        y0 = min(b[1] for b in boxes) - GROUP_TITLE
        x1 = max(b[0] + b[2] for b in boxes) + GROUP_PAD
        y1 = max(b[1] + b[3] for b in boxes) + GROUP_PAD
        self.groups.append({"id": len(self.groups) + 1, "title": title, "bounding": [x0, y0, x1 - x0, y1 - y0],
                            "color": STAGE_COLORS[len(self.groups) % len(STAGE_COLORS)], "font_size": 24,
                            "flags": {}})

    @staticmethod
    def box(node: dict) -> Tuple[int, int, int, int]:
        """x, y, w, h of a node on the canvas including its title bar (LiteGraph NODE_TITLE_HEIGHT = 30)."""
        x, y = node["pos"]
        w, h = node["size"]
        return x, y - 30, w, h + 30

    def view(self) -> dict:
        boxes = [self.box(n) for n in self.nodes] + [tuple(g["bounding"]) for g in self.groups]
        x0 = min(b[0] for b in boxes)
        y0 = min(b[1] for b in boxes)
        x1 = max(b[0] + b[2] for b in boxes)
        y1 = max(b[1] + b[3] for b in boxes)
        scale = min(MAX_SCALE, (SCREEN_W - VIEW_LEFT - VIEW_MARGIN) / (x1 - x0),
                    (SCREEN_H - VIEW_TOP - VIEW_MARGIN) / (y1 - y0))
        scale = round(max(MIN_SCALE, scale), 3)
        return {"scale": scale, "offset": [round(VIEW_LEFT / scale - x0, 1), round(VIEW_TOP / scale - y0, 1)]}

    def to_json(self) -> dict:
        return {
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, "diffueraser/" + self.name)),
            "revision": 0, "last_node_id": len(self.nodes), "last_link_id": len(self.links),
            "nodes": self.nodes, "links": self.links, "groups": self.groups, "config": {},
            "extra": {"ds": self.view(), "frontendVersion": FRONTEND_VERSION},
            "version": 0.4,
        }


def _note(g: Graph, text: str, width: int, height: int) -> int:
    return g.add("Note", 0, -height - 100, [text], title="Read me first", width=width, height=height)


MODEL_FILES_TEXT = (
    "Model files (ComfyUI/models; the frontend offers the missing ones for download):\n"
    "  diffueraser/diffuEraser/unet_main/ and .../brushnet/ (config.json + diffusion_pytorch_model.safetensors) "
    "from huggingface.co/lixiaowen/diffuEraser\n"
    "  diffueraser/pcm_sd15_smallcfg_2step_converted.safetensors from huggingface.co/wangfuyun/PCM_Weights (sd15/)\n"
    "  propainter/ProPainter.pth, recurrent_flow_completion.pth, raft-things.pth from "
    "github.com/sczhou/ProPainter/releases/tag/v0.1.0\n"
    "  vae/vae-ft-mse-840000-ema-pruned.safetensors, text_encoders/clip_l.safetensors (SD1.5's CLIP-L)"
)


def video_and_mask(g: Graph, mask_from_video: bool = True, dilation: int = 8) -> Dict[str, int]:
    ids = {}
    ids["video"] = g.add("LoadVideo", 0, 0, ["input_video.mp4", "image"], title="Video", height=LOAD_VIDEO_H)
    ids["video_parts"] = g.add("GetVideoComponents", 1, 0)
    if mask_from_video:
        ids["mask_file"] = g.add("LoadVideo", 0, ROW2, ["input_mask.mp4", "image"],
                                 title="Mask video (object in any colour on black)", height=LOAD_VIDEO_H)
        ids["mask_parts"] = g.add("GetVideoComponents", 1, ROW2)
    else:
        ids["mask_file"] = g.add("LoadImage", 0, ROW2, ["mask.png", "image"],
                                 title="Mask (paint it in the mask editor; used for every frame)", height=LOAD_IMAGE_H)
    # beside a LoadImage the column stays free: the frontend widens it to the image's aspect
    ids["prepare"] = g.add("DiffuEraserPrepareMask", 1, ROW2 + 130 if mask_from_video else 150,
                           [dilation, 0.5])
    g.link(ids["video"], 0, ids["video_parts"], "video")
    if mask_from_video:
        g.link(ids["mask_file"], 0, ids["mask_parts"], "video")
        g.link(ids["mask_parts"], 0, ids["prepare"], "mask_video")
    else:
        g.link(ids["mask_file"], 1, ids["prepare"], "mask")
    return ids


def save_video(g: Graph, images_src: Tuple[int, int], parts: int, col: float, y: int, prefix: str) -> List[int]:
    create = g.add("CreateVideo", col, y, [30.0])
    save = g.add("SaveVideo", col, y + 170, [prefix, "auto", "auto"], height=300)
    g.link(images_src[0], images_src[1], create, "images")
    g.link(parts, 1, create, "audio")
    g.link(parts, 2, create, "fps")
    g.link(create, 0, save, "video")
    return [create, save]


def diffusion(name: str, long_video: bool) -> Graph:
    g = Graph(name)
    ids = video_and_mask(g)
    loader = g.add("DiffuEraserProPainterLoader", 2, 0, ["raft-things.pth", "recurrent_flow_completion.pth",
                                                          "ProPainter.pth"], models=MODELS["propainter"])
    prior = g.add("DiffuEraserProPainterPrior", 2, 190, [0.6, 960, 8, 10, 10, 50, 20])
    inject = g.add("DiffuEraserPriorInjection", 3, 0, [0, "fixed", "forward_noise", 1.0, 720 if long_video else 960, 2])
    sampler = g.add("DiffuEraserSampler", 4, 0, [2, 0.0, 22, 5, 1.0, True, 8])
    vae = g.add("VAELoader", 0, ROW3, ["vae-ft-mse-840000-ema-pruned.safetensors"], models=MODELS["vae"])
    clip = g.add("CLIPLoader", 0, ROW3 + 130, ["clip_l.safetensors", "stable_diffusion", "default"], models=MODELS["clip"])
    prompt = g.add("CLIPTextEncode", 1, ROW3, [""], title="Prompt (empty, as the reference)", height=120)
    model = g.add("DiffuEraserModelLoader", 2, ROW3, ["diffuEraser/unet_main", "diffuEraser/brushnet",
                                                     "pcm_sd15_smallcfg_2step_converted.safetensors", 1.0],
                  models=MODELS["diffueraser"])
    decode = g.add("VAEDecode", 3, 520)
    blend = g.add("DiffuEraserBlend", 3, 640, [8, 21])
    outs = save_video(g, (blend, 0), ids["video_parts"], 4, 520, "video/DiffuEraser")

    g.link(ids["video_parts"], 0, prior, "images")
    g.link(ids["prepare"], 0, prior, "mask")
    g.link(loader, 0, prior, "propainter_model")
    g.link(vae, 0, inject, "vae")
    g.link(prior, 0, inject, "prior")
    g.link(clip, 0, prompt, "clip")
    g.link(model, 0, sampler, "diffueraser_model")
    g.link(vae, 0, sampler, "vae")
    g.link(prompt, 0, sampler, "positive")
    g.link(ids["video_parts"], 0, sampler, "images")
    g.link(ids["prepare"], 0, sampler, "mask")
    g.link(inject, 0, sampler, "latent")
    g.link(sampler, 0, decode, "samples")
    g.link(vae, 0, decode, "vae")
    g.link(ids["video_parts"], 0, blend, "images")
    g.link(decode, 0, blend, "generated")
    g.link(ids["prepare"], 0, blend, "mask")

    g.group("1 - Video and mask", [ids["video"], ids["video_parts"], ids["mask_file"], ids["mask_parts"],
                                   ids["prepare"]])
    g.group("2 - ProPainter prior", [loader, prior])
    g.group("3 - DiffuEraser models", [vae, clip, prompt, model])
    g.group("4 - DiffuEraser", [inject, sampler])
    g.group("5 - Blend and save", [decode, blend] + outs)
    steps = [
        "DiffuEraser: remove an object from a video" + (" - long videos" if long_video else ""),
        "1. Video and mask: pick your video in 'Video' and its mask video (same length; the object in white or "
        "any colour on black) below it. No mask yet? Open the 'Make the mask with SAM3' workflow.",
        "2. Prepare Mask: mask_dilation grows the hole once for every stage (reference 8).",
        "3. ProPainter prior: fills the hole from neighbouring frames (subvideo_length 50 as the reference).",
        "4. DiffuEraser: refines the prior (2 steps with the PCM LoRA); change the seed on Prior Injection.",
        "5. Blend and save: the result is feathered into the original and saved under output/video. Press Run.",
    ]
    if long_video:
        steps.insert(1, "Memory stays bounded: one window / chunk on the GPU at a time. A 720 working side keeps "
                        "chunks small; pre_inference samples keyframes across the whole video first. Lower "
                        "window_length (e.g. 16) if a window does not fit.")
    _note(g, "\n".join(steps) + "\n\n" + MODEL_FILES_TEXT, width=4 * COL + NODE_W, height=250)
    return g


def quick() -> Graph:
    g = Graph("quick")
    ids = video_and_mask(g, mask_from_video=False, dilation=4)  # ProPainter's own default, as before
    loader = g.add("DiffuEraserProPainterLoader", 2, 0, ["raft-things.pth", "recurrent_flow_completion.pth",
                                                          "ProPainter.pth"], models=MODELS["propainter"])
    prior = g.add("DiffuEraserProPainterPrior", 2, 190, [0.6, 960, 4, 10, 10, 50, 20])
    outs = save_video(g, (prior, 0), ids["video_parts"], 3, 0, "video/ProPainter")
    g.link(ids["video_parts"], 0, prior, "images")
    g.link(ids["prepare"], 0, prior, "mask")
    g.link(loader, 0, prior, "propainter_model")
    g.group("1 - Video and mask", [ids["video"], ids["video_parts"], ids["mask_file"], ids["prepare"]])
    g.group("2 - ProPainter", [loader, prior])
    g.group("3 - Save", outs)
    steps = [
        "Quick removal with ProPainter only (no diffusion): fast, good for static backgrounds.",
        "1. Video and mask: pick your video in 'Video'; paint the object on the mask image (right-click > Open in "
        "MaskEditor). One mask is used for every frame; for a moving object use a mask video (see the DiffuEraser "
        "workflows) or make one with the SAM3 workflow.",
        "2. ProPainter: mask_dilation on Prepare Mask grows the hole (4, ProPainter's default; DiffuEraser uses 8).",
        "3. Save: the result goes to output/video. Press Run.",
        "",
        "Model files: ProPainter.pth, recurrent_flow_completion.pth, raft-things.pth from "
        "github.com/sczhou/ProPainter/releases/tag/v0.1.0 in ComfyUI/models/propainter.",
    ]
    _note(g, "\n".join(steps), width=3 * COL + NODE_W, height=230)
    return g


def make_mask() -> Graph:
    g = Graph("sam3")
    video = g.add("LoadVideo", 0, 0, ["input_video.mp4", "image"], title="Video", height=LOAD_VIDEO_H)
    parts = g.add("GetVideoComponents", 0, ROW2)
    ckpt = g.add("CheckpointLoaderSimple", 1, 0, ["sam3.1_multiplex_fp16.safetensors"], models=MODELS["sam3"])
    text = g.add("CLIPTextEncode", 1, 170, ["person"], title="What to remove (a short phrase)", height=120)
    track = g.add("SAM3_VideoTrack", 2, 0, [0.5, 1, 1], height=_height(4, 1, 3))
    to_mask = g.add("SAM3_TrackToMask", 2, 250, [""], height=_height(1, 1, 1))
    prepare = g.add("DiffuEraserPrepareMask", 2, 400, [8, 0.5])
    as_image = g.add("MaskToImage", 3, 0)
    mask_out = save_video(g, (as_image, 0), parts, 3, 110, "video/DiffuEraser_mask")
    loader = g.add("DiffuEraserProPainterLoader", 4, 0, ["raft-things.pth", "recurrent_flow_completion.pth",
                                                          "ProPainter.pth"], models=MODELS["propainter"])
    prior = g.add("DiffuEraserProPainterPrior", 4, 190, [0.6, 960, 8, 10, 10, 50, 20])
    removed = save_video(g, (prior, 0), parts, 4, 540, "video/ProPainter")
    g.link(video, 0, parts, "video")
    g.link(parts, 0, track, "images")
    g.link(ckpt, 0, track, "model")
    g.link(ckpt, 1, text, "clip")
    g.link(text, 0, track, "conditioning")
    g.link(track, 0, to_mask, "track_data")
    g.link(to_mask, 0, prepare, "mask")
    g.link(to_mask, 0, as_image, "mask")
    g.link(parts, 0, prior, "images")
    g.link(prepare, 0, prior, "mask")
    g.link(loader, 0, prior, "propainter_model")
    g.group("1 - Video", [video, parts])
    g.group("2 - Track the object (SAM3)", [ckpt, text, track, to_mask, prepare])
    g.group("3 - Save the mask video", [as_image] + mask_out)
    g.group("4 - Quick removal", [loader, prior] + removed)
    steps = [
        "Make the mask in ComfyUI: SAM3 tracks the object through the video. Needs ComfyUI 0.19.3 or newer (core "
        "nodes SAM3_VideoTrack and SAM3_TrackToMask, Comfy-Org/ComfyUI PR #13408); older versions show them as "
        "missing.",
        "1. Video: pick your video.",
        "2. Track: put sam3.1_multiplex_fp16.safetensors in ComfyUI/models/checkpoints; describe the object in a "
        "short phrase ('person', 'red car'). max_objects 1 keeps the best match; object_indices picks tracks.",
        "3. Save the mask video: output/video/DiffuEraser_mask - use it as the mask video of the DiffuEraser "
        "workflows for the best quality.",
        "4. Quick removal: ProPainter removes the tracked object right away. Press Run.",
    ]
    _note(g, "\n".join(steps), width=4 * COL + NODE_W, height=210)
    return g


WORKFLOWS = {
    "DiffuEraser - remove an object from a video": lambda: diffusion("removal", long_video=False),
    "DiffuEraser - long video": lambda: diffusion("long", long_video=True),
    "ProPainter - quick removal": quick,
    "Make the mask with SAM3 (ComfyUI 0.19.3 or newer)": make_mask,
}


def thumbnail(graph: Graph, path: str, title: str) -> None:
    """A drawn overview for the template browser: the stage groups as coloured boxes with their titles."""
    from PIL import Image, ImageDraw, ImageFont

    width, height = 512, 384
    image = Image.new("RGB", (width, height), (32, 34, 38))
    draw = ImageDraw.Draw(image)
    font_dir = "/usr/share/fonts/truetype/dejavu"
    try:
        big = ImageFont.truetype(os.path.join(font_dir, "DejaVuSans-Bold.ttf"), 22)
        small = ImageFont.truetype(os.path.join(font_dir, "DejaVuSans.ttf"), 14)
    except OSError:
        big = small = ImageFont.load_default()
    words, lines = title.split(" "), [""]
    for word in words:  # wrap the title to the card's width
        trial = (lines[-1] + " " + word).strip()
        if draw.textlength(trial, font=big) > width - 32 and lines[-1]:
            lines.append(word)
        else:
            lines[-1] = trial
    for i, line in enumerate(lines[:2]):
        draw.text((16, 10 + 26 * i), line, fill=(240, 240, 240), font=big)
    top = 16 + 26 * min(2, len(lines))
    boxes = [grp["bounding"] for grp in graph.groups]
    x0 = min(b[0] for b in boxes)
    y0 = min(b[1] for b in boxes)
    x1 = max(b[0] + b[2] for b in boxes)
    y1 = max(b[1] + b[3] for b in boxes)
    scale = min((width - 32) / (x1 - x0), (height - top - 14) / (y1 - y0))
    for grp in graph.groups:
        bx, by, bw, bh = grp["bounding"]
        rect = [16 + (bx - x0) * scale, top + (by - y0) * scale, 16 + (bx - x0 + bw) * scale,
                top + (by - y0 + bh) * scale]
        color = tuple(int(grp["color"][i:i + 2], 16) for i in (1, 3, 5))
        draw.rectangle(rect, fill=tuple(c // 2 for c in color), outline=color, width=2)
        draw.text((rect[0] + 6, rect[1] + 4), grp["title"], fill=(235, 235, 235), font=small)
    for node in graph.nodes:
        if node["type"] == "Note":
            continue
        x, y, w, h = Graph.box(node)
        rect = [16 + (x - x0) * scale, top + (y - y0) * scale, 16 + (x - x0 + w) * scale,
                top + (y - y0 + h) * scale]
        draw.rectangle(rect, outline=(200, 200, 200), width=1)
    image.save(path, "JPEG", quality=85)


# Part of a 1920x1080 screenshot of the frontend that shows the canvas (right of the side bar, below the menu).
SCREENSHOT_CANVAS = (64, 76, 1920, 1080)
THUMBNAIL_SIZE = (640, 360)


def thumbnail_from_screenshot(screenshot: str, path: str) -> None:
    """The template card from a real screenshot of the loaded workflow (tests/integration/test_browser.py writes
    them when DIFFUERASER_SCREENSHOTS is set)."""
    from PIL import Image

    with Image.open(screenshot) as shot:
        canvas = shot.convert("RGB").crop(SCREENSHOT_CANVAS)
        canvas.thumbnail(THUMBNAIL_SIZE)
        canvas.save(path, "JPEG", quality=85)


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--screenshots", default=None,
                        help="folder of '<title> - loaded.png' screenshots to make the thumbnails from; a workflow "
                             "without one (or whose nodes the tested ComfyUI lacks) gets a drawn overview")
    parser.add_argument("--drawn", nargs="*", default=[], help="titles that keep the drawn overview")
    args = parser.parse_args()
    os.makedirs(OUT_DIR, exist_ok=True)
    for title, build in WORKFLOWS.items():
        graph = build()
        with open(os.path.join(OUT_DIR, title + ".json"), "w", encoding="utf-8") as f:
            json.dump(graph.to_json(), f, indent=1)
            f.write("\n")
        card = os.path.join(OUT_DIR, title + ".jpg")
        shot = os.path.join(args.screenshots, title + " - loaded.png") if args.screenshots else None
        if shot and os.path.isfile(shot) and title not in args.drawn:
            thumbnail_from_screenshot(shot, card)
        elif title in args.drawn or not os.path.isfile(card):
            thumbnail(graph, card, title)  # kept otherwise: it may come from a screenshot


if __name__ == "__main__":
    main()
