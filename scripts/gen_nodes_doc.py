"""Write docs/NODES.md from the node classes themselves (descriptions, inputs, tooltips, outputs).

    .host/venv/bin/python -P scripts/gen_nodes_doc.py        # rewrite docs/NODES.md
tests/nodes/test_docs.py fails when the file is out of date.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "docs" / "NODES.md"


FILE_SUFFIXES = (".safetensors", ".onnx", ".pt", ".pth", ".bin", ".ckpt", ".png", ".jpg", ".txt")


def _is_file_list(name: str, kind) -> bool:
    """Combos whose choices are files on this machine: shown generically so the doc is the same everywhere."""
    return isinstance(kind, list) and name not in ("sampler_name", "scheduler") and (
        not kind or name.endswith(("_name", "model", "pack", "image", "file", "_list"))
        or any(str(k).lower().endswith(FILE_SUFFIXES) for k in kind))


def _fmt_default(name: str, kind, opts: dict) -> str:
    if _is_file_list(name, kind):
        return ""
    if isinstance(kind, list):
        return f"`{opts.get('default', kind[0])}`" if kind else ""
    return f"`{opts['default']}`" if "default" in opts else ""


def _kind(name: str, kind) -> str:
    if name in ("sampler_name", "scheduler"):
        return f"ComfyUI's {name} list"
    if _is_file_list(name, kind):
        return "file in its model folder"
    if isinstance(kind, list):
        return "choice: " + ", ".join(str(k) for k in kind)
    return str(kind)


def render(mappings: dict, display: dict) -> str:
    lines = ["# facecond nodes", "",
             "Generated from the node classes by `scripts/gen_nodes_doc.py`; every input's tooltip, as the",
             "ComfyUI canvas shows it. Node IDs are permanent; widget order never changes (workflows store",
             "widget values by position).", ""]
    by_cat: dict[str, list[str]] = {}
    for node_id, cls in mappings.items():
        by_cat.setdefault(cls.CATEGORY, []).append(node_id)
    for cat in sorted(by_cat):
        lines += [f"## {cat}", ""]
        for node_id in sorted(by_cat[cat], key=lambda n: display.get(n, n)):
            cls = mappings[node_id]
            lines += [f"### {display.get(node_id, node_id)} (`{node_id}`)", "", cls.DESCRIPTION.strip(), "",
                      "| input | type | default | what it does |", "|---|---|---|---|"]
            for sec, entries in cls.INPUT_TYPES().items():
                if sec not in ("required", "optional"):
                    continue
                for name, entry in entries.items():
                    opts = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
                    tip = str(opts.get("tooltip", "")).replace("\n", " ").replace("|", "\\|")
                    opt = " (optional)" if sec == "optional" else ""
                    kind, default = _kind(name, entry[0]), _fmt_default(name, entry[0], opts)
                    lines.append(f"| `{name}`{opt} | {kind} | {default} | {tip} |")
            names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
            tips = getattr(cls, "OUTPUT_TOOLTIPS", None) or [""] * len(names)
            lines += ["", "| output | type | what it is |", "|---|---|---|"]
            for name, kind, tip in zip(names, cls.RETURN_TYPES, tips):
                lines.append(f"| `{name}` | {kind} | {str(tip).replace('|', chr(92) + '|')} |")
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def current_doc() -> str:
    """Import ComfyUI and the pack (throw-away base dir) and render the doc."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from facecond_dev import host

    if "facecond" not in sys.modules:
        host.import_comfy(Path(tempfile.mkdtemp(prefix="facecond-doc-")))
    pack = host.load_pack(host.REPO, "facecond")
    return render(pack.NODE_CLASS_MAPPINGS, pack.NODE_DISPLAY_NAME_MAPPINGS)


if __name__ == "__main__":
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(current_doc())
    print(OUT)
