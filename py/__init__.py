"""Pure torch/numpy implementations of the pack's methods. Nothing here imports ComfyUI."""
