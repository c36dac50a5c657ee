"""ComfyUI node classes of the pack: thin wrappers that check inputs, call ``py/`` and wrap results.

Each module in ``_NODE_MODULES`` exports ``NODE_CLASS_MAPPINGS`` and ``NODE_DISPLAY_NAME_MAPPINGS``.
A module that fails to import is logged and skipped so the rest of the pack still loads.
"""

import importlib
import logging

from .model_paths import register_model_folders

log = logging.getLogger("facecond")

_NODE_MODULES = ("weights_nodes", "faces", "face0_projection", "face0", "embeddings", "celebbasis_files", "celebbasis",
                 "inversion", "celeb_photos", "ipadapter", "ipadapter_aggregate", "facechain", "facechain_tagging",
                 "facechain_fusion", "evaluate")

NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}

register_model_folders()

for _name in _NODE_MODULES:
    try:
        _mod = importlib.import_module(f".{_name}", __name__)
    except Exception:
        log.exception("[facecond] could not load nodes/%s.py; its nodes are unavailable", _name)
        continue
    NODE_CLASS_MAPPINGS.update(_mod.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_mod.NODE_DISPLAY_NAME_MAPPINGS)

try:  # GET /facecond/models (read-only list of the models the pack holds); only inside a running server
    from .model_cache import register_routes

    register_routes()
except Exception:
    log.exception("[facecond] could not register the /facecond/models route")
