"""py/weights/safe_paths.py: file names from a graph stay inside their folder."""

from __future__ import annotations

import os

import pytest

from facecond.py.weights.safe_paths import MAX_PART_BYTES, PathRuleError, inside, join_under, name_problem


@pytest.mark.parametrize("name", ["person", "sub/person", "a.b-c_d", "identities/2024/alice", "sub\\person",
                                  "./person", "café"])
def test_plain_names_join_under_the_root(tmp_path, name):
    path = join_under(tmp_path, name)
    assert inside(tmp_path, path)
    assert os.path.basename(path) == os.path.basename(name.replace("\\", "/"))


@pytest.mark.parametrize(("name", "reason"), [
    ("", "is empty"), ("   ", "is empty"),
    ("/some/dir/x", "absolute"), ("\\\\server\\share\\x", "absolute"), ("C:\\x", "absolute"), ("C:x", "absolute"),
    ("../x", "'..'"), ("a/../../x", "'..'"), ("a\\..\\..\\x", "'..'"), ("..", "'..'"),
    ("x\x00.png", "NUL"), ("x\ny", "control"),
    ("a" * (MAX_PART_BYTES + 1), f"at most {MAX_PART_BYTES}"), ("é" * (MAX_PART_BYTES // 2 + 1), "bytes"),
    ("a/" * 600, "characters long"),
])
def test_names_that_leave_or_break_the_folder_are_refused(tmp_path, name, reason):
    assert reason in name_problem(name)
    with pytest.raises(PathRuleError, match=reason) as info:
        join_under(tmp_path, name)
    assert isinstance(info.value, ValueError) and info.value.reason == name_problem(name)
    assert len(str(info.value)) < 300  # an overlong name is shortened in the message


def test_inside_does_not_count_the_root_or_a_sibling_with_the_same_prefix(tmp_path):
    assert not inside(tmp_path / "out", tmp_path / "out")
    assert not inside(tmp_path / "out", tmp_path / "output" / "x")
    assert inside(tmp_path / "out", tmp_path / "out" / "x" / ".." / "y")
