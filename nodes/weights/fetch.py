"""FacecondFetchWeights: verify (and, when allowed, download) one manifest weight; report path and status.

Useful for headless setups: queue it once per weight to fetch everything a workflow needs up front.
"""

from __future__ import annotations

from ...py.weights import manifest as weights
from .. import model_paths


class FacecondFetchWeights:
    CATEGORY = "facecond/weights"
    FUNCTION = "fetch"
    RETURN_TYPES = ("STRING", "STRING")
    RETURN_NAMES = ("path", "status")
    OUTPUT_NODE = True
    DESCRIPTION = ("Finds a weight of weights_manifest.json in ComfyUI's model folders, checks its sha256 and "
                   "downloads it when missing (unless FACECOND_OFFLINE=1). Outputs its path and a status line.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "weight": (sorted(weights.load_manifest()), {
                "tooltip": "Manifest id of the weight to check (see weights_manifest.json for files, "
                           "licences and the nodes that use each)."}),
            "allow_download": ("BOOLEAN", {
                "default": True,
                "tooltip": "Download the file from its manifest URL when it is missing. Ignored (no download) "
                           "when the environment variable FACECOND_OFFLINE=1 is set."}),
        }}

    def fetch(self, weight: str, allow_download: bool):
        entry = weights.get_entry(weight)
        path = model_paths.resolve_weight(weight, allow_download=allow_download, node="FacecondFetchWeights")
        state = "verified (sha256 matches the manifest)" if entry.sha256 else "present but UNVERIFIED (no pinned hash)"
        status = f"{weight}: {state}; licence: {entry.license}; path: {path}"
        return {"ui": {"text": [status]}, "result": (path, status)}


NODE_CLASS_MAPPINGS = {"FacecondFetchWeights": FacecondFetchWeights}
NODE_DISPLAY_NAME_MAPPINGS = {"FacecondFetchWeights": "FetchWeights"}
