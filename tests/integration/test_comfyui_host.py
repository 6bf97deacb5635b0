"""The pack inside a real ComfyUI server (headless, --cpu, 127.0.0.1): import, node listing, every shipped workflow
run through /prompt to saved videos, and cancellation of a long run.

Run: COMFYUI_DIR=/path/to/ComfyUI COMFYUI_PYTHON=/path/to/its/python \
    python -m pytest -q tests/integration -m integration
Skipped at collection when COMFYUI_DIR is not set (nothing is built or started).
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import re
import time
import urllib.parse

import numpy as np
import pytest

import comfyui_harness as harness

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not os.path.isfile(os.path.join(os.environ.get("COMFYUI_DIR", ""), "main.py")),
        reason="COMFYUI_DIR does not point at a ComfyUI checkout",
    ),
]

log = logging.getLogger(__name__)

WORKFLOW_DIR = pathlib.Path(__file__).resolve().parents[2] / "example_workflows"
WORKFLOWS = sorted(WORKFLOW_DIR.glob("*.json"))
PACK_NODE_IDS = {
    "DiffuEraserPrepareMask",
    "DiffuEraserModelLoader",
    "DiffuEraserProPainterLoader",
    "DiffuEraserProPainterPrior",
    "DiffuEraserPriorInjection",
    "DiffuEraserSampler",
    "DiffuEraserBlend",
}
# Bounds (seconds) on a busy 2-core CPU: full-size VAE / CLIP-L / ProPainter at tiny frame sizes.
WORKFLOW_TIMEOUT_S = 420.0
RUN_START_TIMEOUT_S = 300.0
INTERRUPT_STOP_S = 30.0
# The saved videos are H.264 (lossy): pixels the pack must keep may differ from the input by the codec's error only.
# (measured ~3.5 on the test clips; pixels next to the hole, which the pack may change, differ by ~10-30)
KEPT_PIXELS_MAX_MEAN_ERROR = 8.0
# Inside the hole a random-weight model paints anything but the red object: the mean error there is far larger.
REMOVED_PIXELS_MIN_MEAN_ERROR = 20.0
# Pixels farther than this from the hole are outside every dilation + feather the workflows use
# (sampler/blend: 8 square dilations + 21 px feather; ProPainter: 8 cross dilations at 0.6 scale).
KEPT_MARGIN_PX = 24
REMOVAL_WORKFLOW = "DiffuEraser - remove an object from a video.json"
QUICK_WORKFLOW = "ProPainter - quick removal.json"
# Smaller sampler windows so a short clip is "longer than two windows" (pre-inference) and a run has many windows.
PRE_INFERENCE_WINDOW = 6
PRE_INFERENCE_OVERLAP = 1


def _input_replacer(clip):
    """Swap the workflow's example input names for the clip the fixture wrote."""

    def replace(node_type, name, value):
        if node_type == "LoadVideo" and name == "file":
            return clip.mask_video if "mask" in str(value).lower() else clip.video
        if node_type == "LoadImage" and name == "image":
            return clip.mask_png
        return value

    return replace


def _far_from_hole(holes: np.ndarray, margin: int) -> np.ndarray:
    """bool [T,H,W]: pixels more than ``margin`` away (Chebyshev) from every hole pixel of their frame."""
    near = holes.copy()
    for _ in range(margin):  # square dilation by one pixel per iteration
        grown = near.copy()
        grown[:, 1:, :] |= near[:, :-1, :]
        grown[:, :-1, :] |= near[:, 1:, :]
        grown[:, :, 1:] |= near[:, :, :-1]
        grown[:, :, :-1] |= near[:, :, 1:]
        near = grown
    return ~near


def _run(host, prompt: dict, timeout_s: float = WORKFLOW_TIMEOUT_S) -> dict:
    prompt_id = host.server.queue_prompt(prompt, harness.new_client_id())
    entry = host.server.wait_history(prompt_id, timeout_s)
    status = entry["status"]
    assert status.get("status_str") == "success", f"prompt failed: {_failure(status)}\n{host.server.log_tail(30)}"
    return entry


def _failure(status: dict) -> str:
    """The error message of a failed prompt's status, without the (huge) tensor dumps of current_inputs."""
    for kind, data in status.get("messages", []):
        if kind in ("execution_error", "execution_interrupted"):
            return json.dumps({k: v for k, v in data.items() if k not in ("current_inputs", "current_outputs")},
                              indent=1)
    return json.dumps(status)[:2000]


def _check_saved_video(host, entry: dict, clip, holes: np.ndarray) -> None:
    files = harness.saved_files(entry, host.output_dir)
    videos = [f for f in files if f.lower().endswith((".mp4", ".webm", ".mov", ".mkv"))]
    assert len(videos) == 1, f"expected one saved video, got {files}"
    assert os.path.isfile(videos[0]), videos[0]
    out = harness.read_video(videos[0])
    assert out.shape == clip.frames.shape, f"saved video {out.shape} vs input {clip.frames.shape}"
    error = np.abs(out.astype(np.int16) - clip.frames.astype(np.int16)).mean(axis=-1)
    kept = _far_from_hole(holes, KEPT_MARGIN_PX)
    assert kept.sum() > 0.1 * kept.size, "test clip leaves too few pixels outside the hole"
    assert error[kept].mean() < KEPT_PIXELS_MAX_MEAN_ERROR, (
        f"pixels far from the hole changed: mean error {error[kept].mean():.2f}")
    assert error[holes].mean() > REMOVED_PIXELS_MIN_MEAN_ERROR, (
        f"the hole still shows the object: mean error {error[holes].mean():.2f}")


def test_pack_imports_and_lists_every_node(comfy_host):
    log_text = comfy_host.server.log_text()
    pack = harness.PACK_DIR_NAME
    timing_lines = [line for line in log_text.splitlines() if line.strip().endswith(pack) and "seconds" in line]
    assert timing_lines, f"ComfyUI did not try to import the pack:\n{comfy_host.server.log_tail()}"
    assert not any("IMPORT FAILED" in line for line in timing_lines), "\n".join(timing_lines)
    assert not re.search(rf"Cannot import .*{re.escape(pack)}", log_text), comfy_host.server.log_tail()

    info = comfy_host.server.get_json("/object_info")
    assert PACK_NODE_IDS <= set(info), f"missing: {sorted(PACK_NODE_IDS - set(info))}"
    for node_id in PACK_NODE_IDS:
        assert info[node_id]["python_module"].startswith("custom_nodes."), info[node_id]["python_module"]
        assert info[node_id]["category"].startswith("DiffuEraser"), info[node_id]["category"]

    # The registered model folders are listed in the loaders' combos (folder registration works in the host).
    # (V3 schema: a combo is ("COMBO", {"options": [...]}))
    loader = info["DiffuEraserModelLoader"]["input"]["required"]
    assert "diffuEraser/unet_main" in loader["unet_main"][1]["options"]
    assert "diffuEraser/brushnet" in loader["brushnet"][1]["options"]
    assert "pcm_sd15_smallcfg_2step_converted.safetensors" in loader["pcm_lora"][1]["options"]
    propainter = info["DiffuEraserProPainterLoader"]["input"]["required"]
    assert [propainter[k][1]["options"][0] for k in ("raft", "flow_completion", "propainter")] == [
        "raft-things.pth", "recurrent_flow_completion.pth", "ProPainter.pth"]


def test_workflows_are_served_as_templates(comfy_host):
    """The frontend's template browser lists the shipped workflows under the pack and serves them unchanged."""
    templates = comfy_host.server.get_json("/workflow_templates")
    pack = harness.PACK_DIR_NAME
    assert sorted(templates.get(pack, [])) == sorted(p.stem for p in WORKFLOWS), templates
    for path in WORKFLOWS:
        served = comfy_host.server.get_json(f"/api/workflow_templates/{pack}/{urllib.parse.quote(path.name)}")
        assert served == json.loads(path.read_text(encoding="utf-8")), path.name


def test_workflows_are_shipped():
    assert len(WORKFLOWS) >= 3, f"expected the shipped workflows in {WORKFLOW_DIR}, found {WORKFLOWS}"


def missing_core_nodes(workflow: dict, object_info: dict) -> set:
    """Node types of a workflow this server does not have (the SAM3 workflow needs a newer ComfyUI)."""
    frontend_only = harness.FRONTEND_ONLY_TYPES | {harness.REROUTE_TYPE}
    return {n["type"] for n in workflow["nodes"] if n["type"] not in object_info and n["type"] not in frontend_only}


# Workflows that need core nodes newer than the tested host, and the nodes they need.
NEEDS_NEWER_HOST = {"Make the mask with SAM3 (ComfyUI 0.19.3 or newer).json": {"SAM3_VideoTrack",
                                                                              "SAM3_TrackToMask"}}


@pytest.mark.parametrize("workflow_path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_shipped_workflow_runs(comfy_host, workflow_path):
    workflow = json.loads(workflow_path.read_text(encoding="utf-8"))
    missing = missing_core_nodes(workflow, comfy_host.object_info)
    if missing:
        assert missing == NEEDS_NEWER_HOST.get(workflow_path.name), (workflow_path.name, missing)
        pytest.skip(f"this ComfyUI lacks {sorted(missing)} (the workflow says which version it needs)")
    clip = comfy_host.clips["short"]
    prompt = harness.ui_to_api(workflow, comfy_host.object_info, _input_replacer(clip))
    entry = _run(comfy_host, prompt)
    _check_saved_video(comfy_host, entry, clip, _holes_used(prompt, clip))


def _holes_used(prompt: dict, clip) -> np.ndarray:
    """The still-mask workflows (LoadImage) use frame 0's hole for every frame."""
    if any(node["class_type"] == "LoadImage" for node in prompt.values()):
        return np.broadcast_to(clip.holes[:1], clip.holes.shape)
    return clip.holes


def _removal_prompt(host, clip_name: str, steps: int) -> tuple:
    """The object-removal workflow on a clip longer than two windows of PRE_INFERENCE_WINDOW frames.

    Returns (prompt, sampler node id). Same upstream settings for every caller, so ComfyUI's cache reuses the
    prior and the start latent between the pre-inference and the interrupt tests.
    """
    workflow = json.loads((WORKFLOW_DIR / REMOVAL_WORKFLOW).read_text(encoding="utf-8"))
    prompt = harness.ui_to_api(workflow, host.object_info, _input_replacer(host.clips[clip_name]))
    sampler_id = next(k for k, v in prompt.items() if v["class_type"] == "DiffuEraserSampler")
    sampler = prompt[sampler_id]["inputs"]
    assert sampler["pre_inference"] is True, "the shipped workflow should keep the reference's pre-inference"
    sampler.update(window_length=PRE_INFERENCE_WINDOW, window_overlap=PRE_INFERENCE_OVERLAP, steps=steps)
    return prompt, sampler_id


def test_pre_inference_path_runs_in_host(comfy_host):
    clip = comfy_host.clips["medium"]
    assert clip.frames.shape[0] > 2 * PRE_INFERENCE_WINDOW
    prompt, _ = _removal_prompt(comfy_host, "medium", steps=2)
    log_before = len(comfy_host.server.log_text())
    entry = _run(comfy_host, prompt)
    # The start latent crossed ComfyUI's LATENT socket with its prior and window noise: not skipped.
    assert "pre-inference: skipped" not in comfy_host.server.log_text()[log_before:]
    _check_saved_video(comfy_host, entry, clip, clip.holes)


def test_interrupt_stops_a_long_run_and_server_keeps_working(comfy_host):
    server = comfy_host.server
    steps_max = comfy_host.object_info["DiffuEraserSampler"]["input"]["required"]["steps"][1]["max"]
    prompt, sampler_id = _removal_prompt(comfy_host, "medium", steps=steps_max)  # long enough to interrupt
    client_id = harness.new_client_id()
    events = server.open_websocket(client_id)
    seen = []
    try:
        prompt_id = server.queue_prompt(prompt, client_id)
        # Interrupt only once the sampler reports progress: the pack's own loop must notice the flag.
        events.wait_for(lambda e: harness.progress_of(e, prompt_id, sampler_id) is not None,
                        RUN_START_TIMEOUT_S, seen)
        interrupted_at = time.monotonic()
        server.interrupt(prompt_id)
        stopped = events.wait_for(
            lambda e: e.get("type") in ("execution_interrupted", "execution_success", "execution_error")
            and e["data"].get("prompt_id") == prompt_id, INTERRUPT_STOP_S, seen)
        stop_s = time.monotonic() - interrupted_at
        log.info("interrupt: the run stopped %.2f s after /interrupt", stop_s)
    finally:
        events.close()
    assert stopped["type"] == "execution_interrupted", f"{stopped}\n{server.log_tail(30)}"
    assert stopped["data"]["node_id"] == sampler_id, stopped
    assert stop_s < INTERRUPT_STOP_S
    entry = server.wait_history(prompt_id, INTERRUPT_STOP_S)
    assert entry["status"]["status_str"] == "error"
    assert any(m[0] == "execution_interrupted" for m in entry["status"]["messages"]), _failure(entry["status"])
    assert not entry.get("outputs"), "an interrupted run saved outputs"

    # The server still runs new work: the quick-removal workflow with another dilation (no cached result).
    workflow = json.loads((WORKFLOW_DIR / QUICK_WORKFLOW).read_text(encoding="utf-8"))
    clip = comfy_host.clips["short"]
    follow_up = harness.ui_to_api(workflow, comfy_host.object_info, _input_replacer(clip))
    prepare_id = next(k for k, v in follow_up.items() if v["class_type"] == "DiffuEraserPrepareMask")
    follow_up[prepare_id]["inputs"]["mask_dilation"] = 2
    entry = _run(comfy_host, follow_up)
    _check_saved_video(comfy_host, entry, clip, _holes_used(follow_up, clip))


def test_standin_schema_serialises_as_the_host(comfy_host, monkeypatch):
    """nodes/io_standin.py (the V3 API stand-in used without ComfyUI) publishes every node exactly as the real
    ComfyUI does for the same declarations: same inputs, options, order, outputs, names and flags."""
    import nodes as pack
    from nodes import comfy_io, folders

    assert not comfy_io.HOST_API, "the test process should run the stand-in"
    # the loaders' combos list the host's model folders
    monkeypatch.setenv(folders.MODELS_DIR_ENV, os.path.join(comfy_host.base_dir, "models"))
    info = comfy_host.server.get_json("/object_info")
    for node_id, cls in pack.NODE_CLASS_MAPPINGS.items():
        schema = cls.define_schema()
        schema.finalize()
        ours = json.loads(json.dumps(schema.get_v1_info(cls)))
        published = info[node_id]
        assert set(published) - set(ours) <= {"api_node", "python_module"}, node_id
        for key, value in ours.items():
            assert published[key] == value, (node_id, key, published[key], value)
