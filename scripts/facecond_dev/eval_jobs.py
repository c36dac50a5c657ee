"""The evaluation CLI's jobs: a workflow bound to its photo/prompt/seed inputs, the identity x prompt x seed grid,
a resumable ledger, and the HTTP calls that upload photos and fetch images (they work with any ComfyUI)."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import threading
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from .client import REQUEST_TIMEOUT, http_call, load_workflow, ui_to_api

PHOTO_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
SEED_INPUTS = ("seed", "noise_seed")


@dataclass
class Method:
    """One workflow under test. Bindings are ``(node_id, input_name)``."""

    label: str
    path: Path
    photos: list[tuple[str, str]] = field(default_factory=list)
    prompt: tuple[str, str] | None = None
    seeds: list[tuple[str, str]] = field(default_factory=list)
    subject: str = "a person"       # what "{}" in a prompt becomes in this workflow (e.g. <alice>)
    outputs: list[str] = field(default_factory=list)  # node ids whose images are the results
    prompt_api: dict = field(default_factory=dict)


def parse_method(spec: str) -> tuple[str, Path, dict[str, list[str]]]:
    """``"[LABEL=]PATH [photo=NODE.input,...] [prompt=NODE.input] [seed=NODE.input] [subject=WORDS] [output=NODE]"``;
    NODE is a node id or title; quote a title with spaces (``prompt='positive prompt.text'``). ``subject`` takes
    the rest of the spec when it has spaces, so put it last (or quote it)."""
    head, _, rest = spec.strip().partition(" ")
    label, _, path = head.rpartition("=")
    path = Path(path)
    opts: dict[str, list[str]] = {}
    key = None
    try:
        toks = shlex.split(rest)
    except ValueError as e:  # an unclosed quote
        raise ValueError(f"--method {spec!r}: {e}") from None
    for tok in toks:
        if "=" in tok and tok.split("=", 1)[0] in ("photo", "prompt", "seed", "subject", "output"):
            key, val = tok.split("=", 1)
            opts.setdefault(key, []).append(val)
        elif key == "subject":
            opts["subject"][-1] += " " + tok
        else:
            raise ValueError(f"--method {spec!r}: cannot read {tok!r}; use key=value with key photo, prompt, seed, "
                             "subject or output")
    return label or path.stem, path, opts


def _titles(raw: dict) -> dict[str, str]:
    if "nodes" in raw:
        return {str(n.get("title") or ""): str(n["id"]) for n in raw["nodes"] if n.get("title")}
    return {str(v.get("_meta", {}).get("title") or ""): k for k, v in raw.items() if v.get("_meta", {}).get("title")}


def _prompt_source(api: dict) -> tuple[str, str] | None:
    """The CLIPTextEncode feeding the first 'positive' input, followed upstream through conditioning nodes."""
    for node in sorted(api, key=lambda k: int(k) if k.isdigit() else 0):
        pos = api[node]["inputs"].get("positive")
        seen, todo = set(), [pos[0]] if isinstance(pos, list) else []
        while todo:
            cur = todo.pop(0)
            if cur in seen or cur not in api:
                continue
            seen.add(cur)
            if api[cur]["class_type"] == "CLIPTextEncode" and isinstance(api[cur]["inputs"].get("text"), str):
                return cur, "text"
            todo += [v[0] for v in api[cur]["inputs"].values() if isinstance(v, list) and len(v) == 2]
    return None


def bind_method(label: str, path: Path, opts: dict[str, list[str]], object_info: dict) -> Method:
    raw = load_workflow(path)
    api = ui_to_api(raw, object_info) if "nodes" in raw else raw
    titles = _titles(raw)

    def ref(text: str, what: str) -> tuple[str, str]:
        node, _, inp = text.rpartition(".")
        node = titles.get(node, node)
        if node not in api or inp not in api[node]["inputs"]:
            raise ValueError(f"method {label}: {what}={text!r}: workflow {path} has no node {node!r} with a widget "
                             f"input {inp!r} (node ids: {sorted(api)})")
        return node, inp

    def ids(key: str) -> list[str]:
        return [x for v in opts.get(key, []) for x in v.split(",") if x]

    numeric = sorted(api, key=lambda k: int(k) if k.isdigit() else 0)
    photos = [ref(x, "photo") for x in ids("photo")] or [(k, "image") for k in numeric
                                                         if api[k]["class_type"] == "LoadImage"]
    prompt = ref(ids("prompt")[0], "prompt") if ids("prompt") else _prompt_source(api)
    seeds = [ref(x, "seed") for x in ids("seed")] or [(k, s) for k in numeric for s in SEED_INPUTS
                                                      if isinstance(api[k]["inputs"].get(s), int)]
    outputs = [titles.get(x, x) for x in ids("output")] or [k for k in numeric if api[k]["class_type"] == "SaveImage"]
    if prompt is None:
        raise ValueError(f"method {label}: could not find the prompt's CLIPTextEncode in {path}; give prompt=NODE.text")
    if not outputs:
        raise ValueError(f"method {label}: {path} has no SaveImage node; give output=NODE")
    subject = " ".join(opts.get("subject", [])) or "a person"
    return Method(label, Path(path), photos, prompt, seeds, subject, outputs, api)


MODEL_EXTS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".onnx", ".dat", ".gguf", ".sft")


@dataclass(frozen=True)
class Job:
    """One image job. Its id is the sha256 of everything that makes its image: the API graph after every
    substitution (prompt text, seed, --set/--quick/preset settings, stand-ins) with each photo input holding the
    photo file's sha256, and the identity (sha256) of every model file the graph names. A changed input is a new
    job with new files; finished images are never relabelled."""

    method: str
    identity: str
    prompt_index: int
    seed: int
    prompt: str                 # the text in the workflow's prompt input
    graph: dict = field(compare=False, hash=False, repr=False)  # photo inputs hold "sha256:<hex>" placeholders
    models: dict = field(compare=False, hash=False, repr=False)  # file name in the graph -> sha256 or "name-only"
    template: str = ""          # the prompt line ({} = the person)

    @property
    def key(self) -> str:
        # the labels too: a workflow without photo inputs (a plain baseline) makes the same image for every person,
        # and each person's row needs its own job
        blob = json.dumps({"graph": self.graph, "models": self.models, "method": self.method,
                           "identity": self.identity}, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    @property
    def label(self) -> str:
        return f"{self.method}|{self.identity}|p{self.prompt_index}|s{self.seed}"

    def stem(self) -> str:
        return f"images/{self.method}/{self.identity}/p{self.prompt_index:02d}_s{self.seed}_{self.key[:12]}"


class ModelIds:
    """sha256 of model files named in graphs, found under model roots (ComfyUI models folders); cached in
    OUT/model_hashes.json by path, size and mtime. A name found under no root is identified by its name only."""

    def __init__(self, out: Path, roots: list[Path]):
        self.roots = [Path(r) for r in roots]
        self.cache_path = Path(out) / "model_hashes.json"
        try:
            self.cache = json.loads(self.cache_path.read_text())
        except (OSError, ValueError):
            self.cache = {}
        self.found: dict[str, str] = {}

    def _find(self, name: str) -> Path | None:
        for root in self.roots:
            for cand in (root / name, *root.glob(f"*/{name}"), *root.glob(f"*/models/{name}")):
                if cand.is_file():
                    return cand
        return None

    def of(self, name: str) -> str:
        if name in self.found:
            return self.found[name]
        path = self._find(name)
        if path is None:
            ident = "name-only"
        else:
            st = path.stat()
            stamp = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
            ident = self.cache.get(stamp) or _sha256(path)
            self.cache[stamp] = ident
            self.cache_path.write_text(json.dumps(self.cache, indent=1))
        self.found[name] = ident
        return ident

    def of_graph(self, graph: dict) -> dict[str, str]:
        names = {v for node in graph.values() for v in node["inputs"].values()
                 if isinstance(v, str) and v.lower().endswith(MODEL_EXTS)}
        return {n: self.of(n) for n in sorted(names)}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def photo_ids(idents: dict[str, list[Path]]) -> dict[str, list[str]]:
    """The placeholder each photo input holds in a job's graph: its file's sha256."""
    return {name: [f"sha256:{_sha256(p)}" for p in paths] for name, paths in idents.items()}


def with_uploads(graph: dict, uploaded: dict[str, str]) -> dict:
    """The job's graph with its photo placeholders replaced by the names the server's upload gave."""
    out = json.loads(json.dumps(graph))
    for node in out.values():
        for k, v in node["inputs"].items():
            if isinstance(v, str) and v in uploaded:
                node["inputs"][k] = uploaded[v]
    return out


def identities(folder: Path) -> dict[str, list[Path]]:
    """One subfolder of photos per person -> {name: sorted photo paths}."""
    out = {p.name: sorted(f for f in p.iterdir() if f.suffix.lower() in PHOTO_EXTS)
           for p in sorted(Path(folder).iterdir()) if p.is_dir()}
    out = {k: v for k, v in out.items() if v}
    if not out:
        raise ValueError(f"{folder}: no identities (expected one subfolder of photos per person)")
    return out


def fill_prompt(method: Method, photos: list[str], text: str, seed: int) -> dict:
    """The method's graph with the identity's uploaded photos (cycled over the photo inputs), the prompt text and
    the seed in place. A prompt input that holds ``{prompt}`` is a template: only that part is replaced."""
    graph = json.loads(json.dumps(method.prompt_api))
    for k, (node, inp) in enumerate(method.photos):
        graph[node]["inputs"][inp] = photos[k % len(photos)]
    node, inp = method.prompt
    old = graph[node]["inputs"][inp]
    graph[node]["inputs"][inp] = old.replace("{prompt}", text) if "{prompt}" in old else text
    for node, inp in method.seeds:
        graph[node]["inputs"][inp] = seed
    return graph


class Ledger:
    """``runs.jsonl`` in the output folder: one line per finished job (its id, labels, prompt text, settings and
    graph), written after its images are on disk; safe to add to from several threads."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.path = self.out / "runs.jsonl"
        self.entries: dict[str, dict] = {}
        self.lock = threading.Lock()
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    e = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill
                if e.get("files") and "job" in e and all((self.out / f).is_file() for f in e["files"]):
                    self.entries[e["job"]] = e

    def done(self, job: Job) -> bool:
        return job.key in self.entries

    def add(self, entry: dict) -> None:
        with self.lock:
            self.entries[entry["job"]] = entry
            with open(self.path, "a") as f:
                f.write(json.dumps(entry) + "\n")
                f.flush()
                os.fsync(f.fileno())


def upload_image(url: str, path: Path, name: str, subfolder: str = "facecond_eval",
                 timeout: float = REQUEST_TIMEOUT) -> str:
    """POST /upload/image (multipart); returns the value LoadImage takes ("subfolder/name")."""
    boundary = uuid.uuid4().hex
    parts = []
    for key, value in (("overwrite", "true"), ("subfolder", subfolder), ("type", "input")):
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode())
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
                 f"Content-Type: application/octet-stream\r\n\r\n".encode() + Path(path).read_bytes() + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    req = urllib.request.Request(url.rstrip("/") + "/upload/image", data=body,
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    answer = json.loads(http_call(url, req, timeout)[0])
    return f"{answer['subfolder']}/{answer['name']}" if answer.get("subfolder") else answer["name"]


def fetch_image(url: str, image: dict, timeout: float = REQUEST_TIMEOUT) -> bytes:
    q = urllib.parse.urlencode({"filename": image["filename"], "subfolder": image.get("subfolder", ""),
                                "type": image.get("type", "output")})
    return http_call(url, urllib.request.Request(f"{url.rstrip('/')}/view?{q}"), timeout)[0]


def exec_seconds(messages: list) -> float | None:
    """Server-side execution time of a prompt from its history status messages (ms timestamps)."""
    t = {kind: data.get("timestamp") for kind, data in messages if isinstance(data, dict)}
    start, end = t.get("execution_start"), t.get("execution_success") or t.get("execution_error")
    return (end - start) / 1000.0 if start and end else None
