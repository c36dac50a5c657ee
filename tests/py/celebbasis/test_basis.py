"""py/celebbasis/basis.py and coeffs.py with the real CLIP tokenizer (ComfyUI's sd1_tokenizer) and a seeded
token table: orthonormal bases, exact reconstruction of a name from its coefficients, the p rule, files."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import CLIPTokenizer

from facecond.py.celebbasis import basis as cb
from facecond.py.celebbasis.coeffs import BasisFacts, CelebCoeffs, load_coeffs, load_mlp, new_mlp, save_coeffs, save_mlp

D = 96


@pytest.fixture(scope="module")
def tokenize():
    import comfy.sd1_clip

    path = os.path.join(os.path.dirname(comfy.sd1_clip.__file__), "sd1_tokenizer")
    tok = CLIPTokenizer.from_pretrained(path)
    return lambda s: tok(s)["input_ids"][1:-1]


@pytest.fixture(scope="module")
def table():
    return torch.randn(49408, D, generator=torch.Generator().manual_seed(0)) * 0.02


def test_names_list_shipped_deduplicated(tmp_path):
    names = cb.load_names()
    assert len(names) >= 300 and len({n.lower() for n in names}) == len(names)
    f = tmp_path / "n.txt"
    f.write_text("# comment\nAda  Lovelace\nada lovelace\n\nAlan Turing\n")
    assert cb.load_names(f) == ["Ada Lovelace", "Alan Turing"]
    with pytest.raises(ValueError, match="not found"):
        cb.load_names(tmp_path / "missing.txt")


def test_basis_orthonormal_and_reconstructs_names(table, tokenize):
    names = cb.load_names()[:80]
    basis = cb.build_basis(table, names, tokenize, p=512)
    m = len(basis.names)
    assert basis.p == m - 1 and basis.basis.shape == (2, m - 1, D)  # p capped at m - 1
    for k in range(2):
        gram = basis.basis[k] @ basis.basis[k].T
        assert torch.allclose(gram, torch.eye(basis.p), atol=1e-5)
    _, ids = cb.name_token_pairs(basis.names, tokenize)
    own = torch.stack([table[ids[:, 0]], table[ids[:, 1]]], dim=1)  # (m, 2, D)
    coeffs = basis.project(own)
    assert coeffs.shape == (m, 2, basis.p)  # exactly 2 x p numbers per identity
    assert torch.allclose(basis.embeddings(coeffs), own, atol=1e-6)
    assert torch.allclose(coeffs.norm(dim=-1).mean(0), basis.scale, rtol=1e-4)


def test_p_rule_and_truncated_reconstruction(table, tokenize):
    names = cb.load_names()
    basis = cb.build_basis(table, names, tokenize, p=32)
    assert basis.p == 32 and cb.effective_p(512, 628, 768) == 512 and cb.effective_p(512, 100, 768) == 99
    assert cb.effective_p(512, 628, 64) == 64
    _, ids = cb.name_token_pairs(basis.names, tokenize)
    own = torch.stack([table[ids[:, 0]], table[ids[:, 1]]], dim=1)
    rec = basis.embeddings(basis.project(own))
    # the projection is the least-squares fit: the residual is orthogonal to the basis
    resid = own - rec
    assert torch.allclose(torch.einsum("mkd,kpd->mkp", resid, basis.basis), torch.zeros(1), atol=1e-5)
    with pytest.raises(ValueError, match=r"end in \(2, 32\)"):
        basis.embeddings(torch.zeros(2, 31))


def test_cache_and_hash(table, tokenize):
    names = cb.load_names()[:40]
    a = cb.cached_basis(table, names, tokenize, p=8)
    assert cb.cached_basis(table, names, tokenize, p=8) is a
    other = table.clone()
    other[0, 0] += 1
    assert cb.table_hash(other) != a.table_hash
    assert a.basis_id == f"{a.table_hash}/{a.names_hash}/p8"


def test_paper_list_comparison(table, tokenize, shared_data):
    """Our list and the paper's span related subspaces of the same table (both are people's names)."""
    ours = cb.build_basis(table, cb.load_names(), tokenize, p=64)
    paper = cb.build_basis(table, cb.load_names(shared_data / "names" / "celebbasis_wiki_names_v2.txt"), tokenize, p=64)
    assert len(paper.names) > 500
    overlap = torch.linalg.svdvals(ours.basis[0] @ paper.basis[0].T).pow(2).mean().item()
    assert overlap > 64 / D * 1.05  # random 64-d subspaces of R^96 overlap by 64/96 on average


def test_mlp_and_coeff_files(tmp_path, table, tokenize):
    basis = cb.build_basis(table, cb.load_names()[:40], tokenize, p=16)
    mlp = new_mlp(12, basis, seed=3)
    f = torch.randn(5, 12)
    out = mlp(f)
    assert out.shape == (5, 2, 16)
    assert torch.allclose(out.norm(dim=-1), basis.scale.expand(5, 2), rtol=1e-5)
    save_mlp(mlp, tmp_path / "m.safetensors", basis, embedder="test/e", names=cb.load_names()[:40], steps=7)
    mlp2, info = load_mlp(tmp_path / "m.safetensors")
    assert torch.equal(mlp2(f), out) and info["steps"] == 7 and info["embedder"] == "test/e"
    info["facts"].check(basis, "the MLP")
    facts = BasisFacts(basis.p, basis.table_hash, basis.names_hash)
    save_coeffs(CelebCoeffs(out[0], facts), tmp_path / "c.safetensors", word="<a>")
    assert os.path.getsize(tmp_path / "c.safetensors") < 1024  # 2 x 16 fp16 + header
    c = load_coeffs(tmp_path / "c.safetensors")
    assert torch.equal(c.coeffs, out[0].half().float()) and c.facts.extra["word"] == "<a>"
    with pytest.raises(ValueError, match="p=8"):
        c.facts.check(cb.build_basis(table, cb.load_names()[:40], tokenize, p=8), "coeffs")
    with pytest.raises(ValueError, match="another model"):
        c.facts.check(cb.build_basis(table * 2, cb.load_names()[:40], tokenize, p=16), "coeffs")
    with pytest.raises(ValueError, match="not a Celeb Basis coefficients file"):
        load_coeffs(tmp_path / "m.safetensors")


def test_parse_names_and_bad_list_files(tmp_path):
    assert cb.parse_names("Ada Lovelace\n# x\n  Alan   Turing \nADA LOVELACE\n") == ["Ada Lovelace", "Alan Turing"]
    with pytest.raises(ValueError, match="names_text has no names: write one name per line"):
        cb.parse_names("# only a comment\n\n", "names_text")
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing here\n")
    with pytest.raises(ValueError, match=r"empty.txt has no names"):
        cb.load_names(empty)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("Penélope Cruz\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt is not UTF-8 text .*save it as UTF-8"):
        cb.load_names(latin1)
    binary = tmp_path / "model.txt"
    binary.write_bytes(b"PK\x03\x04\x00\x00abc")
    with pytest.raises(ValueError, match="contains NUL bytes"):
        cb.load_names(binary)


def test_custom_name_list_changes_the_basis(table, tokenize, shared_data):
    """The paper's own list (celebbasis_wiki_names_v2.txt) gives another basis than the bundled one: its mean rows
    are the means of *those* names' first/second token embeddings, and with p = m - 1 every one of those names is
    reconstructed exactly (its embeddings lie in the span)."""
    paper = cb.load_names(shared_data / "names" / "celebbasis_wiki_names_v2.txt")
    bundled = cb.load_names()
    assert paper != bundled and len(paper) > 600
    few = paper[:40]
    b = cb.build_basis(table, few, tokenize, p=512)
    kept, ids = cb.name_token_pairs(few, tokenize)
    assert b.names == tuple(kept) and b.names_hash == cb.names_hash(few) and b.p == len(kept) - 1
    c = torch.stack([table[ids[:, 0]], table[ids[:, 1]]], dim=1).double()  # (m, 2, D), by hand
    assert torch.allclose(b.mean.double(), c.mean(0), atol=1e-7)
    assert torch.allclose(b.embeddings(b.project(c.float())), c.float(), atol=1e-6)
    other = cb.build_basis(table, bundled[:40], tokenize, p=512)
    assert other.names_hash != b.names_hash and not torch.allclose(other.mean, b.mean)
    # a paper name outside the bundled list is reconstructed by its own basis, not by the bundled one
    outsider = next(i for i, n in enumerate(kept) if n not in bundled[:40])
    err_own = (b.embeddings(b.project(c[outsider:outsider + 1].float())) - c[outsider].float()).norm()
    err_other = (other.embeddings(other.project(c[outsider:outsider + 1].float())) - c[outsider].float()).norm()
    assert err_own < 1e-5 < err_other


def test_identities_labels_and_their_bound():
    from facecond.py.celebbasis.train import MAX_LABEL_CHARS, parse_identities

    assert parse_identities("", 3, "TrainCelebBasis") == [0, 0, 0]
    assert parse_identities("b, a; b", 3, "TrainCelebBasis") == [0, 1, 0]  # first label seen = person 0
    with pytest.raises(ValueError, match="identities has 2 labels for 3 images"):
        parse_identities("a,b", 3, "TrainCelebBasis")
    with pytest.raises(ValueError, match=r"identities is 3,000,000 characters for 3 images"):
        parse_identities("a," * 1_500_000, 3, "TrainCelebBasis")
    assert parse_identities(",".join(["x" * MAX_LABEL_CHARS] * 3), 3, "TrainCelebBasis") == [0, 0, 0]


def test_two_tables_one_joint_basis(table, tokenize):
    """SDXL: one PCA over the CLIP-L and CLIP-G rows side by side; one set of coefficients gives both halves,
    each listed name is exact in both tables at p = m - 1; one table is the computation it always was."""
    g_table = torch.randn(49408, 40, generator=torch.Generator().manual_seed(1)) * 0.05
    names = cb.load_names()[:60]
    joint = cb.build_basis([table, g_table], names, tokenize, p=512)
    m = len(joint.names)
    assert joint.basis.shape == (2, m - 1, D + 40) and joint.parts == (D, 40) and joint.dims == (D, 40)
    _, ids = cb.name_token_pairs(joint.names, tokenize)
    own = torch.stack([torch.cat([table[ids[:, k]], g_table[ids[:, k]]], -1) for k in range(2)], dim=1)
    assert torch.allclose(joint.embeddings(joint.project(own)), own, atol=1e-6)
    # every principal direction is one combination of the names' centred rows, the same in both tables:
    # a name's coefficients reconstruct its CLIP-L half from the CLIP-L part of the basis alone
    one = joint.embeddings(joint.project(own[:1]))[0]
    assert torch.allclose(one[:, :D], own[0, :, :D], atol=1e-6) and torch.allclose(one[:, D:], own[0, :, D:], atol=1e-6)
    single = cb.build_basis(table, names, tokenize, p=512)
    assert single.dims == () and single.parts == (D,)
    assert torch.equal(single.basis, cb.build_basis([table], names, tokenize, p=512).basis)
    assert cb.table_hash(table) == cb.table_hash([table]) != cb.table_hash([table, g_table])
    with pytest.raises(ValueError, match="different vocabularies"):
        cb.build_basis([table, g_table[:100]], names, tokenize)


def test_family_recorded_and_checked(table, tokenize, tmp_path):
    import dataclasses

    names = cb.load_names()[:40]
    b = dataclasses.replace(cb.build_basis(table, names, tokenize, p=8), family="SDXL")
    c = CelebCoeffs(torch.zeros(2, 8), BasisFacts(8, b.table_hash, b.names_hash, family="SDXL"))
    save_coeffs(c, tmp_path / "c.safetensors")
    loaded = load_coeffs(tmp_path / "c.safetensors")
    assert loaded.facts.family == "SDXL"
    loaded.facts.check(b, "x")
    save_mlp(new_mlp(4, b, 0), tmp_path / "m.safetensors", b, embedder="e", names=names, steps=0)
    assert load_mlp(tmp_path / "m.safetensors")[1]["facts"].family == "SDXL"
    sd1 = dataclasses.replace(b, family="SD1.x")
    with pytest.raises(ValueError, match=r"coeffs was made for an SDXL model but this CLIP is SD1.x: .*CLIP-L 768 \+ "
                       r"CLIP-G 1280.*Load an SDXL checkpoint"):
        loaded.facts.check(sd1, "coeffs")
    # files from before families were recorded: made on SD1.x / SD2.x; refused on SDXL, accepted there
    old = BasisFacts(8, b.table_hash, b.names_hash)
    old.check(sd1, "old")
    with pytest.raises(ValueError, match=r"old was made for an SD1.x/SD2.x model but this CLIP is SDXL"):
        old.check(b, "old")
