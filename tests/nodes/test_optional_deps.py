"""Without onnxruntime the pack still loads and MTCNN detection works; insightface models say how to install it."""

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent("""
    import sys, tempfile
    from pathlib import Path
    sys.modules["onnxruntime"] = None  # as if it were not installed: `import onnxruntime` raises ImportError
    sys.path.insert(0, sys.argv[1])
    from facecond_dev import host
    base = Path(tempfile.mkdtemp())
    host.import_comfy(base)
    pack = host.load_pack(host.REPO, "facecond")
    host.install_stand_in_models(base)
    import numpy as np, torch
    from PIL import Image
    from facecond.nodes.faces.detect_embed import FacecondFaceDetectCrop, FacecondFaceEmbed
    img = np.asarray(Image.open(host.shared_data() / "faces/obama/obama.jpg").convert("RGB"), np.float32) / 255
    with torch.inference_mode():
        faces = FacecondFaceDetectCrop().detect(torch.from_numpy(img)[None], detector="mtcnn", select="largest",
            face_index=0, min_size=40, margin_scale=1.0, upright="off", no_face="error")[0]
        print("nodes", len(pack.NODE_CLASS_MAPPINGS), "faces", len(faces))
        try:
            FacecondFaceEmbed().embed(faces, "testpack/mobilefacenet_128.onnx", "bottleneck_512", "auto")
        except Exception as e:
            print("embed error:", e)
""")


def test_pack_works_without_onnxruntime(shared_data):
    import facecond

    proc = subprocess.run([sys.executable, "-P", "-c", SCRIPT, str(ROOT / "scripts")], capture_output=True,
                          text=True, timeout=300, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert f"nodes {len(facecond.NODE_CLASS_MAPPINGS)} faces 1" in proc.stdout, out[-3000:]
    assert "embed error:" in proc.stdout and "pip install onnxruntime" in proc.stdout, out[-3000:]
