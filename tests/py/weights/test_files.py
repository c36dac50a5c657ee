"""py/weights/files.py: the one facecond.kind check, as every loader of the pack's own files reports it."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from facecond.py.celebbasis.coeffs import load_coeffs, load_mlp
from facecond.py.celebbasis.inversion import load_celeb_faces
from facecond.py.face0.embeds_io import load_embeds
from facecond.py.face0.projection import load_projection
from facecond.py.weights.files import require_kind


def test_require_kind_returns_meta_or_names_file_found_and_expected():
    meta = {"facecond.kind": "face_embeds", "model": "m"}
    assert require_kind(meta, "face_embeds", "f.safetensors", "face-embeddings") is meta
    with pytest.raises(ValueError, match=r"^f\.safetensors: not a face-embeddings file \(metadata "
                                         r"facecond\.kind='celeb_mlp', expected 'face_embeds'\)\. Pick a file"):
        require_kind({"facecond.kind": "celeb_mlp"}, "face_embeds", "f.safetensors", "face-embeddings")
    with pytest.raises(ValueError, match=r"facecond\.kind=None, expected 'x'"):
        require_kind(None, "x", "f", "x")


@pytest.mark.parametrize(("load", "expected"), [
    (load_projection, "face0_projection"), (load_embeds, "face_embeds"), (load_mlp, "celeb_mlp"),
    (load_coeffs, "celeb_coeffs"), (load_celeb_faces, "celeb_faces")])
def test_every_loader_refuses_a_file_of_another_kind(tmp_path, load, expected):
    path = tmp_path / "other.safetensors"
    save_file({"embeds": torch.zeros(2, 4)}, str(path), metadata={"facecond.kind": "face_ti"})
    with pytest.raises(ValueError, match=rf"other\.safetensors: not a .* file \(metadata facecond\.kind='face_ti', "
                                         rf"expected '{expected}'\)"):
        load(path)
