"""The weights manifest: pinned files, verification, safe loading, downloads."""
