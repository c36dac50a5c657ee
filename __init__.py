"""facecond: identity-conditioned image generation for ComfyUI.

Importing the pack registers its model folders with ComfyUI's ``folder_paths`` and exposes the
node mappings; it does nothing else (no downloads, no threads, no installs).
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
