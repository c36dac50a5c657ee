"""Developer tooling for facecond: a pinned headless ComfyUI host, its API client, and a tiny
SD1.5 checkpoint for tests and the demo. Not part of the node pack (ComfyUI never imports it)."""
