"""Face0 nodes (Valevski et al. 2023), mirroring ``py/face0/``:

- ``projection.py``: LoadFace0Projection, ProjectToContext (face embedding -> context tokens)
- ``guidance.py``: ThreeWayGuider, ThreeWayCFGSampler (the three-way classifier-free guidance)
- ``embeddings.py``: EmbeddingInterpolate, RandomIdentity, Save/LoadFaceEmbeds
"""
