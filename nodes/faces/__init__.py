"""Face nodes: FaceDetectCrop, FaceEmbed and FaceSimilarity (``detect_embed.py``), with the model dropdowns
(FaceNet, insightface-format packs) other methods reuse. The maths lives in ``py/faces/``.
"""
