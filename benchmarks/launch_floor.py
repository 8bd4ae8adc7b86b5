"""The fixed cost of a launch: each small shape timed as usual, then with the
same grid gathering nothing (gather_lens = 0). GPU; run from the repo root:
`python benchmarks/launch_floor.py`. Results: BENCHMARKS.md, "What is still open"."""

import kvgen
import torch
from kvgen import bench, ops
from kvgen.bench import Shape, gpu_case, graph_time
from kvgen.dispatch import launch_grid

bench.copy_bandwidth()  # ramps the clocks
for label, seq_lens, window in [("1x8192", (8192,), 8192), ("32x8192 last128", (8192,) * 32, 128)]:
    sets = [gpu_case(Shape(label, seq_lens, window=window), seed) for seed in range(16)]
    real = graph_time([lambda a=a: kvgen.dequantize_and_gather_k_cache(*a) for a in sets])
    empty = [[*a[:3], torch.zeros_like(a[2]), *a[4:]] for a in sets]
    floor = graph_time([lambda a=a: kvgen.dequantize_and_gather_k_cache(*a) for a in empty])
    grid = launch_grid(ops.decide(*sets[0]).entry, len(seq_lens), window)
    print(f"{label}: {real * 1e6:.2f} us; same grid {grid} gathering nothing: {floor * 1e6:.2f} us")
