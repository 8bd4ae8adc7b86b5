"""A gather on each of two GPUs, from one process whose current device is 0
(issue 18): the kernel's time (CUDA-graph replays, medians, inputs rotated
past L2, as kvgen.tools.bench times them) and the eager per-call time (host
included) on device 0 and on device 1. A hidden context switch or
synchronisation on the device that is not current would show as a gap
between the two.

    PYTHONPATH=$PWD python benchmarks/multi_gpu_speed.py [OUT.json]

Every output is checked bit-exact against the torch path first.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch

import kvgen
from kvgen.families.dequant_gather.reference import dequantize_and_gather_torch
from kvgen.testing import mismatches
from kvgen.tools.bench import Shape, gpu_case, graph_times

SHAPES = (Shape("1x65536", (65536,)), Shape("64x2048", (2048,) * 64), Shape("1x8192", (8192,)))
SETS = 4  # input sets a graph rotates through (1x65536: 4 x 105 MB, past the 50 MB L2)
EAGER_CALLS = 200


def eager_us(args, device: int) -> float:
    """Per-call time of back-to-back eager calls, from current device 0."""
    kvgen.dequantize_and_gather_k_cache(*args)
    torch.cuda.synchronize(device)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(EAGER_CALLS):
            kvgen.dequantize_and_gather_k_cache(*args)
        torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) / EAGER_CALLS * 1e6)
    return statistics.median(times)


def main(argv: list[str]) -> int:
    if torch.cuda.device_count() < 2:
        print("needs two CUDA devices")
        return 2
    torch.cuda.set_device(0)
    rows = []
    for shape in SHAPES:
        row = {"shape": shape.label}
        for device in (0, 1):
            cases = [gpu_case(shape, seed, device=f"cuda:{device}") for seed in range(SETS)]
            for args in cases:
                expected = args[0].cpu().clone()
                dequantize_and_gather_torch(expected, *[a.cpu() if torch.is_tensor(a) else a for a in args[1:]])
                kvgen.dequantize_and_gather_k_cache(*args)
                torch.cuda.synchronize(device)
                bad = mismatches(args[0].cpu(), expected)
                assert bad == 0, (shape.label, device, bad)
            with torch.cuda.device(device):  # graphs are captured and replayed on their own device
                seconds = graph_times({"kvgen": [lambda a=a: kvgen.dequantize_and_gather_k_cache(*a) for a in cases]})
            row[f"graph_us_{device}"] = seconds["kvgen"] * 1e6
            row[f"eager_us_{device}"] = eager_us(cases[0], device)  # current device: 0
        row["graph_1_over_0"] = row["graph_us_1"] / row["graph_us_0"]
        row["eager_1_over_0"] = row["eager_us_1"] / row["eager_us_0"]
        rows.append(row)
        print(f"{shape.label:<10} graph {row['graph_us_0']:8.2f} / {row['graph_us_1']:8.2f} us "
              f"({row['graph_1_over_0']:.3f})   eager {row['eager_us_0']:6.1f} / {row['eager_us_1']:6.1f} us "
              f"({row['eager_1_over_0']:.3f})   [device 0 / device 1, current device 0]", flush=True)
    report = {"devices": [torch.cuda.get_device_name(d) for d in (0, 1)], "torch": torch.__version__, "rows": rows}
    if argv:
        with open(argv[0], "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
