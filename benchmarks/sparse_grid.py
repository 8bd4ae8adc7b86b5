"""Probe (H100): the experimental direct_ballot rows' grid on the long sparse
gathers of the DSv4 and V4.1 records, beside the rows dispatch gives them
(compact) and the direct rows, and a copy of the valid bytes in the same rounds.

    git apply benchmarks/experiments/direct_ballot.patch   # on 212e1c4's tree
    python -m kvgen generate && python -m kvgen build      # CPU: its rows' cubins
    python benchmarks/sparse_grid.py OUT.json [SUBSTR ...] # GPU

The direct_ballot schedule is not shipped (BENCHMARKS.md, log 50); without the
patch this times the compact and direct rows alone.

For each shape (the sparse bench's construction: random slots over the cache,
a fraction valid, input sets rotated past L2), every shipped sm_90a row at
block 64 of the direct_ballot schedule is launched with its warps taking K
chunks each (K = 1 is dispatch's grid; K > 1 gives fewer, longer-lived warps
whose chunks at any moment lie closer together), beside the compact and direct
rows on their dispatch grids; each variant is checked against the torch path
on every input set (outputs poisoned first), then all are timed with the copy
(bench's interleaved CUDA-graph replays). BENCHMARKS.md, log 50.
"""

from __future__ import annotations

import json
import sys

import torch

from kvgen.runtime.loader import registry
from kvgen.tools import bench
from kvgen.tools.variants import variant_of

SHAPES = tuple(s for s in bench.FAMILIES["sparse"] if s.num_slots == 65536)
CHUNKS_A_WARP = (1, 2, 4)
BLOCK_SIZE = 64


def _rows(shape):
    return [e for e in registry().entries
            if e.family == "dqgk" and e.arch == "sm_90a" and e.config["format"] == shape.format
            and e.config["indexing"] == "sparse" and e.config["block_size"] == BLOCK_SIZE
            and e.config["schedule"] in ("direct", "direct_ballot", "compact")]


def probe(shape, l2_bytes: int, copy_bw: float) -> dict:
    w = bench.workload(shape, l2_bytes)
    variants = {}
    for e in _rows(shape):
        name = variant_of(e.config)
        if e.config["schedule"] != "direct_ballot":
            variants[name] = lambda a, e=e: bench._runner("entry", a, e, pdl=e.pdl)
            continue
        cta_rows = e.config["num_warps"] * e.config["ballot_chunk"]  # at K = 1
        for k in CHUNKS_A_WARP:
            grid = (1, max(1, -(-shape.num_slots // (cta_rows * k))), 1)
            variants[f"{name} k{k}"] = lambda a, e=e, grid=grid: bench._runner("entry", a, e, grid=grid, pdl=e.pdl)
    timed = bench._time_variants(shape.label, w.cases, w.expected, variants, w.working_set,
                                 w.working_set / copy_bw, w.reference)
    us = {n: t["us"] for n, t in timed.items() if n != "torch"}
    best = min((n for n in us if n != bench.COPY), key=us.get)
    print(f"{shape.label}: copy {us[bench.COPY]:.2f} best {best} {us[best]:.2f} "
          f"({us[bench.COPY] / us[best]:.3f} of copy); "
          + " ".join(f"[{n} {v:.2f}]" for n, v in sorted(us.items(), key=lambda kv: kv[1])), flush=True)
    return {"shape": shape.label, "us": us}


if __name__ == "__main__":
    out_path, wanted = sys.argv[1], sys.argv[2:]
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    bw = bench.copy_bandwidth()
    report = {"device": torch.cuda.get_device_name(0),
              "rows": [probe(s, l2, bw) for s in SHAPES if not wanted or any(x in s.label for x in wanted)]}
    with open(out_path, "w") as f:
        json.dump(report, f, indent=1)
