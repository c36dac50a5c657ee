"""Every example workflow matches the node schemas the server reports (the front end's view of them).

Widget values are checked by position against each node's widget inputs, the way the front end stores
them, so a reordered or retyped widget in a shipped node breaks this test, not a user's saved workflow.
Examples that wire core nodes whose interface changed come in one file per ComfyUI range (``X.json`` for
current ComfyUI, ``X_comfyui-0.3.json`` for 0.3.x; ``host.example_workflows``): each file is checked on the
host it is for, so the suite run on both hosts checks every file.
"""

import json

import pytest

from facecond_dev import host
from facecond_dev.client import _SEED_CONTROL_VALUES, _widget_inputs

TESTED_HOSTS = {"0.3.75": (0, 3, 75), "0.28": (0, 28, 0)}  # what make test / CI run (host.HOSTS)
EXAMPLES = sorted(host.example_workflows().values())  # the variants for the ComfyUI under test
FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".onnx", ".png", ".jpg", ".jpeg", ".webp")


def test_there_are_examples():
    assert len(EXAMPLES) >= 2, [p.name for p in EXAMPLES]


def test_every_example_file_is_for_a_tested_host():
    """No variant is dead: each file is the pick for one of the hosts the suite runs on, and every variant's
    feature also has the plain file for current ComfyUI."""
    picked = {p for v in TESTED_HOSTS.values() for p in host.example_workflows(v).values()}
    files = set(host.EXAMPLES_DIR.glob("*.json"))
    assert files == picked, f"example files no tested host picks: {sorted(p.name for p in files - picked)}"
    assert set(host.example_workflows(TESTED_HOSTS["0.3.75"])) == set(host.example_workflows(TESTED_HOSTS["0.28"]))
    assert host.example_workflow("facechain_train_face_lora", (0, 3, 75)).name == \
        "facechain_train_face_lora_comfyui-0.3.json"
    assert host.example_workflow("facechain_train_face_lora", (0, 28, 0)).name == "facechain_train_face_lora.json"
    assert host.example_workflow("facechain_train_face_lora.json", (0, 2, 9)).name == \
        "facechain_train_face_lora_comfyui-0.3.json"
    assert host.example_workflow("face0_single_photo", (0, 3, 75)) == host.example_workflow("face0_single_photo",
                                                                                           (0, 28, 0))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_no_deprecated_core_node(server, path):
    """An example uses no core node the ComfyUI under test marks deprecated (ImageBatch is, in 0.28: the
    current-ComfyUI files use BatchImagesNode, the 0.3.x ones ImageBatch, which is current there)."""
    info = server.object_info()
    used = {n["type"] for n in json.loads(path.read_text())["nodes"]}
    deprecated = sorted(t for t in used if info.get(t, {}).get("deprecated"))
    assert not deprecated, f"{path.name} uses deprecated core node(s) {deprecated}"


def _check_widget(node_label: str, name: str, kind: str, opts: dict, choices, value) -> None:
    where = f"{node_label} widget {name!r} = {value!r}"
    if kind == "INT":
        assert isinstance(value, int) and not isinstance(value, bool), where
    elif kind == "FLOAT":
        assert isinstance(value, (int, float)) and not isinstance(value, bool), where
    elif kind == "BOOLEAN":
        assert isinstance(value, bool), where
    elif kind == "STRING":
        assert isinstance(value, str), where
    elif kind == "COMBO" and choices is not None:
        is_file = isinstance(value, str) and value.lower().endswith(FILE_SUFFIXES)
        if not is_file:  # model/input file lists depend on the machine
            assert value in choices, f"{where} not in {choices}"
    if kind in ("INT", "FLOAT"):
        if "min" in opts:
            assert value >= opts["min"], where
        if "max" in opts:
            assert value <= opts["max"], where


def _input_type(all_in: dict, name: str):
    """The type an input takes; ``group.item`` names one slot of a growing input (``COMFY_AUTOGROW_V3``, e.g.
    BatchImagesNode's ``images.image0``), typed by its template. None: no such input."""
    if name in all_in:
        return all_in[name][0]
    group, _, item = name.partition(".")
    if group not in all_in or all_in[group][0] != "COMFY_AUTOGROW_V3":
        return None
    template = all_in[group][1]["template"]
    slots = template.get("names") or [f"{template['prefix']}{i}" for i in range(template["max"])]
    if item not in slots:
        return None
    inputs = {**template["input"].get("required", {}), **template["input"].get("optional", {})}
    return next(iter(inputs.values()))[0]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_matches_schemas(server, path):
    info = server.object_info()
    workflow = json.loads(path.read_text())
    nodes = {n["id"]: n for n in workflow["nodes"]}
    for node in nodes.values():
        kind = node["type"]
        if kind in ("Note", "MarkdownNote", "Reroute", "PrimitiveNode"):
            continue
        assert kind in info, f"{path.name}: unknown node type {kind}"
        spec = info[kind]
        label = f"{path.name}: node {node['id']} ({kind})"
        values = list(node.get("widgets_values", []))
        all_inputs = {**spec["input"].get("required", {}), **spec["input"].get("optional", {})}
        for name, wkind, opts in _widget_inputs(spec):
            assert values, f"{label}: no value for widget {name!r}"
            value = values.pop(0)
            raw = all_inputs[name][0]
            choices = raw if isinstance(raw, list) else opts.get("options")
            _check_widget(label, name, wkind, opts, choices, value)
            if wkind == "INT" and (opts.get("control_after_generate") or name in ("seed", "noise_seed")) \
                    and values and values[0] in _SEED_CONTROL_VALUES:
                values.pop(0)
        if kind.startswith("Facecond"):
            assert not values, f"{label}: {len(values)} widget values left over: {values}"
        # links: the declared type matches the source output and the target input
        for slot, out in enumerate(node.get("outputs", [])):
            if out.get("links"):
                assert out["type"] == spec["output"][slot], f"{label}: output {slot} is {spec['output'][slot]}"
    for link_id, src, src_slot, dst, dst_slot, ltype in workflow.get("links", []):
        src_node, dst_node = nodes[src], nodes[dst]
        if src_node["type"] in info:
            assert info[src_node["type"]]["output"][src_slot] == ltype, f"{path.name}: link {link_id} type"
        if dst_node["type"] in info:
            dst_input = dst_node["inputs"][dst_slot]
            all_in = {**info[dst_node["type"]]["input"].get("required", {}),
                      **info[dst_node["type"]]["input"].get("optional", {})}
            want = _input_type(all_in, dst_input["name"])
            assert want is not None, f"{path.name}: link {link_id} into unknown input {dst_input['name']}"
            assert want in (ltype, "*") or isinstance(want, list) or ltype in str(want).split(","), \
                f"{path.name}: link {link_id} carries {ltype} into {dst_input['name']} ({want})"
