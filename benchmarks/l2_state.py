"""Probe (H100): does a variant's time in graph_times depend on what ran before
it? Timed one replay at a time, on an idle GPU, a replay pays the write-back
of whatever the replay before it left dirty in L2; in every round the copy is
timed last, so kvgen, first, follows it.

    python benchmarks/l2_state.py [formats|issue17|all]   # issue17: dense and sparse shapes

Each listed shape (bench_formats' and `kvgen bench`'s own cases: kvgen, Triton,
the copy) is timed three ways in one process:
  one replay: a sample is one replay (graph_times with group_s=0, as before log 43);
  clean:      the same, after a read of 3x L2 of scratch before each sample (every
              dirty line written back, no variant's data left in L2; the read also
              keeps the GPU busy while the graph is queued, so no launch gap);
  groups:     a sample is back-to-back replays of one graph for >= 2 ms after
              an untimed replay of it (graph_times' default since log 43): each
              variant pays for its own dirty lines.
"""

from __future__ import annotations

import functools
import sys

import torch

from kvgen.tools import bench, bench_formats
from kvgen.tools.bench import COPY

_original_graph_times = bench.graph_times
_original_event_times = bench._event_times
_scratch: list[torch.Tensor] = []


def _read_scratch() -> None:
    """A read of 3x L2 of scratch: every dirty line written back, no variant's data left in L2."""
    if not _scratch:
        l2 = torch.cuda.get_device_properties(0).L2_cache_size
        _scratch.append(torch.ones(3 * l2 // 4, dtype=torch.float32, device="cuda"))
        torch.cuda.synchronize()
    _scratch[0].amax()


def _clean_event_times(fn, reps, warmup=3, before=None):
    return _original_event_times(fn, reps, warmup, before=_read_scratch)


def set_mode(mode: str) -> None:
    bench._event_times = _clean_event_times if mode == "clean" else _original_event_times
    times = _original_graph_times if mode == "groups" else functools.partial(_original_graph_times, group_s=0)
    bench.graph_times = times
    bench_formats.graph_times = times


FORMAT_SHAPES = ("v41_288 write 65536", "v41_288 write 262144", "indexer_132 sparse 65536",
                 "indexer_132 sparse 262144", "v41_288 dense 65536", "indexer_132 write 65536")
ISSUE17_SHAPES = ("1x65536", "1x262144", "8x16384", "1x8192", "32x8192 last128", "sparse 65536 3% dsv4",
                  "sparse 65536 25% dsv4", "sparse 65536 100% dsv4")


def main(what: str) -> None:
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    results: dict[str, dict[str, tuple[float, float]]] = {}
    for mode in ("one replay", "clean", "groups"):
        set_mode(mode)
        if what in ("formats", "all"):
            for b in bench_formats.SHAPES:
                if b.label in FORMAT_SHAPES:
                    us = bench_formats.bench_one(b, l2)["us"]
                    results.setdefault(b.label, {})[mode] = (us["kvgen"], us[COPY])
                    print(f"{mode:10s} {b.label:28s} kvgen {us['kvgen']:7.2f} copy {us[COPY]:7.2f}"
                          f" ratio {us[COPY] / us['kvgen']:.3f}", flush=True)
        if what in ("issue17", "all"):
            copy_bw = bench.copy_bandwidth()
            for s in bench.SHAPES + bench.FAMILIES["sparse"]:
                if s.label in ISSUE17_SHAPES:
                    r = bench.bench_shape(s, copy_bw, l2)["backends"]
                    results.setdefault(s.label, {})[mode] = (r["kvgen"]["us"], r[COPY]["us"])
                    print(f"{mode:10s} {s.label:28s} kvgen {r['kvgen']['us']:7.2f} copy {r[COPY]['us']:7.2f}"
                          f" ratio {r[COPY]['us'] / r['kvgen']['us']:.3f}", flush=True)
    print("\nkvgen / copy by mode:")
    for label, modes in results.items():
        print(f"{label:28s}", "  ".join(f"{m}: {c / k:.3f} ({k:.2f}/{c:.2f})" for m, (k, c) in modes.items()))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "all")
