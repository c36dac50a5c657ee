"""One cache for every model the pack loads, under ComfyUI's model management.

Entries are keyed by (kind, file identity): ``py/weights/manifest.file_identity`` (real path, size, mtime_ns), so
the same file loads once and a rewritten file loads anew. Each entry's torch module (FaceNet, MTCNN's three
nets, an IP-Adapter's projection and K/V weights, a Face0 projection, a Celeb Basis MLP, an aggregator, an
onnxruntime session wrapped in ``onnx_pack.SessionModule``, or a dlib model wrapped in ``dlib_rec.DlibModel``)
goes through a ``ModelPatcher``: ``to_device`` puts it on ComfyUI's torch device with ``load_models_gpu``, ComfyUI
offloads it when VRAM runs short, and when ComfyUI unloads it for good (``unload_all_models``: the "free model
memory" button / ``POST /free``), the patcher's detach callback drops the entry here and releases its ONNX session
or dlib model. ComfyUI's ``LoadedModel`` holds patchers weakly; this cache holds the only strong reference, so a
freed model is garbage at the cache's next call (``describe``, ``load``, ...; not inside ComfyUI's unload loop, see
``_RETIRED``). What a node output still holds, e.g. an IPADAPTER in the executor cache, goes with ComfyUI's own
``free_memory`` reset.

At most ``MAX_ENTRIES`` models and ``MAX_SESSIONS`` ONNX sessions are kept; the least recently used is unloaded
from ComfyUI and dropped. ``GET /facecond/models`` lists the entries (kind, file, device, bytes).

Threads: the executor thread loads and unloads while ``GET /facecond/models`` reads from the server's event loop
(in a worker thread, so a long unload never stalls the server). One re-entrant lock guards the entries; it is never
held while a model is built (``build`` may take seconds and is the executor's alone).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import comfy.model_management as mm
import comfy.model_patcher
import torch
from comfy.patcher_extension import CallbacksMP

from ..py.faces.dlib_rec import DlibModel
from ..py.faces.onnx_pack import SessionModule
from ..py.weights.manifest import file_identity
from .paths import load_file, read_path

log = logging.getLogger("facecond")

MAX_ENTRIES = 10  # FaceNet, MTCNN, two SCRFD/recogniser sessions, dlib's two models, an IP-Adapter, projections, MLPs
MAX_SESSIONS = 4  # onnxruntime sessions (their memory is outside torch's allocator)
_ATTR = "_facecond_cache_key"  # set on each cached module: its entry's key


@dataclass
class Entry:
    key: tuple  # (kind, realpath, size, mtime_ns)
    model: object  # what load() hands out (FaceNet, MTCNN, SCRFD, IPAdapter, ...); None: taken back by to_device
    module: torch.nn.Module
    patcher: comfy.model_patcher.ModelPatcher

    @property
    def kind(self) -> str:
        return self.key[0]


_ENTRIES: OrderedDict[tuple, Entry] = OrderedDict()
# Entries ComfyUI has just unloaded. Dropped at our next call, once ComfyUI has taken them off its list: freeing a
# module inside ComfyUI's free_memory loop would run its finalizer (cleanup_models) on a half-updated list.
_RETIRED: list[Entry] = []
_LOCK = threading.RLock()  # guards _ENTRIES and _RETIRED (re-entrant: ComfyUI's unload calls _on_detach inside _unload)


def _external(module: torch.nn.Module) -> bool:
    """A module whose model lives outside torch (an onnxruntime session, a dlib model): released by hand, sized by
    its file."""
    return isinstance(module, (SessionModule, DlibModel))


def _release(module: torch.nn.Module) -> None:
    if _external(module):
        module.release()


def _on_detach(patcher, unpatch_all=True) -> None:
    """ComfyUI unloaded the patcher (moved to the offload device, out of ``current_loaded_models``): forget it."""
    if not unpatch_all:
        return
    with _LOCK:
        for key, e in list(_ENTRIES.items()):
            if e.patcher is patcher:
                _ENTRIES.pop(key)
                _release(e.module)
                _RETIRED.append(e)
                log.debug("[facecond] %s unloaded by ComfyUI; dropped from the model cache", key[0])


def _purge() -> None:
    """Let go of unloaded entries that ComfyUI no longer lists (then nothing of ours holds them)."""
    with _LOCK:
        if _RETIRED:
            listed = {id(lm.model) for lm in list(mm.current_loaded_models)}
            _RETIRED[:] = [e for e in _RETIRED if id(e.patcher) in listed]


def _new_patcher(module: torch.nn.Module) -> comfy.model_patcher.ModelPatcher:
    p = comfy.model_patcher.ModelPatcher(module, load_device=mm.get_torch_device(),
                                         offload_device=mm.unet_offload_device())
    p.add_callback(CallbacksMP.ON_DETACH, _on_detach)
    return p


def _unload(e: Entry) -> None:
    """Take an entry out of ComfyUI's loaded models (as its own unload does) and release it."""
    with _LOCK:
        for lm in list(mm.current_loaded_models):
            if lm.model is e.patcher:
                lm.model_unload()  # detach: moves it to the offload device, runs _on_detach
                mm.current_loaded_models.remove(lm)
        _ENTRIES.pop(e.key, None)
        _release(e.module)
        _purge()


def _bound() -> None:
    with _LOCK:
        while len(_ENTRIES) > MAX_ENTRIES:
            _unload(next(iter(_ENTRIES.values())))
        sessions = [e for e in _ENTRIES.values() if isinstance(e.module, SessionModule)]
        for e in sessions[:max(0, len(sessions) - MAX_SESSIONS)]:
            _unload(e)


def _add(key: tuple, model, module: torch.nn.Module) -> Entry:
    setattr(module, _ATTR, key)
    e = Entry(key, model, module, _new_patcher(module))
    with _LOCK:
        _ENTRIES[key] = e
        _bound()
    return e


def file_key(kind: str, path: str | os.PathLike | tuple) -> tuple:
    """(kind, realpath, size, mtime_ns[, realpath, size, mtime_ns ...]) of one file or several (MTCNN's three)."""
    paths = path if isinstance(path, (tuple, list)) else (path,)
    return (kind, *(x for p in paths for x in file_identity(p)))


def load(kind: str, path: str | os.PathLike | tuple, build: Callable[[str], object],
         module_of: Callable[[object], torch.nn.Module]) -> object:
    """``build(path)``, once per (kind, file identity); later calls return the same object until ComfyUI
    unloads it or the file changes. Not moved yet: call ``to_device(module)`` before running it."""
    _purge()
    key = file_key(kind, path)
    with _LOCK:
        e = _ENTRIES.get(key)
        if e is not None and e.model is not None:
            _ENTRIES.move_to_end(key)
            return e.model
        for old in [x for x in _ENTRIES.values() if x.kind == kind and x.key[1] == key[1]]:
            _unload(old)  # the file changed on disk (the old model is stale), or a module taken back by to_device
    log.info("[facecond] loading %s model %s", kind, path)
    model = build(path)
    _add(key, model, module_of(model))
    return model


def load_picked(kind: str, node: str, input_name: str, folder: str, name: str, loader: Callable[[str], object],
                module_of: Callable[[object], torch.nn.Module] = lambda m: m) -> object:
    """``load`` for a file picked in a widget: ``paths.load_file``'s checks and messages, cached by file identity."""
    path = read_path(node, input_name, folder, name)
    return load(kind, path, lambda _p: load_file(node, input_name, folder, name, loader), module_of)


def onnx_session(path: str | os.PathLike) -> SessionModule:
    """An unopened session for an ONNX file: CUDA provider when ComfyUI's device is CUDA, else CPU. Cache the
    model built on it with ``load(..., module_of=lambda m: m.session)``."""
    return SessionModule(path, cuda=mm.get_torch_device().type == "cuda")


def to_device(module: torch.nn.Module) -> torch.device:
    """Load a cached module onto ComfyUI's torch device via ``load_models_gpu`` (a no-op when it is there) and
    return that device. A module whose entry ComfyUI freed meanwhile (still held by a node output) is taken
    back into the cache under its old key."""
    _purge()
    key = getattr(module, _ATTR, None) or ("module", id(module))
    with _LOCK:
        e = _ENTRIES.get(key)
        if e is not None and e.module is not module:  # the file was loaded anew; this is an older copy
            key = (*key, id(module))
            e = _ENTRIES.get(key)
        if e is None:
            e = _add(key, None, module)  # model None: load() builds a fresh one rather than hand out a bare module
        _ENTRIES.move_to_end(key)
    mm.load_models_gpu([e.patcher])
    return e.patcher.load_device


def entries() -> list[Entry]:
    _purge()
    with _LOCK:
        return list(_ENTRIES.values())


def _device(m: torch.nn.Module) -> str:
    if isinstance(m, SessionModule):
        if m.session is None:
            return "closed"
        return "cuda" if "CUDAExecutionProvider" in m.session.get_providers() else "cpu"
    if isinstance(m, DlibModel):
        return "cpu" if m.loaded else "closed"  # dlib-bin has no CUDA
    t = next(iter(m.parameters()), None)
    return str(t.device) if t is not None else "none"


def describe() -> list[dict]:
    """What the cache holds: kind, file, device, bytes (tensors; file size for ONNX and dlib), loaded in ComfyUI."""
    _purge()
    with _LOCK:  # a snapshot: the executor thread may load or unload meanwhile
        held = list(_ENTRIES.values())
        loaded = {id(lm.model) for lm in list(mm.current_loaded_models) if lm.model is not None}
    out = []
    for e in held:
        size = os.path.getsize(e.key[1]) if _external(e.module) and os.path.isfile(e.key[1]) \
            else sum(t.numel() * t.element_size() for t in [*e.module.parameters(), *e.module.buffers()])
        out.append({"kind": e.kind, "file": str(e.key[1]), "device": _device(e.module), "bytes": int(size),
                    "loaded_in_comfy": id(e.patcher) in loaded})
    return out


def clear() -> None:
    """Unload and drop every entry (tests; ComfyUI's own unload does the same through the detach callback)."""
    with _LOCK:
        for e in list(_ENTRIES.values()):
            _unload(e)
    _purge()


def register_routes() -> None:
    """``GET /facecond/models``: JSON list of ``describe()`` (read-only). Only inside a running server."""
    try:
        import server
        from aiohttp import web
    except ImportError:
        return
    inst = getattr(server.PromptServer, "instance", None)
    if inst is None:
        return

    @inst.routes.get("/facecond/models")
    async def _models(request):
        # in a worker thread: the executor may hold the cache's lock while ComfyUI unloads a model
        models = await asyncio.get_running_loop().run_in_executor(None, describe)
        return web.json_response({"models": models})
