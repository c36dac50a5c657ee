"""Measuring identity: the evaluation protocols of the papers the pack implements (metrics, CLIP score,
identity score, FID/IS), as plain torch/numpy."""
