"""Multi-reference IP-Adapter nodes (Ye et al. 2023; Kazistova et al.), mirroring ``py/ipadapter/``:

- ``adapter.py``: LoadIPAdapter, IPAdapterEncode, ApplyIPAdapter
- ``aggregate.py``: AggregateEmbeds (mean, max, norm-mean, trained self-attention)
- ``lora.py``: the FaceID LoRA applied to a cloned model as ComfyUI weight patches
"""
