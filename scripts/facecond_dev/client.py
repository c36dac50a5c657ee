"""A small client for ComfyUI's HTTP API, and UI-format workflow → API-format prompt conversion.

A slow server is waited for: each request may take ``request_timeout`` seconds (FACECOND_HTTP_TIMEOUT, default
300), and a /history poll that times out is asked again. A server that is gone (refused, reset) is asked again
``retries`` times, backing off, then ``ServerGone``. A URL that answers but is not ComfyUI gives ``NotComfyUI``, a
file that is not a workflow ``WorkflowError``; each says what was found in one line.
"""

from __future__ import annotations

import http.client
import json
import os
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

# Front-end widgets that store an extra value after a seed ("control after generate").
_SEED_CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
_PRIMITIVE_WIDGETS = {"INT", "FLOAT", "STRING", "BOOLEAN"}
_UI_ONLY_NODES = {"Note", "MarkdownNote", "PrimitiveNode", "Reroute"}
# Seconds one HTTP request may take. A busy server on shared cores answers late, not never (CI once timed out a
# GET /history at a fixed 30 s): generous by default, FACECOND_HTTP_TIMEOUT overrides it.
REQUEST_TIMEOUT = float(os.environ.get("FACECOND_HTTP_TIMEOUT", "300"))
RETRIES = 3  # a refused or reset /history poll is asked again this many times (after 1, 2, 4 s) before ServerGone


class ServerError(RuntimeError):
    """The server at ``url`` cannot be used; the message is one line that says why."""

    def __init__(self, url: str, message: str):
        self.url = url
        super().__init__(message)


class ServerGone(ServerError):
    """The server stopped answering: connection refused or reset (``detail`` says which)."""

    def __init__(self, url: str, detail: str):
        self.detail = detail
        super().__init__(url, f"the ComfyUI server at {url} stopped answering ({detail})")


class NotComfyUI(ServerError):
    """Nothing answers at the URL, or what answers is not ComfyUI's API."""


class WorkflowError(ValueError):
    """A file given as a workflow is not one (missing, not JSON, or JSON of another shape)."""


def _why(err: BaseException) -> str:
    """'connection refused' and the like, for a message."""
    reason = getattr(err, "reason", err)
    text = getattr(reason, "strerror", None) or str(reason) or type(reason).__name__
    return text[:200].lower() if isinstance(reason, OSError) else f"{type(reason).__name__}: {text[:200]}"


def http_call(url: str, req: urllib.request.Request, timeout: float) -> tuple[bytes, str]:
    """(body, Content-Type) of ``req`` to the server at ``url``. ``TimeoutError`` for no answer within
    ``timeout``, ``ServerGone`` for a refused or broken connection, ``urllib.error.HTTPError`` for an error status."""
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.read(), r.headers.get("Content-Type", "?")
    except urllib.error.HTTPError:
        raise
    except urllib.error.URLError as e:
        if isinstance(e.reason, TimeoutError):
            raise TimeoutError(f"{req.full_url}: no answer within {timeout:.0f}s") from None
        raise ServerGone(url, _why(e)) from None
    except (ConnectionError, http.client.HTTPException) as e:  # reset or cut off while reading the answer
        raise ServerGone(url, _why(e)) from None


def load_workflow(path: str | Path) -> dict:
    """The workflow in ``path``: a UI-format one (a ``nodes`` list) or an API-format prompt (node id ->
    ``{class_type, inputs}``); ``WorkflowError`` saying what the file is otherwise."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise WorkflowError(f"workflow {path} cannot be read: {_why(e)}") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise WorkflowError(f"{path} is not a ComfyUI workflow: it is not JSON ({e.msg} at line {e.lineno} column "
                            f"{e.colno}). Save the workflow from ComfyUI (Workflow > Save, or Export (API)).") from None
    if isinstance(raw, dict) and isinstance(raw.get("nodes"), list) and \
            all(isinstance(n, dict) and "id" in n and "type" in n for n in raw["nodes"]) and raw["nodes"]:
        return raw
    if isinstance(raw, dict) and raw and all(isinstance(v, dict) and isinstance(v.get("class_type"), str)
                                             and isinstance(v.get("inputs", {}), dict) for v in raw.values()):
        return raw
    kind = type(raw).__name__ if not isinstance(raw, dict) else f"an object with keys {sorted(raw)[:6]}"
    raise WorkflowError(f"{path} is JSON but not a ComfyUI workflow ({kind}): expected a UI workflow (a 'nodes' "
                        "list) or an API-format prompt (node id -> {class_type, inputs}). Save it from ComfyUI "
                        "(Workflow > Save, or Export (API)).")


class PromptRejected(RuntimeError):
    """POST /prompt refused the graph, or part of it; ``details`` is the server's JSON answer.

    Refused outright (HTTP 400): ``details["error"]`` and ``details["node_errors"]``. Refused in part (HTTP 200
    with ``node_errors``: ComfyUI queues the output nodes that validated and drops the others): ``details`` also
    holds the ``prompt_id`` of what was queued. Either way ``node_errors`` maps node id -> {errors, class_type, ...}.
    """

    def __init__(self, details: dict):
        self.details = details
        failed = ", ".join(f"{nid} ({info.get('class_type', '?')})"
                           for nid, info in (details.get("node_errors") or {}).items())
        head = f"ComfyUI refused node(s) {failed}: " if failed else ""
        super().__init__(head + json.dumps(details)[:2000])


@dataclass
class Result:
    prompt_id: str
    status: str                      # "success" or "error"
    outputs: dict = field(default_factory=dict)
    messages: list = field(default_factory=list)

    @property
    def error(self) -> dict | None:
        """The ``execution_error`` message (node_id, node_type, exception_message, ...) if the run failed."""
        for kind, data in self.messages:
            if kind == "execution_error":
                return data
        return None


class ComfyClient:
    def __init__(self, url: str, base_dir: Path | None = None, request_timeout: float | None = None,
                 retries: int = RETRIES):
        self.url = url.rstrip("/")
        self.base_dir = Path(base_dir) if base_dir else None
        self.client_id = uuid.uuid4().hex
        self.request_timeout = REQUEST_TIMEOUT if request_timeout is None else request_timeout
        self.retries = retries
        self._object_info: dict | None = None

    def _request(self, path: str, payload: dict | None = None, timeout: float | None = None):
        """The JSON answer. ``TimeoutError`` for a slow answer, ``ServerGone`` for a refused or broken
        connection, ``urllib.error.HTTPError`` for an HTTP error status, ``NotComfyUI`` for an answer that is not
        JSON."""
        timeout = self.request_timeout if timeout is None else timeout
        data = json.dumps(payload).encode() if payload is not None else None
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        body, kind = http_call(self.url, req, timeout)
        try:
            return json.loads(body or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise NotComfyUI(self.url, f"{self.url} is not a ComfyUI server: {'POST' if data else 'GET'} {path} "
                             f"answered {kind} ({body[:60]!r}), not JSON") from None

    def object_info(self, refresh: bool = False) -> dict:
        """Every node's schema; ``NotComfyUI`` if nothing answers at the URL or what answers is not ComfyUI."""
        if self._object_info is None or refresh:
            try:
                info = self._request("/object_info")
            except ServerGone as e:
                raise NotComfyUI(self.url, f"no ComfyUI server answers at {self.url} ({e.detail}): start ComfyUI "
                                 "there or give its URL") from None
            except urllib.error.HTTPError as e:
                raise NotComfyUI(self.url, f"{self.url} is not a ComfyUI server: GET /object_info answered HTTP "
                                 f"{e.code} {e.reason}") from None
            except TimeoutError:
                raise NotComfyUI(self.url, f"the server at {self.url} gave no answer to GET /object_info within "
                                 f"{self.request_timeout:.0f}s (raise --request-timeout if it is busy)") from None
            if not isinstance(info, dict) or not info or \
                    not all(isinstance(v, dict) and "input" in v for v in list(info.values())[:50]):
                raise NotComfyUI(self.url, f"{self.url} is not a ComfyUI server: GET /object_info answered JSON "
                                 "that is not a list of node schemas")
            self._object_info = info
        return self._object_info

    def queue(self, prompt: dict) -> str:
        """Queue ``prompt``; its id. ``PromptRejected`` if the server refused any node of it (see there)."""
        try:
            answer = self._request("/prompt", {"prompt": prompt, "client_id": self.client_id})
        except urllib.error.HTTPError as e:
            body = e.read() or b"{}"
            try:
                details = json.loads(body)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise NotComfyUI(self.url, f"{self.url} is not a ComfyUI server: POST /prompt answered HTTP {e.code} "
                                 f"{body[:60]!r}") from None
            raise PromptRejected(details) from None
        if answer.get("node_errors"):
            # A "successful" answer that still dropped output nodes which failed validation: a failure here.
            raise PromptRejected(answer)
        return answer["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 300.0) -> Result:
        """Poll /history until ``prompt_id`` finished. A slow answer is asked again; a refused or reset one again
        after 1, 2, 4 ... s, ``retries`` times in a row, then ``ServerGone``. ``TimeoutError`` after ``timeout``."""
        deadline = time.monotonic() + timeout
        gone = 0
        while time.monotonic() < deadline:
            try:
                entry = (self._request(f"/history/{prompt_id}") or {}).get(prompt_id)
            except TimeoutError:  # a slow answer from a busy server: ask again
                continue
            except ServerGone:
                gone += 1
                if gone > self.retries:
                    raise
                time.sleep(2 ** (gone - 1))
                continue
            gone = 0
            if entry and entry.get("status", {}).get("completed") is not None:
                status = entry["status"]
                if status.get("status_str") in ("success", "error"):
                    return Result(prompt_id, status["status_str"], entry.get("outputs", {}),
                                  status.get("messages", []))
            time.sleep(0.1)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f}s")

    def run(self, prompt: dict, timeout: float = 300.0) -> Result:
        return self.wait(self.queue(prompt), timeout)

    def run_workflow(self, path: str | Path, timeout: float = 300.0) -> Result:
        workflow = load_workflow(path)
        prompt = ui_to_api(workflow, self.object_info()) if "nodes" in workflow else workflow
        return self.run(prompt, timeout)

    def output_images(self, result: Result) -> list[Path]:
        """Files of every image output of a finished prompt (needs ``base_dir``)."""
        if self.base_dir is None:
            raise ValueError("output_images needs the server's base_dir")
        paths = []
        for node_output in result.outputs.values():
            for img in node_output.get("images", []):
                paths.append(self.base_dir / img.get("type", "output") / img.get("subfolder", "") / img["filename"])
        return paths


def _widget_inputs(spec: dict) -> list[tuple[str, str, dict]]:
    """(name, type, options) of each input the front end shows as a widget, in schema order."""
    out = []
    for section in ("required", "optional"):
        for name, entry in spec.get("input", {}).get(section, {}).items():
            kind = entry[0]
            opts = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
            if isinstance(kind, list) or kind in _PRIMITIVE_WIDGETS or kind == "COMBO":
                out.append((name, kind if isinstance(kind, str) else "COMBO", opts))
    return out


def widget_default(kind: str, opts: dict, choices) -> object:
    """The value the front end gives a widget that a saved workflow has no value for: the schema's ``default``,
    else the first choice of a combo, 0 / 0.0 / False / "" for the primitives (None: no value to give)."""
    if "default" in opts:
        return opts["default"]
    if kind == "COMBO":
        return choices[0] if choices else None
    return {"INT": 0, "FLOAT": 0.0, "BOOLEAN": False, "STRING": ""}.get(kind)


def _choices(spec: dict, name: str, opts: dict):
    inputs = {**spec.get("input", {}).get("required", {}), **spec.get("input", {}).get("optional", {})}
    raw = inputs[name][0]
    return raw if isinstance(raw, list) else opts.get("options")


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """Convert a workflow saved by the ComfyUI front end (nodes + links) to an API-format prompt.

    Widget values are matched to the node schema's widget inputs in order, skipping the seed
    "control after generate" value; widgets the saved node has no value for (a workflow saved before the node
    gained them) get the schema's default, as the front end fills them (``widget_default``). Inputs fed by a
    link become ``[source_id, slot]``. Muted nodes (mode 2) are dropped; bypassed nodes (mode 4) and Reroutes
    pass their input through.
    """
    nodes = {str(n["id"]): n for n in workflow["nodes"]}
    links = {lk[0]: lk for lk in workflow.get("links", [])}  # id, from_node, from_slot, to_node, to_slot, type

    def source(link_id):
        """Follow reroutes and bypassed nodes back to a real output: (node_id, slot) or None."""
        _, from_node, from_slot, *_ = links[link_id]
        node = nodes[str(from_node)]
        if node["type"] == "Reroute" or node.get("mode") == 4:
            link_type = links[link_id][5]
            for inp in node.get("inputs", []):
                if inp.get("link") is not None and (node["type"] == "Reroute" or inp.get("type") == link_type):
                    return source(inp["link"])
            return None
        return [str(from_node), from_slot]

    prompt = {}
    for node_id, node in nodes.items():
        kind = node["type"]
        if kind in _UI_ONLY_NODES or node.get("mode") in (2, 4):
            continue
        if kind not in object_info:
            raise ValueError(f"workflow node {node_id} has type {kind!r}, which the server does not know")
        spec = object_info[kind]
        inputs: dict = {}
        linked = {inp["name"]: inp["link"] for inp in node.get("inputs", []) if inp.get("link") is not None}
        values = node.get("widgets_values", [])
        if isinstance(values, dict):
            inputs.update({k: v for k, v in values.items() if k not in linked})
            for name, wtype, opts in _widget_inputs(spec):
                default = widget_default(wtype, opts, _choices(spec, name, opts))
                if name not in values and name not in linked and default is not None:
                    inputs[name] = default
        else:
            values = list(values)
            for name, wtype, opts in _widget_inputs(spec):
                if not values:
                    default = widget_default(wtype, opts, _choices(spec, name, opts))
                    if name not in linked and default is not None:
                        inputs[name] = default
                    continue
                value = values.pop(0)
                if name not in linked:
                    inputs[name] = value
                if wtype == "INT" and (opts.get("control_after_generate") or name in ("seed", "noise_seed")) \
                        and values and values[0] in _SEED_CONTROL_VALUES:
                    values.pop(0)
        for name, link_id in linked.items():
            src = source(link_id)
            if src is not None:
                inputs[name] = src
        prompt[node_id] = {"class_type": kind, "inputs": inputs}
    return prompt
