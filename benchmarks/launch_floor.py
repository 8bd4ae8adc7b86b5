"""The fixed cost of a launch, with and without programmatic dependent launch.
GPU; run from the repo root: `python benchmarks/launch_floor.py`. Per shape:
the call as benchmarked; the same grid gathering nothing (gather_lens = 0);
one CTA gathering nothing (the bare kernel boundary); and a device-to-device
copy of the same bytes (half read, half written), rotated the same way.
Results: BENCHMARKS.md, "Launch floor"."""

import os

import torch

import kvgen
from kvgen.runtime import backend
from kvgen.families.dequant_gather import op as ops
from kvgen.tools import bench
from kvgen.tools.bench import Shape, gpu_case, graph_time

bench.copy_bandwidth()  # ramps the clocks
for label, seq_lens, window in [("1x8192", (8192,), None), ("32x8192 last128", (8192,) * 32, 128)]:
    shape = Shape(label, seq_lens, window=window)
    sets = [gpu_case(shape, seed) for seed in range(16)]
    empty = [[*a[:3], torch.zeros_like(a[2]), *a[4:]] for a in sets]
    entry = ops.decide_dense(*empty[0]).entry  # reads gather_lens
    grid = ops.grid_for(entry, len(seq_lens), window or max(seq_lens))
    line = [f"{label} (grid {grid}):"]
    for pdl in (True, False):
        os.environ["KVGEN_PDL"] = "1" if pdl else "0"
        backend.clear_dispatch_cache()
        real = graph_time([lambda a=a: kvgen.dequantize_and_gather_k_cache(*a) for a in sets])
        floor = graph_time([lambda a=a: kvgen.dequantize_and_gather_k_cache(*a) for a in empty])
        one_cta = graph_time([lambda a=a, e=entry, p=pdl and entry.pdl: ops.launch_entry(
            e, a[0], a[1], a[2], a[3], a[4], a[6], grid=(1, 1, 1), pdl=p) for a in empty])
        line.append(f"PDL {'on ' if pdl else 'off'}: call {real * 1e6:.2f} us, same grid gathering nothing "
                    f"{floor * 1e6:.2f} us, one CTA gathering nothing {one_cta * 1e6:.2f} us;")
    os.environ.pop("KVGEN_PDL")
    working_set = shape.tokens * (584 + bench.WRITE_BYTES)
    copy = graph_time(bench.same_bytes_copy(working_set, len(sets)))
    line.append(f"copy of the same bytes {copy * 1e6:.2f} us ({working_set / copy / 1e9:.0f} GB/s)")
    print("\n  ".join(line), flush=True)
