"""Install metadata: what ComfyUI-Manager (requirements.txt) and pip (pyproject.toml) install is the same,
never touches torch, and the registry metadata is complete."""

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[2]


def _requirements() -> list[str]:
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def test_requirements_match_pyproject_and_leave_torch_alone():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    deps = project["project"]["dependencies"]
    assert sorted(deps) == sorted(_requirements())
    names = {d.split("=")[0].split(">")[0].split("<")[0].strip().lower() for d in deps}
    assert not names & {"torch", "torchvision", "torchaudio"}
    assert "facenet-pytorch==2.5.3" in deps  # 2.6.0 pins torch<2.3


def test_onnxruntime_is_an_extra_never_a_hard_dependency():
    """onnxruntime and onnxruntime-gpu cannot coexist: a hard dependency on one would be installed beside a
    user's other one. Each is an extra; the pack loads without either (tests/nodes/test_optional_deps.py)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    hard = " ".join(project["dependencies"] + _requirements()).lower()
    assert "onnxruntime" not in hard
    extras = project["optional-dependencies"]
    assert extras["insightface"] == ["onnxruntime>=1.16"] and extras["insightface-gpu"] == ["onnxruntime-gpu>=1.16"]


def test_comfy_registry_metadata():
    comfy = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"] and "Icon" in comfy
