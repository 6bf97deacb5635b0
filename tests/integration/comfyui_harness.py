"""Helpers to run the pack inside a real ComfyUI process on 127.0.0.1 (used by the integration tests only).

* ``build_models``: a ComfyUI models folder of random weights: tiny DiffuEraser nets (cross-attention width 768 so
  they accept CLIP-L's embeddings), full-size ProPainter nets (their only size), full-size SD1.5 VAE and CLIP-L
  (ComfyUI's own VAELoader / CLIPLoader only build the full architectures).
* ``write_video`` / ``write_mask_png``: small input files with a known moving hole.
* ``ComfyServer``: starts ``main.py`` in its own process group, talks HTTP and (a minimal) websocket to it, and
  always stops it. Every wait has a deadline; nothing is sent anywhere but 127.0.0.1.
* ``ui_to_api``: converts a workflow saved by the frontend (UI format) into what ``/prompt`` takes (API format)
  using ``/object_info``'s input order.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import queue
import signal
import socket
import struct
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
PACK_DIR_NAME = "comfyui-diffueraser"
# ComfyUI needs ~10 s to start on an idle 2-core machine; allow for a busy one.
SERVER_START_TIMEOUT_S = 240.0
SERVER_STOP_TIMEOUT_S = 20.0
HTTP_TIMEOUT_S = 30.0
POLL_INTERVAL_S = 0.5
# Widget types the frontend draws (and stores in widgets_values) unless the input is declared forceInput.
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
# Input options that make the frontend add one more widget (the upload button) right after the input's own.
UPLOAD_OPTIONS = ("image_upload", "video_upload", "audio_upload", "animated_image_upload")
# INT inputs the frontend gives a "control after generate" widget even when not declared.
IMPLICIT_SEED_NAMES = ("seed", "noise_seed")
# Frontend-only node types: never sent to the server.
FRONTEND_ONLY_TYPES = {"Note", "MarkdownNote"}
REROUTE_TYPE = "Reroute"
# LiteGraph node modes: 0 always, 2 never (muted), 4 bypass.
MODE_MUTED = 2
MODE_BYPASS = 4
# Cross-attention width of CLIP-L (SD1.5's text encoder): the DiffuEraser nets must match it in a real host.
CLIP_L_WIDTH = 768

# The official file names the workflows select (folder layout of docs/architecture.md).
UNET_MAIN_DIR = ("diffueraser", "diffuEraser", "unet_main")
BRUSHNET_DIR = ("diffueraser", "diffuEraser", "brushnet")
PCM_LORA_FILE = ("diffueraser", "pcm_sd15_smallcfg_2step_converted.safetensors")
PROPAINTER_DIR = ("propainter",)
VAE_FILE = ("vae", "vae-ft-mse-840000-ema-pruned.safetensors")
CLIP_L_FILE = ("text_encoders", "clip_l.safetensors")


# ----------------------------------------------------------------------------------------------------------------
# models and input files


def build_models(models_dir: str) -> Dict[str, str]:
    """Write random weights in the official layouts under ``models_dir``; returns {role: path}."""
    import torch

    from diffueraser_core.models import configs
    from diffueraser_core.models.unet_motion import DiffuEraserUNet
    from diffueraser_core.random_weights import diffusion, lora, propainter, sd15

    unet_config = dict(configs.TINY_UNET_MAIN_CONFIG, cross_attention_dim=CLIP_L_WIDTH)
    brushnet_config = dict(configs.TINY_BRUSHNET_CONFIG, cross_attention_dim=CLIP_L_WIDTH)
    paths = {
        "unet_main": os.path.join(models_dir, *UNET_MAIN_DIR),
        "brushnet": os.path.join(models_dir, *BRUSHNET_DIR),
        "pcm_lora": os.path.join(models_dir, *PCM_LORA_FILE),
        "propainter": os.path.join(models_dir, *PROPAINTER_DIR),
        "vae": os.path.join(models_dir, *VAE_FILE),
        "clip_l": os.path.join(models_dir, *CLIP_L_FILE),
    }
    diffusion.save_unet_main_folder(paths["unet_main"], config=unet_config, seed=0)
    diffusion.save_brushnet_folder(paths["brushnet"], config=brushnet_config, seed=1)
    with torch.device("meta"):  # only the target modules' shapes matter for the LoRA
        unet = DiffuEraserUNet.from_config(unet_config)
    lora.save_pcm_lora(paths["pcm_lora"], unet, seed=2)
    propainter.save_propainter_weights(paths["propainter"], seed=3)
    # fp16 files: half the bytes to write and read; ComfyUI casts them to its compute dtype on load.
    sd15.save_vae(paths["vae"], config=sd15.FULL_VAE_CONFIG, layout="ldm", seed=4, dtype=torch.float16)
    sd15.save_text_encoder(paths["clip_l"], config=sd15.FULL_TEXT_CONFIG, seed=5, dtype=torch.float16)
    return paths


def hole_box(frame_index: int, height: int, width: int) -> Tuple[int, int, int, int]:
    """The removed object's box (top, left, bottom, right) in frame ``frame_index``: a square moving right."""
    side = max(8, min(height, width) // 4)
    top = (height - side) // 2
    left = (width // 8 + 2 * frame_index) % max(1, width - side)
    return top, left, top + side, left + side


def make_frames(num_frames: int, height: int, width: int) -> np.ndarray:
    """uint8 [T,H,W,3]: a smooth moving gradient (the background) with a solid red square (the object)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    for t in range(num_frames):
        frames[t, ..., 0] = (64 + 60 * np.sin((xx + 3 * t) / 9.0)).astype(np.uint8)
        frames[t, ..., 1] = (96 + 80 * yy / height).astype(np.uint8)
        frames[t, ..., 2] = (128 + 60 * np.cos((yy - 2 * t) / 7.0)).astype(np.uint8)
        top, left, bottom, right = hole_box(t, height, width)
        frames[t, top:bottom, left:right] = (250, 20, 20)
    return frames


def make_holes(num_frames: int, height: int, width: int) -> np.ndarray:
    """bool [T,H,W], True where the object is."""
    holes = np.zeros((num_frames, height, width), bool)
    for t in range(num_frames):
        top, left, bottom, right = hole_box(t, height, width)
        holes[t, top:bottom, left:right] = True
    return holes


def write_video(path: str, frames: np.ndarray, fps: int = 30) -> None:
    """Frames -> H.264 mp4 (near-lossless, so a white/black mask video stays binary after decoding)."""
    import av

    with av.open(path, mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = int(frames.shape[2]), int(frames.shape[1])
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "1", "preset": "ultrafast"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_mask_png(path: str, hole: np.ndarray) -> None:
    """One mask as LoadImage reads it: its MASK output is 1 - alpha, so the hole is transparent."""
    from PIL import Image

    rgba = np.full(hole.shape + (4,), 255, np.uint8)
    rgba[hole, 3] = 0
    Image.fromarray(rgba, mode="RGBA").save(path)


def read_video(path: str) -> np.ndarray:
    """uint8 [T,H,W,3] of a video file."""
    import av

    with av.open(path) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    return np.stack(frames)


# ----------------------------------------------------------------------------------------------------------------
# server process, HTTP and websocket


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


class ComfyServer:
    """One ComfyUI process on 127.0.0.1 with ``base_dir`` as its base directory."""

    def __init__(self, comfyui_dir: str, python: str, base_dir: str, log_path: str):
        self.comfyui_dir = comfyui_dir
        self.python = python
        self.base_dir = base_dir
        self.log_path = log_path
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.process: Optional[subprocess.Popen] = None
        # No proxy, ever: the traffic must stay on 127.0.0.1 whatever the environment says.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def command(self) -> List[str]:
        return [
            self.python, "main.py", "--cpu", "--listen", HOST, "--port", str(self.port),
            "--base-directory", self.base_dir, "--disable-auto-launch",
            # The default database lives inside the ComfyUI checkout; keep the checkout untouched.
            "--database-url", "sqlite:///:memory:",
        ]

    def start(self) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        # The pack must find its models through ComfyUI's folders, and never download.
        for name in ("DIFFUERASER_MODELS_DIR", "DIFFUERASER_ALLOW_DOWNLOAD"):
            env.pop(name, None)
        with open(self.log_path, "wb") as log_file:
            self.process = subprocess.Popen(
                self.command(), cwd=self.comfyui_dir, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode} while starting:\n{self.log_tail()}")
            try:
                self.get_json("/object_info", timeout=HTTP_TIMEOUT_S)
                return
            except (urllib.error.URLError, ConnectionError, socket.timeout, OSError):
                time.sleep(POLL_INTERVAL_S)
        raise TimeoutError(f"ComfyUI did not answer /object_info within {SERVER_START_TIMEOUT_S} s:\n{self.log_tail()}")

    def stop(self) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        # The process group is the one start_new_session created for this server (its pid): only what it spawned.
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=SERVER_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=SERVER_STOP_TIMEOUT_S)
        except ProcessLookupError:
            pass

    def log_text(self) -> str:
        try:
            with open(self.log_path, "r", encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    # HTTP -------------------------------------------------------------------------------------------------------

    def _request(self, path: str, data: Optional[bytes] = None, timeout: float = HTTP_TIMEOUT_S):
        request = urllib.request.Request(self.url + path, data=data, method="POST" if data is not None else "GET")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        return self._opener.open(request, timeout=timeout)

    def get_json(self, path: str, timeout: float = HTTP_TIMEOUT_S):
        with self._request(path, timeout=timeout) as response:
            return json.loads(response.read().decode("utf-8"))

    def post_json(self, path: str, payload: dict, timeout: float = HTTP_TIMEOUT_S) -> Tuple[int, object]:
        body = json.dumps(payload).encode("utf-8")
        try:
            with self._request(path, data=body, timeout=timeout) as response:
                status, text = response.status, response.read().decode("utf-8")
        except urllib.error.HTTPError as exc:
            status, text = exc.code, exc.read().decode("utf-8", errors="replace")
        try:
            return status, json.loads(text) if text else None
        except json.JSONDecodeError:
            return status, text

    def queue_prompt(self, prompt: dict, client_id: str) -> str:
        status, answer = self.post_json("/prompt", {"prompt": prompt, "client_id": client_id})
        if status != 200 or not isinstance(answer, dict) or "prompt_id" not in answer:
            raise AssertionError(f"/prompt refused the prompt (HTTP {status}): {json.dumps(answer, indent=1)[:4000]}")
        return answer["prompt_id"]

    def wait_history(self, prompt_id: str, timeout_s: float) -> dict:
        """The prompt's /history entry once it finished (success, error or interrupted)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            entry = self.get_json(f"/history/{prompt_id}").get(prompt_id)
            # The entry is written once, when the prompt finished (status_str "success", or "error" for errors
            # and interrupts).
            if entry is not None and "status" in entry:
                return entry
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"ComfyUI died while running {prompt_id}:\n{self.log_tail()}")
            time.sleep(POLL_INTERVAL_S)
        # Leave the server free for the next test: drop the prompt from the queue and stop it if it runs.
        self.post_json("/queue", {"delete": [prompt_id]})
        self.interrupt(prompt_id)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout_s} s:\n{self.log_tail()}")

    def interrupt(self, prompt_id: Optional[str] = None) -> None:
        status, _ = self.post_json("/interrupt", {"prompt_id": prompt_id} if prompt_id else {})
        assert status == 200, f"/interrupt answered HTTP {status}"

    def open_websocket(self, client_id: str) -> "WebSocketEvents":
        return WebSocketEvents(HOST, self.port, client_id)


def progress_of(event: dict, prompt_id: str, node_id: str) -> Optional[Tuple[float, float]]:
    """(value, max) when ``event`` reports progress of ``node_id`` in ``prompt_id``, else None.

    Two message kinds carry it: ``progress`` (comfy.utils.ProgressBar) and ``progress_state`` (what the V3 API's
    ``set_progress`` sends: every running node's value/max at once).
    """
    data = event.get("data") or {}
    if data.get("prompt_id") != prompt_id:
        return None
    if event.get("type") == "progress" and str(data.get("node")) == str(node_id):
        return float(data["value"]), float(data["max"])
    if event.get("type") == "progress_state":
        state = (data.get("nodes") or {}).get(str(node_id))
        if state and state.get("state") == "running" and float(state.get("value", 0)) > 0:
            return float(state["value"]), float(state["max"])
    return None


class WebSocketEvents:
    """Minimal RFC 6455 client for ComfyUI's /ws: a reader thread puts every JSON text message in a queue.

    Only what the tests need: no extensions, text frames decoded as JSON; a binary frame (a preview image) becomes
    ``{"type": "binary_preview", "bytes": n}``. Every event gets ``"_t"``: ``time.monotonic()`` when it arrived.
    """

    def __init__(self, host: str, port: int, client_id: str, timeout_s: float = HTTP_TIMEOUT_S):
        self.events: "queue.Queue[dict]" = queue.Queue()
        self._sock = socket.create_connection((host, port), timeout=timeout_s)
        key = base64.b64encode(os.urandom(16)).decode("ascii")
        handshake = (
            f"GET /ws?clientId={client_id} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        self._sock.sendall(handshake.encode("ascii"))
        header = b""
        while b"\r\n\r\n" not in header:
            chunk = self._sock.recv(1024)
            if not chunk:
                raise ConnectionError("websocket handshake: connection closed")
            header += chunk
        head, self._buffer = header.split(b"\r\n\r\n", 1)
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise ConnectionError(f"websocket handshake refused: {head[:200]!r}")
        self._sock.settimeout(None)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._read_loop, name="comfyui-ws", daemon=True)
        self._thread.start()

    def _read_exact(self, n: int) -> bytes:
        while len(self._buffer) < n:
            chunk = self._sock.recv(65536)
            if not chunk:
                raise ConnectionError("websocket closed")
            self._buffer += chunk
        data, self._buffer = self._buffer[:n], self._buffer[n:]
        return data

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)  # client frames are always masked
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self._sock.sendall(bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked)

    def _read_loop(self) -> None:
        message, message_opcode = b"", None
        try:
            while not self._closed.is_set():
                first, second = self._read_exact(2)
                fin, opcode, length = first & 0x80, first & 0x0F, second & 0x7F
                if length == 126:
                    length = struct.unpack(">H", self._read_exact(2))[0]
                elif length == 127:
                    length = struct.unpack(">Q", self._read_exact(8))[0]
                mask = self._read_exact(4) if second & 0x80 else None
                payload = self._read_exact(length)
                if mask:
                    payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
                if opcode == 0x8:  # close
                    break
                if opcode == 0x9:  # ping
                    self._send_frame(0xA, payload[:125])
                    continue
                if opcode in (0x1, 0x2):
                    message, message_opcode = payload, opcode
                elif opcode == 0x0:
                    message += payload
                if fin and message_opcode == 0x1:
                    event = json.loads(message.decode("utf-8"))
                    event["_t"] = time.monotonic()
                    self.events.put(event)
                elif fin and message_opcode == 0x2:
                    self.events.put({"type": "binary_preview", "bytes": len(message), "_t": time.monotonic()})
                if fin:
                    message, message_opcode = b"", None
        except (OSError, ConnectionError, ValueError):
            pass
        finally:
            self._closed.set()

    def wait_for(self, predicate: Callable[[dict], bool], timeout_s: float, seen: Optional[list] = None) -> dict:
        """First event matching ``predicate`` within ``timeout_s``; every event read is appended to ``seen``."""
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no matching websocket event within {timeout_s} s")
            try:
                event = self.events.get(timeout=min(left, POLL_INTERVAL_S))
            except queue.Empty:
                if self._closed.is_set():
                    raise ConnectionError("websocket closed while waiting")
                continue
            if seen is not None:
                seen.append(event)
            if predicate(event):
                return event

    def close(self) -> None:
        self._closed.set()
        try:
            self._send_frame(0x8, b"")
        except OSError:
            pass
        try:
            self._sock.close()
        except OSError:
            pass


def new_client_id() -> str:
    return uuid.uuid4().hex


# ----------------------------------------------------------------------------------------------------------------
# UI format -> API format


def _is_widget(spec) -> bool:
    kind = spec[0]
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return (isinstance(kind, list) or kind in WIDGET_TYPES) and not opts.get("forceInput")


def _widget_layout(info: dict) -> List[Tuple[str, int]]:
    """[(input name, number of widgets_values entries it takes)] in the frontend's order."""
    layout = []
    for section in ("required", "optional"):
        specs = info["input"].get(section, {})
        for name in info.get("input_order", {}).get(section, list(specs)):
            spec = specs[name]
            if not _is_widget(spec):
                continue
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            extra = 0
            seed_like = spec[0] == "INT" and name in IMPLICIT_SEED_NAMES
            if opts.get("control_after_generate") or seed_like:
                extra += 1
            if any(opts.get(flag) for flag in UPLOAD_OPTIONS):
                extra += 1
            layout.append((name, 1 + extra))
    return layout


def ui_to_api(workflow: dict, object_info: dict,
              replace_value: Optional[Callable[[str, str, object], object]] = None) -> dict:
    """API-format prompt of a UI-format workflow.

    ``replace_value(node_type, input_name, value)`` may swap widget values (input file names). Raises
    AssertionError naming the node when a node type is unknown to the server or its widgets_values do not match
    the node's declared widgets.
    """
    nodes = {int(node["id"]): node for node in workflow["nodes"]}
    links = {int(link[0]): (int(link[1]), int(link[2])) for link in workflow.get("links", [])}

    def source_of(link_id: int) -> Tuple[int, int]:
        origin, slot = links[int(link_id)]
        hops = 0
        while nodes[origin]["type"] == REROUTE_TYPE:  # follow reroutes to the real producer
            upstream = nodes[origin]["inputs"][0].get("link")
            assert upstream is not None and hops < len(nodes), f"dangling reroute {origin}"
            origin, slot = links[int(upstream)]
            hops += 1
        return origin, slot

    prompt = {}
    for node_id, node in sorted(nodes.items()):
        node_type = node["type"]
        if node_type in FRONTEND_ONLY_TYPES or node_type == REROUTE_TYPE or node.get("mode", 0) == MODE_MUTED:
            continue
        assert node.get("mode", 0) != MODE_BYPASS, f"node {node_id} ({node_type}) is bypassed; not supported here"
        assert node_type in object_info, f"node {node_id}: type {node_type!r} is not known to the server"
        info = object_info[node_type]
        linked = {i["name"]: i["link"] for i in node.get("inputs", []) if i.get("link") is not None}
        values = node.get("widgets_values") or []
        inputs = {}
        if isinstance(values, dict):
            for name, _ in _widget_layout(info):
                if name in values:
                    inputs[name] = values[name]
        else:
            position = 0
            for name, width in _widget_layout(info):
                assert position < len(values), (
                    f"node {node_id} ({node_type}): widgets_values {values} has no value for widget {name!r}")
                inputs[name] = values[position]
                position += width
            assert position == len(values), (
                f"node {node_id} ({node_type}): widgets_values {values} has {len(values)} entries but the "
                f"declared widgets {_widget_layout(info)} take {position}")
        if replace_value is not None:
            inputs = {name: replace_value(node_type, name, value) for name, value in inputs.items()}
        for name, link_id in linked.items():
            origin, slot = source_of(link_id)
            inputs[name] = [str(origin), slot]
        prompt[str(node_id)] = {"class_type": node_type, "inputs": inputs}
    return prompt


def saved_files(history_entry: dict, output_dir: str) -> List[str]:
    """Absolute paths of every file the prompt's output nodes saved into the output folder."""
    paths = []
    for node_output in history_entry.get("outputs", {}).values():
        for items in node_output.values():
            if not isinstance(items, list):
                continue
            for item in items:
                if isinstance(item, dict) and item.get("type") == "output" and "filename" in item:
                    paths.append(os.path.join(output_dir, item.get("subfolder", ""), item["filename"]))
    return paths
