"""Celeb Basis (Yuan et al. 2023) and face textual inversion (Livshits 2023): a person as a word. Mirrors
``py/celebbasis/``:

- ``basis.py``: CelebBasisCoeffs, TrainCelebBasis
- ``files.py``: name lists, CelebMLP loading, Save/LoadCelebCoeffs
- ``inversion.py``: TrainFaceTI, PrecomputeCelebFaces (face TI)
- ``celeb_photos.py``: CelebPhotoFaces (face TI's ``id`` init from real photos)
- ``pseudo_words.py``: how a learned word enters a cloned CLIP (ComfyUI's ``embedding:`` mechanism)
- ``training.py``: the ComfyUI side of training, shared by both trainers and their CLIs
"""
