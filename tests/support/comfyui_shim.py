"""A loopback server that speaks ComfyUI's HTTP and websocket API, for tests.

A real ComfyUI cannot run here: it is not on PyPI, and a text-to-image workflow needs model
weights (an SDXL checkpoint is ~7 GB) that are not available offline. This shim keeps ComfyUI's
shapes as its source has them (comfyanonymous/ComfyUI, now Comfy-Org/ComfyUI):

- server.py: ``POST /prompt`` (200 ``{prompt_id, number, node_errors}``; 400 ``{error,
  node_errors}``), ``GET /history/{prompt_id}`` (``{}`` until done), ``GET /view`` (404 when
  missing, 400 for ``..``), ``GET /object_info``, ``POST /interrupt``, ``POST /queue``, and
  ``GET /ws?clientId=`` sending ``{"type", "data"}`` text frames, ``status`` first.
- execution.py: ``validate_prompt``/``validate_inputs`` (``invalid_prompt`` for an unknown
  class_type, as the FACTS measurement saw, or ``missing_node_type`` as the current source
  has it; ``prompt_no_outputs``; ``prompt_outputs_failed_validation`` with per-node
  ``required_input_missing``, ``invalid_input_type``, ``value_not_in_list``...), and the
  messages ``execution_start``, ``execution_cached``, ``executing``, ``progress``,
  ``executed``, ``execution_success`` / ``execution_error``.
- main.py: the history entry (``status_str``, ``completed``, ``messages``) is written before
  the final ``executing {node: None}``.
- nodes.py: the node classes' inputs and SaveImage's ``{"images": [{filename, subfolder,
  type}]}``.

Execution is simulated: KSampler reports ``steps`` progress ticks and SaveImage writes a real
PNG (zlib + struct) of the latent's size. Set ``fail_node`` (a node id or class_type) to make a
run fail at that node with ``execution_error``; ``websocket=False`` answers ``/ws`` with 404 so
clients must poll.
"""

from __future__ import annotations

import base64
import hashlib
import json
import queue
import socket
import struct
import threading
import time
import uuid
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

__all__ = ["ComfyUIShim", "closed_port_url", "png_bytes", "png_size"]

_WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MAX_RESOLUTION = 16384  # nodes.py
CHECKPOINTS = ["sd_xl_base_1.0.safetensors", "v1-5-pruned-emaonly.safetensors"]
SAMPLERS = ["euler", "euler_ancestral", "heun", "dpm_2", "dpmpp_2m", "dpmpp_sde", "ddim"]
SCHEDULERS = ["normal", "karras", "exponential", "sgm_uniform", "simple", "ddim_uniform"]

# nodes.py INPUT_TYPES / RETURN_TYPES / OUTPUT_NODE of the classes the templates use.
NODES: dict[str, dict[str, Any]] = {
    "CheckpointLoaderSimple": {
        "input": {"required": {"ckpt_name": [CHECKPOINTS]}},
        "output": ["MODEL", "CLIP", "VAE"],
        "category": "loaders",
    },
    "CLIPTextEncode": {
        "input": {
            "required": {
                "text": ["STRING", {"multiline": True, "dynamicPrompts": True}],
                "clip": ["CLIP"],
            }
        },
        "output": ["CONDITIONING"],
        "category": "conditioning",
    },
    "EmptyLatentImage": {
        "input": {
            "required": {
                "width": ["INT", {"default": 512, "min": 16, "max": MAX_RESOLUTION, "step": 8}],
                "height": ["INT", {"default": 512, "min": 16, "max": MAX_RESOLUTION, "step": 8}],
                "batch_size": ["INT", {"default": 1, "min": 1, "max": 4096}],
            }
        },
        "output": ["LATENT"],
        "category": "latent",
    },
    "KSampler": {
        "input": {
            "required": {
                "model": ["MODEL"],
                "seed": ["INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF}],
                "steps": ["INT", {"default": 20, "min": 1, "max": 10000}],
                "cfg": ["FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1}],
                "sampler_name": [SAMPLERS],
                "scheduler": [SCHEDULERS],
                "positive": ["CONDITIONING"],
                "negative": ["CONDITIONING"],
                "latent_image": ["LATENT"],
                "denoise": ["FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}],
            }
        },
        "output": ["LATENT"],
        "category": "sampling",
    },
    "VAEDecode": {
        "input": {"required": {"samples": ["LATENT"], "vae": ["VAE"]}},
        "output": ["IMAGE"],
        "category": "latent",
    },
    "SaveImage": {
        "input": {
            "required": {
                "images": ["IMAGE"],
                "filename_prefix": ["STRING", {"default": "ComfyUI"}],
            },
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        },
        "output": [],
        "output_node": True,
        "category": "image",
    },
}


def png_bytes(width: int, height: int, rgb: tuple[int, int, int]) -> bytes:
    """A real PNG of one colour (8-bit RGB), built with zlib and struct."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    row = b"\x00" + bytes(rgb) * width  # filter type 0, then the pixels
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(row * height, 6))
        + chunk(b"IEND", b"")
    )


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR (and proof that it is one)."""
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        raise ValueError("not a PNG")
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def closed_port_url() -> str:
    """An http URL on loopback where nothing listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def _node_info(name: str) -> dict[str, Any]:
    """server.py ``node_info``."""
    spec = NODES[name]
    outputs = spec["output"]
    return {
        "input": spec["input"],
        "input_order": {k: list(v) for k, v in spec["input"].items() if k != "hidden"},
        "output": outputs,
        "output_is_list": [False] * len(outputs),
        "output_name": outputs,
        "name": name,
        "display_name": name,
        "description": "",
        "python_module": "nodes",
        "category": spec["category"],
        "output_node": bool(spec.get("output_node", False)),
    }


def _is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2


class _Socket:
    """One websocket connection (RFC 6455): unmasked server frames, masked client frames."""

    def __init__(self, handler: BaseHTTPRequestHandler):
        self.rfile = handler.rfile
        self.wfile = handler.wfile
        self.lock = threading.Lock()
        self.open = True

    def send_json(self, event: str, data: dict[str, Any]) -> None:
        self.send(0x1, json.dumps({"type": event, "data": data}).encode())

    def send(self, opcode: int, payload: bytes) -> None:
        n = len(payload)
        if n < 126:
            head = struct.pack(">BB", 0x80 | opcode, n)
        elif n < 65536:
            head = struct.pack(">BBH", 0x80 | opcode, 126, n)
        else:
            head = struct.pack(">BBQ", 0x80 | opcode, 127, n)
        with self.lock:
            if not self.open:
                return
            try:
                self.wfile.write(head + payload)
                self.wfile.flush()
            except OSError:
                self.open = False

    def read(self) -> tuple[int, bytes] | None:
        head = self.rfile.read(2)
        if len(head) < 2:
            return None
        opcode, n = head[0] & 0x0F, head[1] & 0x7F
        if n == 126:
            (n,) = struct.unpack(">H", self.rfile.read(2))
        elif n == 127:
            (n,) = struct.unpack(">Q", self.rfile.read(8))
        mask = self.rfile.read(4) if head[1] & 0x80 else b"\x00\x00\x00\x00"
        data = self.rfile.read(n)
        return opcode, bytes(b ^ mask[i % 4] for i, b in enumerate(data))


class _Handler(BaseHTTPRequestHandler):
    shim: ComfyUIShim
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def _json(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _empty(self, status: int) -> None:
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(length) or b"{}")

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        path = parts.path.removeprefix("/api")
        self.shim.requests.append(f"GET {path}")
        if path == "/ws":
            self._websocket(query.get("clientId", ""))
        elif path == "/object_info":
            self._json(200, {name: _node_info(name) for name in NODES})
        elif path.startswith("/object_info/"):
            name = path.split("/", 2)[2]
            self._json(200, {name: _node_info(name)} if name in NODES else {})
        elif path.startswith("/history/"):
            prompt_id = path.split("/", 2)[2]
            with self.shim.lock:
                entry = self.shim.history.get(prompt_id)
            self._json(200, {prompt_id: entry} if entry is not None else {})
        elif path == "/view":
            self._view(query)
        else:
            self._empty(404)

    def do_POST(self) -> None:
        path = urlsplit(self.path).path.removeprefix("/api")
        self.shim.requests.append(f"POST {path}")
        try:
            body = self._body()
        except ValueError:  # aiohttp's request.json() raises: a plain-text 500
            data = b"500 Internal Server Error\n\nServer got itself in trouble"
            self.send_response(500)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        if path == "/prompt":
            status, answer = self.shim.queue_prompt(body)
            self._json(status, answer)
        elif path in ("/interrupt", "/queue"):
            self.shim.interrupts.append((path, body))
            self._empty(200)
        else:
            self._empty(404)

    def _view(self, query: dict[str, str]) -> None:
        filename = query.get("filename", "")
        if not filename:
            self._empty(404)
            return
        if filename[0] == "/" or ".." in filename:
            self._empty(400)
            return
        key = (query.get("type", "output"), query.get("subfolder", ""), filename)
        with self.shim.lock:
            data = self.shim.files.get(key)
        if data is None:
            self._empty(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Disposition", f'filename="{filename}"')
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _websocket(self, client_id: str) -> None:
        if not self.shim.websocket or self.headers.get("Upgrade", "").lower() != "websocket":
            self._empty(404)
            return
        key = self.headers.get("Sec-WebSocket-Key", "")
        accept = base64.b64encode(hashlib.sha1((key + _WS_GUID).encode()).digest()).decode()
        sid = client_id or uuid.uuid4().hex
        sock = _Socket(self)
        with sock.lock:  # registered before the client can send a prompt
            self.send_response(101, "Switching Protocols")
            self.send_header("Upgrade", "websocket")
            self.send_header("Connection", "Upgrade")
            self.send_header("Sec-WebSocket-Accept", accept)
            self.end_headers()
            self.wfile.flush()
            with self.shim.lock:
                self.shim.sockets[sid] = sock
        sock.send_json("status", {"status": self.shim.queue_info(), "sid": sid})
        self.close_connection = True
        try:
            while (frame := sock.read()) is not None:
                opcode, payload = frame
                if opcode == 0x8:  # close: answer it and stop
                    sock.send(0x8, payload[:2])
                    break
                if opcode == 0x9:  # ping
                    sock.send(0xA, payload)
        except OSError:
            pass
        finally:
            sock.open = False
            with self.shim.lock:
                if self.shim.sockets.get(sid) is sock:
                    del self.shim.sockets[sid]


class ComfyUIShim:
    """Start with ``with ComfyUIShim() as shim:``; ``shim.url`` is its base URL."""

    def __init__(
        self,
        *,
        websocket: bool = True,
        validation: str = "invalid_prompt",
        fail_node: str | None = None,
        fail_message: str = "Allocation on device",
        step_delay_s: float = 0.0,
    ):
        self.websocket = websocket
        self.validation = validation  # "invalid_prompt" (measured) or "missing_node_type"
        self.fail_node = fail_node
        self.fail_message = fail_message
        self.step_delay_s = step_delay_s
        self.lock = threading.Lock()
        self.history: dict[str, dict[str, Any]] = {}
        self.files: dict[tuple[str, str, str], bytes] = {}
        self.sockets: dict[str, _Socket] = {}
        self.prompts: list[dict[str, Any]] = []  # every accepted POST /prompt body
        self.requests: list[str] = []
        self.interrupts: list[tuple[str, Any]] = []
        self.number = 0
        self._counter = 0
        self._queue: queue.Queue[tuple[float, str, dict[str, Any], dict[str, Any]] | None] = (
            queue.Queue()
        )
        handler = type("Handler", (_Handler,), {"shim": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._threads = [
            threading.Thread(target=self._server.serve_forever, daemon=True),
            threading.Thread(target=self._worker, daemon=True),
        ]

    def __enter__(self) -> ComfyUIShim:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._queue.put(None)
        self._server.shutdown()
        self._server.server_close()
        with self.lock:
            for sock in self.sockets.values():
                sock.open = False

    def queue_info(self) -> dict[str, Any]:
        return {"exec_info": {"queue_remaining": self._queue.qsize()}}

    # -- POST /prompt (server.py post_prompt + execution.py validate_prompt) ---------------------
    def queue_prompt(self, body: Any) -> tuple[int, dict[str, Any]]:
        if not isinstance(body, dict) or "prompt" not in body:
            error = {"type": "no_prompt", "message": "No prompt provided",
                     "details": "No prompt provided", "extra_info": {}}  # fmt: skip
            return 400, {"error": error, "node_errors": {}}
        prompt = body["prompt"]
        ok, error, outputs, node_errors = self.validate(prompt)
        if not ok:
            return 400, {"error": error, "node_errors": node_errors}
        with self.lock:
            number = self.number
            self.number += 1
            self.prompts.append(body)
        prompt_id = str(uuid.uuid4())
        extra = {"client_id": body["client_id"]} if "client_id" in body else {}
        self._queue.put((number, prompt_id, prompt, {**extra, "outputs": outputs}))
        self.broadcast("status", {"status": self.queue_info()})
        return 200, {"prompt_id": prompt_id, "number": number, "node_errors": node_errors}

    def validate(self, prompt: dict[str, Any]) -> tuple[bool, Any, list[str], dict[str, Any]]:
        outputs = []
        for node_id, node in prompt.items():
            class_type = node.get("class_type") if isinstance(node, dict) else None
            if class_type not in NODES:
                return False, self._unknown(node_id, class_type), [], {}
            if NODES[class_type].get("output_node"):
                outputs.append(node_id)
        if not outputs:
            error = {"type": "prompt_no_outputs", "message": "Prompt has no outputs",
                     "details": "", "extra_info": {}}  # fmt: skip
            return False, error, [], {}
        validated: dict[str, list[dict[str, Any]]] = {}
        for output in outputs:
            self._validate_inputs(prompt, output, validated)
        node_errors: dict[str, Any] = {}
        for node_id, reasons in validated.items():
            if reasons:
                node_errors[node_id] = {
                    "errors": reasons,
                    "dependent_outputs": list(outputs),
                    "class_type": prompt[node_id]["class_type"],
                }
        if node_errors:
            details = "\n".join(
                f"{e['message']}: {e['details']}" for r in validated.values() for e in r
            )
            error = {"type": "prompt_outputs_failed_validation",
                     "message": "Prompt outputs failed validation",
                     "details": details, "extra_info": {}}  # fmt: skip
            return False, error, [], node_errors
        return True, None, outputs, {}

    def _unknown(self, node_id: str, class_type: Any) -> dict[str, Any]:
        if self.validation == "missing_node_type":  # the current execution.py
            return {
                "type": "missing_node_type",
                "message": f"Node '{class_type}' not found. The custom node may not be installed.",
                "details": f"Node ID '#{node_id}'",
                "extra_info": {"node_id": node_id, "class_type": class_type,
                               "node_title": class_type},
            }  # fmt: skip
        return {
            "type": "invalid_prompt",
            "message": f"Cannot execute because node {class_type} does not exist.",
            "details": f"Node ID '#{node_id}'",
            "extra_info": {},
        }

    def _validate_inputs(
        self, prompt: dict[str, Any], node_id: str, validated: dict[str, list[dict[str, Any]]]
    ) -> None:
        if node_id in validated:
            return
        validated[node_id] = errors = []
        node = prompt[node_id]
        inputs = node.get("inputs") or {}
        required = NODES[node["class_type"]]["input"]["required"]
        for name, spec in required.items():
            if name not in inputs:
                errors.append({"type": "required_input_missing",
                               "message": "Required input is missing",
                               "details": name, "extra_info": {"input_name": name}})  # fmt: skip
                continue
            value = inputs[name]
            if _is_link(value):
                source = prompt.get(str(value[0]))
                got = NODES.get(source["class_type"], {}).get("output", []) if source else []
                received = (
                    got[value[1]] if isinstance(value[1], int) and value[1] < len(got) else None
                )
                if received != spec[0]:
                    errors.append({"type": "return_type_mismatch",
                                   "message": "Return type mismatch between linked nodes",
                                   "details": f"{name}, received_type({received}) mismatch "
                                              f"input_type({spec[0]})",
                                   "extra_info": {"input_name": name}})  # fmt: skip
                    continue
                self._validate_inputs(prompt, str(value[0]), validated)
                continue
            error = self._check_value(name, spec, value)
            if error is not None:
                errors.append(error)

    @staticmethod
    def _check_value(name: str, spec: list[Any], value: Any) -> dict[str, Any] | None:
        kind, extra = spec[0], (spec[1] if len(spec) > 1 else {})
        if isinstance(kind, list):
            if value not in kind:
                return {"type": "value_not_in_list", "message": "Value not in list",
                        "details": f"{name}: {value!r} not in {kind}",
                        "extra_info": {"input_name": name, "received_value": value}}  # fmt: skip
            return None
        try:
            value = {"INT": int, "FLOAT": float, "STRING": str}.get(kind, lambda v: v)(value)
        except (TypeError, ValueError) as exc:
            return {"type": "invalid_input_type",
                    "message": f"Failed to convert an input value to a {kind} value",
                    "details": f"{name}, {value}, {exc}",
                    "extra_info": {"input_name": name, "received_value": value}}  # fmt: skip
        if "min" in extra and value < extra["min"]:
            return {"type": "value_smaller_than_min",
                    "message": f"Value {value} smaller than min of {extra['min']}",
                    "details": name, "extra_info": {"input_name": name}}  # fmt: skip
        if "max" in extra and value > extra["max"]:
            return {"type": "value_bigger_than_max",
                    "message": f"Value {value} bigger than max of {extra['max']}",
                    "details": name, "extra_info": {"input_name": name}}  # fmt: skip
        return None

    # -- execution (execution.py PromptExecutor, main.py prompt_worker) --------------------------
    def send(self, sid: str | None, event: str, data: dict[str, Any]) -> None:
        with self.lock:
            sock = self.sockets.get(sid) if sid else None
        if sock is not None:
            sock.send_json(event, data)

    def broadcast(self, event: str, data: dict[str, Any]) -> None:
        with self.lock:
            sockets = list(self.sockets.values())
        for sock in sockets:
            sock.send_json(event, data)

    def _worker(self) -> None:
        while (item := self._queue.get()) is not None:
            number, prompt_id, prompt, extra = item
            self._execute(number, prompt_id, prompt, extra)

    def _execute(
        self, number: float, prompt_id: str, prompt: dict[str, Any], extra: dict[str, Any]
    ) -> None:
        sid = extra.get("client_id")
        messages: list[list[Any]] = []

        def message(event: str, data: dict[str, Any]) -> None:  # PromptExecutor.add_message
            data = {**data, "timestamp": int(time.time() * 1000)}
            messages.append([event, data])
            self.send(sid, event, data)

        message("execution_start", {"prompt_id": prompt_id})
        message("execution_cached", {"nodes": [], "prompt_id": prompt_id})
        outputs: dict[str, Any] = {}
        executed: list[str] = []
        ok = True
        for node_id in self._order(prompt):
            node = prompt[node_id]
            self.send(sid, "executing", {"node": node_id, "display_node": node_id,
                                         "prompt_id": prompt_id})  # fmt: skip
            if self.fail_node in (node_id, node["class_type"]):
                message("execution_error", {
                    "prompt_id": prompt_id, "node_id": node_id,
                    "node_type": node["class_type"], "executed": list(executed),
                    "exception_message": f"{self.fail_message}\n",
                    "exception_type": "torch.OutOfMemoryError",
                    "traceback": ["  File \"execution.py\", line 1, in execute\n"],
                    "current_inputs": {}, "current_outputs": list(executed),
                })  # fmt: skip
                ok = False
                break
            self._run_node(sid, prompt_id, prompt, node_id, outputs)
            executed.append(node_id)
        if ok:
            message("execution_success", {"prompt_id": prompt_id})
        entry = {
            "prompt": [number, prompt_id, prompt, {k: v for k, v in extra.items()
                                                    if k != "outputs"}, extra["outputs"]],
            "outputs": outputs,
            "status": {"status_str": "success" if ok else "error", "completed": ok,
                       "messages": messages},
            "meta": {n: {"node_id": n, "display_node": n, "parent_node": None,
                         "real_node_id": n} for n in outputs},
        }  # fmt: skip
        with self.lock:
            self.history[prompt_id] = entry
        self.send(sid, "executing", {"node": None, "prompt_id": prompt_id})
        self.broadcast("status", {"status": self.queue_info()})

    def _run_node(
        self,
        sid: str | None,
        prompt_id: str,
        prompt: dict[str, Any],
        node_id: str,
        outputs: dict[str, Any],
    ) -> None:
        node = prompt[node_id]
        inputs = node["inputs"]
        if node["class_type"] == "KSampler":
            steps = int(inputs["steps"])
            for step in range(1, steps + 1):
                if self.step_delay_s:
                    time.sleep(self.step_delay_s)
                self.send(sid, "progress", {"value": step, "max": steps,
                                            "prompt_id": prompt_id, "node": node_id})  # fmt: skip
        if node["class_type"] == "SaveImage":
            images = self._save(prompt, inputs)
            outputs[node_id] = {"images": images}
            self.send(sid, "executed", {"node": node_id, "display_node": node_id,
                                        "output": {"images": images},
                                        "prompt_id": prompt_id})  # fmt: skip

    def _save(self, prompt: dict[str, Any], inputs: dict[str, Any]) -> list[dict[str, Any]]:
        """SaveImage: one PNG per latent in the batch, coloured by the positive prompt."""
        width, height, batch, text = self._trace(prompt, inputs["images"])
        prefix = str(inputs["filename_prefix"])
        subfolder, _, base = prefix.rpartition("/")
        digest = hashlib.sha256(text.encode()).digest()
        images = []
        for _ in range(batch):
            with self.lock:
                self._counter += 1
                filename = f"{base}_{self._counter:05}_.png"
                self.files[("output", subfolder, filename)] = png_bytes(
                    width, height, (digest[0], digest[1], digest[2])
                )
            images.append({"filename": filename, "subfolder": subfolder, "type": "output"})
        return images

    @staticmethod
    def _trace(prompt: dict[str, Any], link: list[Any]) -> tuple[int, int, int, str]:
        """Follow VAEDecode -> KSampler to the latent's size and the positive prompt."""
        width, height, batch, text = 64, 64, 1, ""
        seen: set[str] = set()
        stack = [str(link[0])]
        while stack:
            node_id = stack.pop()
            if node_id in seen or node_id not in prompt:
                continue
            seen.add(node_id)
            node = prompt[node_id]
            inputs = node["inputs"]
            if node["class_type"] == "EmptyLatentImage":
                width, height = int(inputs["width"]), int(inputs["height"])
                batch = int(inputs["batch_size"])
            if node["class_type"] == "KSampler" and _is_link(inputs.get("positive")):
                positive = prompt.get(str(inputs["positive"][0]), {})
                text = str(positive.get("inputs", {}).get("text", ""))
            stack += [str(v[0]) for v in inputs.values() if _is_link(v)]
        return width, height, batch, text

    @staticmethod
    def _order(prompt: dict[str, Any]) -> list[str]:
        """Nodes after the nodes they link to."""
        order: list[str] = []

        def visit(node_id: str) -> None:
            if node_id in order or node_id not in prompt:
                return
            for value in prompt[node_id]["inputs"].values():
                if _is_link(value):
                    visit(str(value[0]))
            order.append(node_id)

        for node_id in prompt:
            visit(node_id)
        return order
