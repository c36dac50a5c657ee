"""py/weights/safe_paths.py: file names from a graph stay inside their folder."""

from __future__ import annotations

import os

import pytest

from facecond.py.weights.safe_paths import (
    MAX_PART_BYTES,
    PathRuleError,
    inside,
    join_under,
    name_problem,
    windows_alternative,
    windows_problem,
)


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


@pytest.mark.parametrize(("name", "says", "alternative"), [
    ("CON", "'CON', a name Windows reserves", "CON_"), ("con.txt", "reserves", "con_.txt"),
    ("sub/Nul.png", "'Nul.png'", "sub/Nul_.png"), ("LPT9", "reserves", "LPT9_"), ("com1 .x", "reserves", "com1_.x"),
    ("aux/x", "'aux'", "aux_/x"), ("a<b>c", "'<' '>'", "a_b_c"), ('say"hi"?', "'\"' '?'", "say_hi__"),
    ("a|b*", "'|' '*'", "a_b_"), ("person.", "ending in a dot", "person"), ("sub /x", "ending in a space", "sub/x"),
    ("x/.../y", "ending in a dot", "x/_/y"),
    ("faces/%date:yyyy-MM-dd%", "contains ':'", "faces/%year%-%month%-%day%"),
])
def test_names_windows_cannot_create_are_refused_with_an_alternative(name, says, alternative):
    assert name_problem(name) is None  # a valid relative name on Linux/macOS ...
    assert says in windows_problem(name)  # ... that Windows cannot create
    assert windows_alternative(name, prefix=True) == alternative
    assert windows_problem(windows_alternative(name)) is None


def test_comfyui_date_syntax_is_named_and_gets_the_server_side_variables():
    why = windows_problem("%date:yyyy-MM-dd hh:mm:ss%")
    assert "':'" in why and "%date:...% is only expanded for ComfyUI's own save nodes" in why
    assert windows_alternative("x_%date:yyyy-MM-dd hh:mm:ss%", prefix=True) == \
        "x_%year%-%month%-%day% %hour%_%minute%_%second%"
    plain = windows_alternative("x_%date:yyyy-MM-dd%")  # not a filename_prefix: today's date, written out
    assert plain.startswith("x_2") and len(plain) == len("x_2025-01-31") and windows_problem(plain) is None


@pytest.mark.parametrize("name", ["person", "./person", "com10", "console", "nul_face", "CONx.png", "a.b",
                                  "%year%-%month%-%day%/x", "my person/face 1", ".hidden"])
def test_names_windows_accepts_pass(name):
    assert windows_problem(name) is None and windows_alternative(name) == name
