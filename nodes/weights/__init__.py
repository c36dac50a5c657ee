"""Weights nodes: FetchWeights (``fetch.py``) verifies or downloads a ``weights_manifest.json`` entry.

The maths-free side lives in ``py/weights/`` (manifest, download, pack-file checks); the ComfyUI folder glue every
node uses is ``nodes/model_paths.py``.
"""
