"""Probe (H100): how much of a graph replay's event time is the graph's launch,
not its kernels.

    python benchmarks/launch_gap.py FORMAT N

Before log 43, graph_times timed each replay alone: its start event on an
idle GPU, then the replay, so the host's cudaGraphLaunch ran while the event's
clock already counted (since log 43 it times groups of replays). Here
each variant of the NVFP4-style writer case (the public op, its row launched
directly, a copy of the same bytes) is timed both ways: as graph_times does,
and with the GPU held busy by a spin kernel while the start event and the graph
are queued behind it, so the events time the graph's kernels alone. It also
lists each graph's nodes by type.
"""

from __future__ import annotations

import statistics
import sys

import torch

import kvgen
from kvgen.families.quantize_insert import op as insert
from kvgen.testing import as_format
from kvgen.tools.bench import _capture, same_bytes_copy
from kvgen.tools.bench_formats import BLOCK_SIZE

sys.path.insert(0, "benchmarks")
from writer_tail import checked_sets  # noqa: E402


def node_types(graph: torch.cuda.CUDAGraph) -> list[str]:
    from cuda.bindings import runtime as rt

    raw = graph.raw_cuda_graph()
    err, _, count = rt.cudaGraphGetNodes(raw, 0)
    err, nodes, count = rt.cudaGraphGetNodes(raw, count)
    return [str(rt.cudaGraphNodeGetType(n)[1]).split(".")[-1] for n in nodes]


def times(graph, busy: bool, rounds: int = 50) -> float:
    samples = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if busy:
            torch.cuda._sleep(200_000)  # ~100 us of spinning: the start event and the graph queue behind it
        start.record()
        graph.replay()
        stop.record()
        stop.synchronize()
        samples.append(start.elapsed_time(stop) * 1e3)
    return statistics.median(samples)


def main(fmt_name: str, n: int) -> None:
    fmt = as_format(fmt_name)
    sets, moved, check = checked_sets(fmt, n)
    k, cache, slots = sets[0]
    entry = insert.decide_insert(k, cache, slots, BLOCK_SIZE).entry
    print("row:", entry.name, "grid", insert.launch_grid(entry, n), "sets", len(sets))
    variants = {
        "op": [lambda s=s: kvgen.quantize_and_insert_k_cache(s[0], s[1], s[2], BLOCK_SIZE) for s in sets],
        "row pdl": [lambda s=s: insert.launch_entry(entry, *s, pdl=True) for s in sets],
        "row": [lambda s=s: insert.launch_entry(entry, *s, pdl=False) for s in sets],
        "copy": same_bytes_copy(moved, len(sets)),
    }
    for name, calls in variants.items():
        if name != "copy":
            check(name, calls[0])
    graphs = {name: _capture(calls, keep_graph=True) for name, calls in variants.items()}
    for name, g in graphs.items():
        print(f"{name:8s} nodes {node_types(g)}")
    for _ in range(3):
        for name, g in graphs.items():
            idle, busy = times(g, False), times(g, True)
            print(f"{name:8s} idle start {idle / len(sets):7.2f} us a call, busy start {busy / len(sets):7.2f}"
                  f" (gap {(idle - busy):5.2f} us a replay)", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
