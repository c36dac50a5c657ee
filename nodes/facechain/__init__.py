"""FaceChain nodes (Liu et al. 2023), mirroring ``py/facechain/``:

- ``chain.py``: FaceChainPreprocess, ChooseTemplateFace, RankBySimilarity
- ``fusion.py``: FaceFusion (re-diffusion of each face, optional swap model)
- ``tagging.py``: FaceChainTagFaces (trigger word and captions for a face-LoRA dataset)
"""
