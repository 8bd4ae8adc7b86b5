"""Probe (H100): the direct schedule's depth and grid on the small records'
long gathers, against the ring and a copy of the same bytes in the same rounds.

    python benchmarks/direct_grid.py OUT.json [SUBSTR ...]

For each shape (bench_formats' construction, input sets rotated past L2), every
shipped sm_90a row at block 64 of the direct schedule is launched with its
warps taking K blocks each (K = 1 is dispatch's grid), beside the ring's row on
its dispatch grid; each variant is checked against the torch path on every
input set, then all are timed with the copy (bench.graph_times). A K > 1 grid
amortises a CTA's fixed cost over K blocks a warp, and leaves fewer CTAs to
fill the machine; a row built with PDL is timed without it too ("nopdl").
BENCHMARKS.md, log 48 (`results/direct_grid_h100.json`, with log 48's
experimental s8 rows; `results/direct_grid_packed_h100.json`, the rows shipped).
"""

from __future__ import annotations

import json
import sys

import torch

from kvgen.families.dequant_gather import op as ops
from kvgen.runtime.loader import registry
from kvgen.tools.bench import COPY
from kvgen.tools.bench_formats import BLOCK_SIZE, Bench, _cases, _checked_times
from kvgen.tools.variants import variant_of

SHAPES = tuple(Bench(f"{fmt} {op} {n}", fmt, op, n)
               for fmt, op in (("indexer_132", "packed"), ("indexer_132", "sparse"), ("v41_288", "sparse"),
                               ("v41_288", "packed"))
               for n in (65536, 262144))
BLOCKS_A_WARP = (1, 2, 4, 8)


def _rows(b: Bench):
    return [e for e in registry().entries
            if e.family == "dqgk" and e.arch == "sm_90a" and e.config["format"] == b.format
            and e.config["indexing"] == b.op and e.config.get("output", "bf16") == "bf16"
            and e.config["block_size"] == BLOCK_SIZE and e.config["schedule"] in ("direct", "strided")
            and not e.config.get("gather_lens")]


def _launcher(b: Bench, entry, args, grid, pdl=None):
    pdl = entry.pdl if pdl is None else pdl
    if b.op == "packed":
        return lambda: ops.launch_packed(entry, *args, grid=grid, pdl=pdl)
    out, cache, slots = args
    return lambda: ops.launch_entry_sparse(entry, out, cache, slots, grid=grid, pdl=pdl)


def _sparse_args(case):
    """A sparse case's (out, cache, slots), read off its torch path's closure."""
    cells = [c.cell_contents for c in case.torch_path.__closure__]
    out = case.outs[0]
    cache = next(t for t in cells if isinstance(t, torch.Tensor) and t.dtype == torch.uint8)
    slots = next(t for t in cells if isinstance(t, torch.Tensor) and t.dtype == torch.int32)
    return out, cache, slots


def probe(b: Bench, l2_bytes: int) -> dict:
    cases, expected = _cases(b, l2_bytes)
    args = [c.args if b.op == "packed" else _sparse_args(c) for c in cases]
    variants = {}
    for e in _rows(b):
        name = variant_of(e.config)
        if e.pdl:  # the row launched without PDL too (its griddepcontrol instructions then do nothing)
            variants[f"{name} nopdl"] = [_launcher(b, e, a, None, pdl=False) for a in args]
        if e.config["schedule"] != "direct":
            variants[name] = [_launcher(b, e, a, None) for a in args]
            continue
        cta_rows = e.config["num_warps"] * ops.direct_block_rows(e.format, e.config["num_stages"])  # at K = 1
        for k in BLOCKS_A_WARP:
            grid = (1, max(1, -(-b.tokens // (cta_rows * k))), 1)
            variants[f"{name} k{k}"] = [_launcher(b, e, a, grid) for a in args]
    seconds = _checked_times(b, cases, expected, variants)
    us = {n: t * 1e6 for n, t in seconds.items()}
    best = min((n for n in us if n != COPY), key=us.get)
    print(f"{b.label}: copy {us[COPY]:.2f} best {best} {us[best]:.2f} ({us[COPY] / us[best]:.3f} of copy); "
          + " ".join(f"[{n} {v:.2f}]" for n, v in sorted(us.items(), key=lambda kv: kv[1])), flush=True)
    return {"shape": b.label, "us": us}


if __name__ == "__main__":
    out_path, wanted = sys.argv[1], sys.argv[2:]
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    report = {"device": torch.cuda.get_device_name(0),
              "rows": [probe(b, l2) for b in SHAPES if not wanted or any(w in b.label for w in wanted)]}
    with open(out_path, "w") as f:
        json.dump(report, f, indent=1)
