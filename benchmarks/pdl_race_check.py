"""Shows that tests/test_gpu.py's PDL chain test can fail (GPU; run from the
repo root: `python benchmarks/pdl_race_check.py`). It copies generated/ to a
temporary tree in which the DSv4 b64 dense rows that dispatch takes are the
shipped pdl=0 kernels (no griddepcontrol.wait) relabelled pdl=1, then runs the
chain there and on the real tree, with PDL on and off. Expected: mismatches
only for the relabelled tree with PDL on. Results: BENCHMARKS.md."""

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
os.environ["KVGEN_BACKEND"] = "cubin"

import test_gpu  # noqa: E402

from kvgen.runtime.loader import reset_registry  # noqa: E402
from kvgen.paths import generated_dir  # noqa: E402


def relabelled_tree(root: Path) -> Path:
    tree = root / "generated"
    shutil.copytree(generated_dir(), tree)
    manifest = json.loads((tree / "manifest.json").read_text())
    rows = []
    for row in manifest["kernels"]:
        c = row["config"]
        target = (c["format"], c["indexing"], c["block_size"], c["num_stages"], c["num_warps"], c["schedule"]) == \
            ("dsv4_584", "dense", 64, 4, 4, "strided")
        if target and c["pdl"]:
            continue  # drop the real PDL row ...
        if target:
            c["pdl"] = True  # ... and pass off the kernel without griddepcontrol.wait as one
        rows.append(row)
    manifest["kernels"] = rows
    (tree / "manifest.json").write_text(json.dumps(manifest))
    return tree


with tempfile.TemporaryDirectory() as tmp:
    for label, tree in [("shipped kernels", None), ("wait removed", relabelled_tree(Path(tmp)))]:
        for pdl in ("1", "0"):
            os.environ["KVGEN_PDL"] = pdl
            reset_registry(tree)
            print(f"{label}, KVGEN_PDL={pdl}: mismatching values over 20 chains: "
                  f"eager {test_gpu.pdl_chain(20)}, CUDA graph {test_gpu.pdl_chain(20, graph=True)}", flush=True)
