"""ComfyUI node classes of the pack: thin wrappers that check inputs, call ``py/`` and wrap results.

One folder per method, as in ``py/``: ``faces/``, ``face0/``, ``celebbasis/`` (with face textual inversion and
pseudo-words), ``ipadapter/``, ``facechain/``, ``evaluate/``, ``weights/``. What every node shares sits here at the
top: ``common.py`` (socket types, input checks, widget specs, progress), ``paths.py`` (file names and pack-file
loading), ``model_cache.py`` (one cache under ComfyUI's model management), ``model_paths.py`` (model folders and
manifest-checked lookup).

Each module in ``_NODE_MODULES`` exports ``NODE_CLASS_MAPPINGS`` and ``NODE_DISPLAY_NAME_MAPPINGS``.
A module that fails to import is logged and skipped so the rest of the pack still loads.
"""

import importlib
import logging

from .model_paths import register_model_folders

log = logging.getLogger("facecond")

_NODE_MODULES = ("weights.fetch", "faces.detect_embed", "face0.projection", "face0.guidance", "face0.embeddings",
                 "celebbasis.files", "celebbasis.basis", "celebbasis.inversion", "celebbasis.celeb_photos",
                 "ipadapter.adapter", "ipadapter.aggregate", "facechain.chain", "facechain.tagging", "facechain.fusion",
                 "evaluate.scores")

NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}

register_model_folders()

for _name in _NODE_MODULES:
    try:
        _mod = importlib.import_module(f".{_name}", __name__)
    except Exception:
        log.exception("[facecond] could not load nodes/%s.py; its nodes are unavailable", _name.replace(".", "/"))
        continue
    NODE_CLASS_MAPPINGS.update(_mod.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_mod.NODE_DISPLAY_NAME_MAPPINGS)

try:  # GET /facecond/models (read-only list of the models the pack holds); only inside a running server
    from .model_cache import register_routes

    register_routes()
except Exception:
    log.exception("[facecond] could not register the /facecond/models route")
