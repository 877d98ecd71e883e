"""ComfyUI over HTTP: workflow templates, submission, progress and image download.

ComfyUI runs "API format" workflows: ``{NODE_ID: {"class_type": ..., "inputs": {...}}}``, where
an input holds a value or a link ``[NODE_ID, OUTPUT_INDEX]``. Typhon ships such workflows as
templates, each with a sidecar ``NAME.params.json`` that maps parameter names to a node id and an
input name; parameters are injected there, and a template is checked (and refused, naming what is
wrong) before anything is sent.

Every server shape read here was checked against ComfyUI's own source (comfyanonymous/ComfyUI,
now Comfy-Org/ComfyUI); each reader names the file it follows:

- ``server.py``: the routes ``POST /prompt``, ``GET /history/{prompt_id}``, ``GET /view``,
  ``GET /object_info``, ``GET /ws``, ``POST /interrupt`` and ``POST /queue``, and the websocket
  envelope ``{"type", "data"}`` (``send_json``; binary frames are previews, ``send_bytes``).
- ``execution.py``: ``validate_prompt``/``validate_inputs`` (the 400 body), the messages
  ``execution_start``, ``execution_cached``, ``executing``, ``executed``, ``execution_success``,
  ``execution_error`` and ``execution_interrupted``, and ``PromptQueue.task_done`` (history).
- ``main.py``: ``prompt_worker`` (history ``status`` = ``{status_str, completed, messages}``,
  then ``executing {node: None}``) and ``hijack_progress`` (``progress {value, max, prompt_id,
  node}``).
- ``nodes.py``: SaveImage's output ``{"images": [{"filename", "subfolder", "type"}]}``.

Progress is followed over the websocket ``/ws?clientId=`` when the ``websockets`` package is
importable (it comes with langgraph's SDK); otherwise, or when the socket fails, by polling
``GET /history/{prompt_id}``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from typhon.errors import CrewError

if TYPE_CHECKING:
    from websockets.sync.client import ClientConnection

__all__ = [
    "ComfyUIClient",
    "ComfyUIError",
    "Image",
    "Param",
    "Progress",
    "Template",
    "TemplateError",
    "load_template",
    "template_names",
]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,80}$")
_NODE_IN_DETAILS = re.compile(r"Node ID '#([^']+)'")  # execution.py: f"Node ID '#{x}'"
_QUIET_S = 5.0  # a silent websocket for this long: look at the history in case we missed the end
_URL_HINT = "set creative.comfyui_url (env TYPHON_CREATIVE__COMFYUI_URL)"


class TemplateError(CrewError):
    """A workflow template or its parameters were refused before submission."""

    code = "invalid_template"


class ComfyUIError(CrewError):
    """ComfyUI refused, failed or could not be reached. ``node_id``/``node_type`` name the node
    at fault when ComfyUI said which one."""

    code = "comfyui_error"

    def __init__(
        self,
        message: str,
        *,
        url: str,
        node_id: str | None = None,
        node_type: str | None = None,
        error_type: str | None = None,
    ):
        self.url = url
        self.node_id = node_id
        self.node_type = node_type
        self.error_type = error_type
        super().__init__(message)


# -- templates ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    """Where a template parameter goes: ``inputs[input]`` of node ``node``. ``format`` wraps a
    string value (``"{value}, studio lighting"``); ``default`` replaces the workflow's value when
    the parameter is not given."""

    name: str
    node: str
    input: str
    required: bool = False
    default: Any = None
    format: str | None = None


@dataclass(frozen=True)
class Template:
    """A workflow in ComfyUI's API format and its parameters."""

    name: str
    workflow: dict[str, Any]
    params: dict[str, Param]
    description: str = ""
    source: str = ""

    def node_type(self, node_id: str) -> str:
        return str(self.workflow.get(node_id, {}).get("class_type", "?"))

    def check(self) -> None:
        """Refuse a malformed workflow or a mapping that points nowhere, naming the node."""
        for node_id, node in self.workflow.items():
            if not isinstance(node, dict) or not isinstance(node.get("class_type"), str):
                raise TemplateError(f"template '{self.name}': node '{node_id}' has no class_type")
            if not isinstance(node.get("inputs"), dict):
                raise TemplateError(f"template '{self.name}': node '{node_id}' has no inputs")
            for input_name, value in node["inputs"].items():
                if _is_link(value) and str(value[0]) not in self.workflow:
                    raise TemplateError(
                        f"template '{self.name}': input '{input_name}' of node '{node_id}' "
                        f"({node['class_type']}) links to node '{value[0]}', which is not in "
                        "the workflow"
                    )
        for param in self.params.values():
            if param.node not in self.workflow:
                raise TemplateError(
                    f"template '{self.name}': parameter '{param.name}' points at node "
                    f"'{param.node}', which is not in the workflow"
                )
            inputs = self.workflow[param.node]["inputs"]
            if param.input not in inputs:
                raise TemplateError(
                    f"template '{self.name}': parameter '{param.name}' points at input "
                    f"'{param.input}' of node '{param.node}' ({self.node_type(param.node)}), "
                    f"which that node does not have; it has: {', '.join(sorted(inputs))}"
                )

    def check_nodes(self, object_info: Mapping[str, Any], url: str) -> None:
        """Refuse nodes the server does not know, or that lack an input it requires
        (``object_info[CLASS]["input"]["required"]``, server.py ``node_info``)."""
        for node_id, node in self.workflow.items():
            class_type = node["class_type"]
            info = object_info.get(class_type)
            if not isinstance(info, dict):
                raise TemplateError(
                    f"template '{self.name}': node '{node_id}' uses class_type '{class_type}', "
                    f"which ComfyUI at {url} does not know; install the custom node that "
                    "provides it or fix the template"
                )
            required = (info.get("input") or {}).get("required") or {}
            for input_name in required:
                if input_name not in node["inputs"]:
                    raise TemplateError(
                        f"template '{self.name}': node '{node_id}' ({class_type}) lacks the "
                        f"input '{input_name}' that ComfyUI at {url} requires"
                    )

    def build(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """The workflow with ``values`` injected by node id and input name."""
        for name in values:
            if name not in self.params:
                raise TemplateError(
                    f"template '{self.name}' has no parameter '{name}'; its parameters: "
                    f"{', '.join(sorted(self.params))}"
                )
        workflow = copy.deepcopy(self.workflow)
        for param in self.params.values():
            if param.name in values and values[param.name] is not None:
                value = values[param.name]
            elif param.required:
                raise TemplateError(f"template '{self.name}' needs the parameter '{param.name}'")
            elif param.default is not None:
                value = param.default
            else:
                continue
            inputs = workflow[param.node]["inputs"]
            inputs[param.input] = self._coerce(param, value, inputs[param.input])
        return workflow

    def _coerce(self, param: Param, value: Any, current: Any) -> Any:
        """Keep the type the workflow has at that input (ComfyUI converts INT/FLOAT/STRING the
        same way in execution.py ``validate_inputs``)."""
        try:
            if isinstance(current, bool):
                return bool(value)
            if isinstance(current, int):
                return int(value)
            if isinstance(current, float):
                return float(value)
        except (TypeError, ValueError):
            kind = "a whole number" if isinstance(current, int) else "a number"
            raise TemplateError(
                f"template '{self.name}': parameter '{param.name}' must be {kind}, not {value!r}"
            ) from None
        if _is_link(current):
            raise TemplateError(
                f"template '{self.name}': parameter '{param.name}' points at input "
                f"'{param.input}' of node '{param.node}', which is a link, not a value"
            )
        text = str(value)
        return param.format.replace("{value}", text) if param.format else text


def _is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[1], int)


def _shipped() -> Any:
    return resources.files("typhon.crews") / "templates" / "comfyui"


def template_names(extra_dir: Path | None = None) -> list[str]:
    """The templates shipped with Typhon and those in ``extra_dir``."""
    names = {
        entry.name[: -len(".json")]
        for entry in _shipped().iterdir()
        if entry.name.endswith(".json") and not entry.name.endswith(".params.json")
    }
    if extra_dir is not None and extra_dir.is_dir():
        names |= {
            p.name[: -len(".json")] for p in extra_dir.glob("*.json")
            if not p.name.endswith(".params.json")
        }  # fmt: skip
    return sorted(names)


def load_template(name: str, extra_dir: Path | None = None) -> Template:
    """Template ``name`` from ``extra_dir`` (which wins) or the shipped ones, checked."""
    if not _NAME.match(name):
        raise TemplateError(f"'{name}' is not a template name; use letters, digits, - and _")
    folder: Any = None
    if extra_dir is not None and (extra_dir / f"{name}.json").is_file():
        folder = extra_dir
    elif (_shipped() / f"{name}.json").is_file():
        folder = _shipped()
    if folder is None:
        raise TemplateError(
            f"unknown workflow template '{name}'; known: {', '.join(template_names(extra_dir))}"
        )
    workflow_file, params_file = folder / f"{name}.json", folder / f"{name}.params.json"
    workflow = _read_json(workflow_file)
    if not isinstance(workflow, dict) or not workflow:
        raise TemplateError(f"template {workflow_file}: not a workflow in ComfyUI's API format")
    if not params_file.is_file():
        raise TemplateError(f"template '{name}' has no parameter mapping {params_file}")
    sidecar = _read_json(params_file)
    template = Template(
        name=name,
        workflow={str(k): v for k, v in workflow.items()},
        params=_params(name, sidecar, params_file),
        description=str(sidecar.get("description", "")) if isinstance(sidecar, dict) else "",
        source=str(workflow_file),
    )
    template.check()
    return template


def _read_json(path: Any) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TemplateError(f"cannot read template file {path}: {exc}") from None


def _params(name: str, sidecar: Any, path: Any) -> dict[str, Param]:
    """The sidecar's ``parameters``: ``{NAME: {"node", "input", "required"?, "default"?,
    "format"?}}``."""
    specs = sidecar.get("parameters") if isinstance(sidecar, dict) else None
    if not isinstance(specs, dict) or not specs:
        raise TemplateError(f"template '{name}': {path} needs a 'parameters' mapping")
    params: dict[str, Param] = {}
    for pname, spec in specs.items():
        if not isinstance(spec, dict) or "node" not in spec or "input" not in spec:
            raise TemplateError(
                f"template '{name}': parameter '{pname}' in {path} needs 'node' and 'input'"
            )
        fmt = spec.get("format")
        if fmt is not None and "{value}" not in str(fmt):
            raise TemplateError(f"template '{name}': format of '{pname}' must contain {{value}}")
        params[pname] = Param(
            name=pname,
            node=str(spec["node"]),
            input=str(spec["input"]),
            required=bool(spec.get("required", False)),
            default=spec.get("default"),
            format=None if fmt is None else str(fmt),
        )
    return params


# -- the client -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Progress:
    """One progress report: ``kind`` is ``executing`` (a node started), ``progress`` (``value``
    of ``max`` steps inside a node), ``cached`` (``value`` nodes reused) or ``executed``."""

    kind: str
    node: str | None = None
    node_type: str | None = None
    value: int | None = None
    max: int | None = None


@dataclass(frozen=True)
class Image:
    """An image a workflow saved, downloaded through ``GET /view``."""

    filename: str
    subfolder: str
    type: str
    node: str
    data: bytes = field(repr=False)


ProgressFn = Callable[[Progress], None]


def _nothing(*_: Any) -> None:
    return None


def _node_order(node_id: str) -> tuple[int, int, str]:
    return (0, int(node_id), "") if node_id.isdigit() else (1, 0, node_id)


def _one_line(text: Any, limit: int = 300) -> str:
    return " ".join(str(text or "").split())[:limit]


class ComfyUIClient:
    """Submits workflows to the ComfyUI at ``url`` and brings back what they saved."""

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 600.0,
        poll_interval_s: float = 0.5,
        websocket: bool = True,
        request_timeout_s: float = 60.0,
    ):
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.poll_interval_s = poll_interval_s
        self.websocket = websocket
        self.followed_by: str | None = None  # "websocket" or "polling", after a render
        self._http = httpx.Client(
            base_url=self.url, timeout=httpx.Timeout(request_timeout_s, connect=5.0)
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ComfyUIClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- requests --------------------------------------------------------------------------------
    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ComfyUIError(
                f"cannot reach ComfyUI at {self.url} ({method} {path}: {type(exc).__name__}: "
                f"{_one_line(exc, 160)}); start it or {_URL_HINT}",
                url=self.url,
            ) from None

    def object_info(self) -> dict[str, Any] | None:
        """Node classes the server knows (server.py ``GET /object_info``); None when it does
        not answer that route with JSON. A server that is down raises ComfyUIError."""
        response = self._request("GET", "/object_info")
        if response.status_code != 200:
            return None
        try:
            info = response.json()
        except ValueError:
            return None
        return info if isinstance(info, dict) else None

    def submit(self, workflow: Mapping[str, Any], client_id: str) -> str:
        """``POST /prompt``; the prompt id. A 400 (server.py ``post_prompt``) becomes an error
        naming the nodes ComfyUI refused."""
        response = self._request(
            "POST", "/prompt", json={"prompt": workflow, "client_id": client_id}
        )
        if response.status_code == 400:
            raise self._refused(response, workflow)
        if response.status_code != 200:
            raise ComfyUIError(
                f"ComfyUI at {self.url} answered HTTP {response.status_code} to POST /prompt: "
                f"{_one_line(response.text, 200)}",
                url=self.url,
            )
        try:
            prompt_id = response.json()["prompt_id"]
        except (ValueError, KeyError, TypeError):
            prompt_id = None
        if not isinstance(prompt_id, str) or not prompt_id:
            raise ComfyUIError(
                f"ComfyUI at {self.url} accepted the workflow but sent no prompt_id: "
                f"{_one_line(response.text, 200)}",
                url=self.url,
            )
        return prompt_id

    def history(self, prompt_id: str) -> dict[str, Any] | None:
        """The prompt's history entry once it has finished, else None (server.py
        ``GET /history/{prompt_id}`` answers ``{}`` until execution.py's ``task_done``)."""
        response = self._request("GET", f"/history/{prompt_id}")
        if response.status_code != 200:
            raise ComfyUIError(
                f"ComfyUI at {self.url} answered HTTP {response.status_code} to GET /history",
                url=self.url,
            )
        try:
            entry = response.json().get(prompt_id)
        except (ValueError, AttributeError):
            entry = None
        return entry if isinstance(entry, dict) else None

    def view(self, filename: str, subfolder: str = "", type: str = "output") -> bytes:
        """An image's bytes (server.py ``GET /view``: 404 when there is no such file)."""
        params = {"filename": filename, "subfolder": subfolder, "type": type}
        response = self._request("GET", "/view", params=params)
        if response.status_code != 200:
            raise ComfyUIError(
                f"ComfyUI at {self.url} answered HTTP {response.status_code} to GET /view for "
                f"'{filename}' (subfolder '{subfolder}', type {type})",
                url=self.url,
            )
        return response.content

    def abandon(self, prompt_id: str) -> None:
        """Drop a prompt we no longer wait for: out of the queue (``POST /queue {"delete"}``) and
        interrupted if running (``POST /interrupt {"prompt_id"}``; servers older than the
        targeted interrupt ignore the body and stop whatever runs)."""
        with contextlib.suppress(ComfyUIError, httpx.HTTPError):
            self._request("POST", "/queue", json={"delete": [prompt_id]}, timeout=5.0)
            self._request("POST", "/interrupt", json={"prompt_id": prompt_id}, timeout=5.0)

    # -- a whole render --------------------------------------------------------------------------
    def render(
        self,
        workflow: Mapping[str, Any],
        *,
        on_progress: ProgressFn | None = None,
        check: Callable[[], None] | None = None,
    ) -> list[Image]:
        """Submit, follow to the end and download the saved images. ``check`` is called while
        waiting and may raise to stop (the prompt is then abandoned on the server)."""
        client_id = uuid.uuid4().hex
        with contextlib.ExitStack() as stack:
            ws = self._open_ws(client_id, stack)  # before submitting: no message is missed
            self.followed_by = "websocket" if ws is not None else "polling"
            prompt_id = self.submit(workflow, client_id)
            try:
                entry = self._wait(prompt_id, workflow, ws, on_progress or _nothing, check)
            except BaseException:
                self.abandon(prompt_id)
                raise
        return self._images(prompt_id, entry)

    def _wait(
        self,
        prompt_id: str,
        workflow: Mapping[str, Any],
        ws: ClientConnection | None,
        on_progress: ProgressFn,
        check: Callable[[], None] | None,
    ) -> dict[str, Any]:
        deadline = time.monotonic() + self.timeout_s
        stop = check or _nothing
        if ws is not None and not self._follow_ws(
            ws, prompt_id, workflow, on_progress, stop, deadline
        ):
            self.followed_by = "polling"  # the socket broke: polling takes over
        while True:  # the history entry is written just before (or after) the last message
            stop()
            entry = self.history(prompt_id)
            if entry is not None:
                return self._settle(prompt_id, entry, workflow)
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._timed_out(prompt_id)
            time.sleep(min(self.poll_interval_s, left))

    def _open_ws(self, client_id: str, stack: contextlib.ExitStack) -> ClientConnection | None:
        """server.py ``GET /ws?clientId=``, closed with ``stack``; None: poll instead."""
        if not self.websocket:
            return None
        try:
            from websockets.exceptions import InvalidHandshake
            from websockets.sync.client import connect
        except ImportError:
            return None
        ws_url = re.sub(r"^http", "ws", self.url) + f"/ws?clientId={client_id}"
        try:
            return stack.enter_context(
                connect(ws_url, open_timeout=5, close_timeout=1, max_size=None)
            )
        except (OSError, TimeoutError, InvalidHandshake):
            return None  # no socket (a proxy without upgrades, or the server is down): poll

    def _follow_ws(
        self,
        ws: ClientConnection,
        prompt_id: str,
        workflow: Mapping[str, Any],
        on_progress: ProgressFn,
        check: Callable[[], None],
        deadline: float,
    ) -> bool:
        """Read the socket until the prompt ends (True) or the socket breaks (False)."""
        from websockets.exceptions import ConnectionClosed

        quiet = 0.0
        while True:
            check()
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._timed_out(prompt_id)
            wait = min(1.0, left)
            try:
                raw = ws.recv(timeout=wait)
            except TimeoutError:
                quiet += wait
                if quiet >= _QUIET_S:
                    quiet = 0.0
                    if self.history(prompt_id) is not None:
                        return True
                continue
            except (ConnectionClosed, OSError):
                return False
            quiet = 0.0
            if isinstance(raw, bytes):  # previews: server.py send_bytes
                continue
            try:
                message = json.loads(raw)
            except ValueError:
                continue
            if isinstance(message, dict) and self._on_message(
                message, prompt_id, workflow, on_progress
            ):
                return True

    def _on_message(
        self,
        message: dict[str, Any],
        prompt_id: str,
        workflow: Mapping[str, Any],
        on_progress: ProgressFn,
    ) -> bool:
        """One websocket message; True when it says the prompt has ended."""
        kind, data = message.get("type"), message.get("data")
        if not isinstance(data, dict) or data.get("prompt_id") not in (None, prompt_id):
            return False  # another prompt's messages

        def node_type(node: Any) -> str | None:
            return str(workflow.get(str(node), {}).get("class_type", "")) or None

        if kind == "execution_error":
            raise self._execution_error(data, workflow)
        if kind == "execution_interrupted":
            raise self._interrupted(data, workflow)
        if kind == "execution_success":
            return True
        if kind == "executing":
            node = data.get("node")
            if node is None:  # main.py prompt_worker: the prompt is done
                return True
            on_progress(Progress("executing", str(node), node_type(node)))
        elif kind == "progress":
            node = data.get("node")
            value, total = _int(data.get("value")), _int(data.get("max"))
            node_id = None if node is None else str(node)
            on_progress(Progress("progress", node_id, node_type(node), value, total))
        elif kind == "execution_cached":
            on_progress(Progress("cached", value=len(data.get("nodes") or [])))
        elif kind == "executed":
            node = data.get("node")
            on_progress(Progress("executed", str(node), node_type(node)))
        return False

    # -- results and failures --------------------------------------------------------------------
    def _settle(
        self, prompt_id: str, entry: dict[str, Any], workflow: Mapping[str, Any]
    ) -> dict[str, Any]:
        """The history entry, or the failure it records (main.py: ``status_str`` "error" with
        the ``[event, data]`` messages of execution.py ``add_message``)."""
        status = entry.get("status") or {}
        if status.get("status_str") != "error":
            return entry
        for item in reversed(status.get("messages") or []):
            if isinstance(item, list | tuple) and len(item) == 2 and isinstance(item[1], dict):
                if item[0] == "execution_error":
                    raise self._execution_error(item[1], workflow)
                if item[0] == "execution_interrupted":
                    raise self._interrupted(item[1], workflow)
        raise ComfyUIError(
            f"ComfyUI at {self.url} reports prompt {prompt_id} failed without saying where; "
            "see the ComfyUI log",
            url=self.url,
        )

    def _images(self, prompt_id: str, entry: dict[str, Any]) -> list[Image]:
        """Download the images in the entry's ``outputs`` (``{NODE: {"images": [...]}}``):
        saved ones (type ``output``), or the previews when nothing was saved."""
        refs: list[tuple[str, dict[str, Any]]] = []
        outputs = entry.get("outputs") or {}
        for node_id in sorted(outputs, key=_node_order):
            for item in (outputs[node_id] or {}).get("images") or []:
                if isinstance(item, dict) and item.get("filename"):
                    refs.append((node_id, item))
        saved = [r for r in refs if r[1].get("type", "output") == "output"] or refs
        if not saved:
            raise ComfyUIError(
                f"ComfyUI at {self.url} finished prompt {prompt_id} but saved no image; the "
                "workflow needs a SaveImage node",
                url=self.url,
            )
        images = []
        for node_id, item in saved:
            filename, subfolder = str(item["filename"]), str(item.get("subfolder") or "")
            kind = str(item.get("type") or "output")
            data = self.view(filename, subfolder, kind)
            images.append(Image(filename, subfolder, kind, node_id, data))
        return images

    def _refused(self, response: httpx.Response, workflow: Mapping[str, Any]) -> ComfyUIError:
        """server.py ``post_prompt``: 400 ``{"error": {type, message, details, extra_info},
        "node_errors": {NODE: {"errors": [...], "class_type"}}}`` from execution.py
        ``validate_prompt`` (older servers: ``"error": "no prompt"``, ``node_errors: []``)."""
        try:
            body = response.json()
        except ValueError:
            body = {"error": response.text}
        body = body if isinstance(body, dict) else {"error": body}
        error, node_errors = body.get("error"), body.get("node_errors") or {}
        if not isinstance(error, dict):
            error = {"type": "", "message": str(error or ""), "details": "", "extra_info": {}}
        error_type = str(error.get("type") or "")
        parts, first = _node_error_parts(node_errors, workflow)
        if not parts:
            extra = error.get("extra_info") or {}
            details = str(error.get("details") or "")
            found = _NODE_IN_DETAILS.search(details)
            node = extra.get("node_id") if isinstance(extra, dict) else None
            node = node or (found.group(1) if found else None)
            if node is not None:
                node = str(node)
                ctype = (extra.get("class_type") if isinstance(extra, dict) else None) or str(
                    workflow.get(node, {}).get("class_type", "?")
                )
                first = (node, str(ctype))
                parts = [f"node {node} ({ctype}): {_one_line(error.get('message'))}"]
            else:
                tail = f": {_one_line(details)}" if details else ""
                parts = [f"{_one_line(error.get('message'))}{tail}"]
        return ComfyUIError(
            f"ComfyUI at {self.url} refused the workflow"
            + (f" ({error_type})" if error_type else "")
            + ": " + "; ".join(parts) + "; fix the workflow template or its parameters",
            url=self.url,
            node_id=first[0] if first else None,
            node_type=first[1] if first else None,
            error_type=error_type or None,
        )  # fmt: skip

    def _execution_error(self, data: dict[str, Any], workflow: Mapping[str, Any]) -> ComfyUIError:
        """execution.py ``handle_execution_error``: ``{node_id, node_type, exception_type,
        exception_message, traceback, ...}``."""
        node = str(data.get("node_id", "?"))
        ctype = str(data.get("node_type") or workflow.get(node, {}).get("class_type", "?"))
        exc_type = str(data.get("exception_type") or "error")
        return ComfyUIError(
            f"ComfyUI at {self.url} failed at node {node} ({ctype}): {exc_type}: "
            f"{_one_line(data.get('exception_message'))}; see the ComfyUI log for the traceback",
            url=self.url,
            node_id=node,
            node_type=ctype,
            error_type="execution_error",
        )

    def _interrupted(self, data: dict[str, Any], workflow: Mapping[str, Any]) -> ComfyUIError:
        node = str(data.get("node_id", "?"))
        ctype = str(data.get("node_type") or workflow.get(node, {}).get("class_type", "?"))
        return ComfyUIError(
            f"ComfyUI at {self.url} interrupted the workflow at node {node} ({ctype})",
            url=self.url,
            node_id=node,
            node_type=ctype,
            error_type="execution_interrupted",
        )

    def _timed_out(self, prompt_id: str) -> ComfyUIError:
        return ComfyUIError(
            f"ComfyUI at {self.url} did not finish prompt {prompt_id} within "
            f"{self.timeout_s:g}s; raise creative.timeout_s or look at its queue",
            url=self.url,
        )


def _node_error_parts(
    node_errors: Any, workflow: Mapping[str, Any]
) -> tuple[list[str], tuple[str, str] | None]:
    """``node {id} ({class}): {message}: {details}`` for each node ComfyUI named."""
    if not isinstance(node_errors, dict):
        return [], None
    parts: list[str] = []
    first: tuple[str, str] | None = None
    for node in sorted(node_errors, key=_node_order):
        found = node_errors[node] if isinstance(node_errors[node], dict) else {}
        ctype = str(found.get("class_type") or workflow.get(node, {}).get("class_type", "?"))
        reasons = [
            _one_line(f"{e.get('message', '')}: {e.get('details', '')}".strip(": "), 200)
            for e in found.get("errors") or [] if isinstance(e, dict)
        ]  # fmt: skip
        if not reasons:
            continue
        parts.append(f"node {node} ({ctype}): {'; '.join(reasons)}")
        first = first or (node, ctype)
    return parts, first


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
