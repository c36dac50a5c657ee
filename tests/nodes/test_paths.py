"""nodes/paths.py against the real in-process ComfyUI folder_paths: the write rule, the pack-file loader's
one error, and the float checks every node's VALIDATE_INPUTS runs."""

from __future__ import annotations

import inspect
import math
import os

import folder_paths
import pytest
import torch

import facecond
from facecond.nodes import paths
from facecond.nodes.face0.embeddings import LoadFaceEmbeds, SaveFaceEmbeds
from facecond.nodes.faces.detect_embed import FacecondFaceDetectCrop
from facecond.py.face0.embeds_io import save_embeds
from facecond.py.faces.types import FaceEmbeds


def test_write_path_stays_in_the_folder_and_names_node_input_and_folder(comfy_base):
    root = folder_paths.get_folder_paths("facecond_celebbasis")[0]
    assert paths.write_path("N", "save_name", "sub/x", "facecond_celebbasis", ".safetensors") == \
        os.path.join(root, "sub", "x.safetensors")
    assert paths.write_path("N", "p", "x", "output").startswith(folder_paths.get_output_directory())
    for bad, why in (("/some/dir/x", "is an absolute path"), ("../x", "contains '..'"), ("a\x00b", "NUL"),
                     ("n" * 300, "bytes (at most 200)"), ("", "is empty")):
        with pytest.raises(ValueError, match=r"^TrainCelebBasis: save_name .*") as info:
            paths.write_path("TrainCelebBasis", "save_name", bad, "facecond_celebbasis", ".safetensors")
        assert why in str(info.value) and f"only written inside {root}" in str(info.value)
    with pytest.raises(ValueError, match="SaveFaceEmbeds: filename_prefix '/tmp/x' is an absolute path"):
        SaveFaceEmbeds().save(FaceEmbeds(torch.ones(1, 4), "t", False, (0,)), "/tmp/x", "output", "")


def test_write_names_must_be_valid_on_windows_too(comfy_base):
    """Names Windows cannot create are refused on every system, with why and a name that works."""
    for bad, why, alt in (("CON", "'CON.safetensors', a name Windows reserves", "CON_"),
                          ("sub/nul", "reserves", "sub/nul_"), ("ab:c", "contains ':'", "ab_c"),
                          ("faces./x", "ending in a dot", "faces/x"), ("x?", "contains '?'", "x_")):
        with pytest.raises(ValueError) as info:
            paths.write_path("TrainCelebBasis", "save_name", bad, "facecond_celebbasis", ".safetensors")
        assert str(info.value).startswith(f"TrainCelebBasis: save_name {bad!r} ") and why in str(info.value)
        assert str(info.value).endswith(f"Use a name that works on every system, e.g. {alt!r}.")
    # a filename_prefix is checked as the file ComfyUI makes of it (CON_00001_.x is a valid name) ...
    paths.check_write_name("SaveCelebCoeffs", "filename_prefix", "CON", "facecond_celebbasis")
    paths.check_write_name("SaveCelebCoeffs", "filename_prefix", "%year%-%month%-%day%/x", "facecond_celebbasis")
    for bad, alt in (("CON/x", "CON_/x"), ("id_%date:yyyy-MM-dd%", "id_%year%-%month%-%day%")):
        with pytest.raises(ValueError, match="SaveCelebCoeffs: filename_prefix") as info:
            paths.check_write_name("SaveCelebCoeffs", "filename_prefix", bad, "facecond_celebbasis")
        assert f"e.g. {alt!r}" in str(info.value)
    with pytest.raises(ValueError, match=r"contains ':'.*%date:\.\.\.% is only expanded for ComfyUI's own save"):
        SaveFaceEmbeds().save(FaceEmbeds(torch.ones(1, 4), "t", False, (0,)), "%date:yyyy-MM-dd%/x", "output", "")


def test_a_file_where_a_folder_is_needed_is_named(comfy_base):
    """os.makedirs would say "[Errno 17] File exists" / "[Errno 20] Not a directory"."""
    out = folder_paths.get_output_directory()
    os.makedirs(os.path.join(out, "paths_t"), exist_ok=True)
    blocker = os.path.join(out, "paths_t", "a_file")
    with open(blocker, "w") as f:
        f.write("x")
    with pytest.raises(ValueError) as info:
        paths.write_dir("FaceChainTagFaces", "dataset_name", "paths_t/a_file", "output")
    assert str(info.value) == (f"FaceChainTagFaces: dataset_name 'paths_t/a_file' names the file {blocker}, not a "
                               "folder: files are written into a folder of that name. Give another name (e.g. "
                               "'paths_t/a_file_set'), or move that file away.")
    with pytest.raises(ValueError, match=f"needs the folder {blocker}, but a file has that name"):
        paths.write_path("SaveFaceEmbeds", "filename_prefix", "paths_t/a_file/deeper/x", "output")
    assert paths.write_dir("N", "dataset_name", "paths_t/new_set") == os.path.join(out, "paths_t", "new_set")


def test_load_file_turns_every_failure_into_one_message(comfy_base):
    folder = folder_paths.get_folder_paths("facecond_embeds")[0]
    os.makedirs(folder, exist_ok=True)
    good = os.path.join(folder, "paths_good.safetensors")
    save_embeds(FaceEmbeds(torch.ones(2, 4), "t", False, (0, 1)), good)
    with open(good, "rb") as f:
        data = f.read()
    with open(os.path.join(folder, "paths_cut.safetensors"), "wb") as f:
        f.write(data[:-3])
    assert LoadFaceEmbeds().load("paths_good.safetensors")[0].embeds.shape == (2, 4)
    with pytest.raises(ValueError) as info:
        LoadFaceEmbeds().load("paths_cut.safetensors")
    msg = str(info.value)
    assert msg.startswith("LoadFaceEmbeds: embeds_name 'paths_cut.safetensors': ")
    assert os.path.join(folder, "paths_cut.safetensors") in msg and "ends inside its tensor data" in msg
    assert f"expected {len(data)} bytes; found {len(data) - 3} bytes" in msg and "SaveFaceEmbeds" in msg
    for name, why in (("../x.safetensors", "contains '..'"), ("nope.safetensors", "is not in")):
        with pytest.raises(ValueError, match=f"LoadFaceEmbeds: embeds_name '{name}'.*{why}"):
            LoadFaceEmbeds().load(name)


def test_finite_floats_checks_nan_inf_and_the_bounds_comfyui_skips():
    check = FacecondFaceDetectCrop.VALIDATE_INPUTS
    assert check(margin_scale=1.5) is True and check(margin_scale=None) is True  # None: linked, checked at run
    assert check(margin_scale=math.nan) == ("FaceDetectCrop: margin_scale is NaN (not a finite number); give a "
                                            "number between 0.0 and 3.0.")
    assert "margin_scale is -inf" in check(margin_scale=-math.inf)
    assert check(margin_scale=-0.5) == "FaceDetectCrop: margin_scale = -0.5 is below its minimum 0.0."
    assert check(margin_scale=4.0) == "FaceDetectCrop: margin_scale = 4.0 is above its maximum 3.0."


def test_every_float_widget_is_validated_and_nothing_else():
    """ComfyUI skips its own min/max/list checks for the inputs VALIDATE_INPUTS names: each node names exactly
    its FLOAT widgets, so the other inputs keep ComfyUI's checks."""
    for node_id, cls in facecond.NODE_CLASS_MAPPINGS.items():
        spec = cls.INPUT_TYPES()
        floats = {n for s in ("required", "optional") for n, v in spec.get(s, {}).items() if v[0] == "FLOAT"}
        fn = getattr(cls, "VALIDATE_INPUTS", None)
        named = set(inspect.getfullargspec(fn).args[1:]) if fn else set()
        assert named == floats, (node_id, named, floats)
        if fn:
            assert inspect.getfullargspec(fn).varkw is None, node_id
            assert fn(**dict.fromkeys(floats, math.nan)).startswith(facecond.NODE_DISPLAY_NAME_MAPPINGS[node_id])


def test_out_of_memory_while_loading_reaches_comfyui_as_itself(comfy_base):
    """ComfyUI's executor recognises an out-of-memory error by its type (unloads models, says so): load_file must
    not turn it into "pick a file of the right kind"."""
    import comfy.model_management as mm

    folder = folder_paths.get_folder_paths("facecond_embeds")[0]
    os.makedirs(folder, exist_ok=True)
    save_embeds(FaceEmbeds(torch.ones(2, 4), "t", False, (0, 1)), os.path.join(folder, "paths_oom.safetensors"))

    def cpu_oom(path):  # a real allocation failure: 2**50 bytes on the CPU
        return torch.empty(2**50, dtype=torch.uint8)

    def cuda_oom(path):  # the type ComfyUI's executor checks (comfy.model_management.OOM_EXCEPTION)
        raise mm.OOM_EXCEPTION("CUDA out of memory. Tried to allocate 20.00 GiB")

    with pytest.raises(RuntimeError, match=r"can't allocate memory|out of memory") as info:
        paths.load_file("LoadFaceEmbeds", "embeds_name", "facecond_embeds", "paths_oom.safetensors", cpu_oom)
    assert "right kind" not in str(info.value) and not isinstance(info.value, ValueError)
    with pytest.raises(mm.OOM_EXCEPTION) as info:
        paths.load_file("LoadFaceEmbeds", "embeds_name", "facecond_embeds", "paths_oom.safetensors", cuda_oom)
    assert "right kind" not in str(info.value)

    def python_oom(path):
        raise MemoryError

    with pytest.raises(MemoryError):
        paths.load_file("LoadFaceEmbeds", "embeds_name", "facecond_embeds", "paths_oom.safetensors", python_oom)
