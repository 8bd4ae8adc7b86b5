"""`python -m kvgen bench`: every backend on the issue's shapes, on one GPU.

Method (docs: BENCHMARKS.md): caches written by the UE8M0 quantizer from
random data, pages randomly permuted; every result checked bit-exact against
the torch path before it is timed; kernels timed as CUDA-graph replays of one
call per input set, the sets rotated so that the working set exceeds L2
(cold cache), median of >= 20 replays; the copy roofline is a large
device-to-device copy (bytes read + written).
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Callable

import torch

from .config import LAYOUTS, SEED
from .dispatch import CallKey, candidate_rows, choose_row, launch_grid
from .testing import POISON_BF16, POISON_PAGE, make_cache, mismatches, poisoned_out, random_slots

WRITE_BYTES = 1024  # per token: 512 bf16; each token also reads one record (layout.record_bytes)
SEED_GRID_Y = 1024  # the seed's launch: grid (num_reqs, 1024)
NO_PDL = "kvgen_no_pdl"  # the public op with KVGEN_PDL=0
GRID_TARGETS = (2048, 4096, 16384, 32768, 65536)  # --sweep: whole-grid CTA counts to try


@dataclass(frozen=True)
class Shape:
    label: str
    seq_lens: tuple[int, ...]
    window: int | None = None  # gather the last `window` tokens (gather_lens), else whole sequences
    block_size: int = 64
    layout: str = "dsv4_584"

    @property
    def tokens(self) -> int:
        return sum(min(self.window, s) if self.window else s for s in self.seq_lens)


@dataclass(frozen=True)
class SparseShape:
    label: str
    num_slots: int
    valid: float  # fraction of slots that are not -1
    layout: str = "dsv4_584"
    block_size: int = 64


SHAPES = (
    Shape("1x8192", (8192,)),
    Shape("1x65536", (65536,)),
    Shape("1x262144", (262144,)),
    Shape("8x16384", (16384,) * 8),
    Shape("64x2048", (2048,) * 64),
    Shape("256x256", (256,) * 256),
    Shape("32x8192 last128", (8192,) * 32, window=128),
    Shape("4x32768 b256", (32768,) * 4, block_size=256),
    Shape("[131072,100,2000,7]", (131072, 100, 2000, 7)),
    Shape("128x4096 last1024 b256", (4096,) * 128, window=1024, block_size=256),
)
FAMILIES = {
    "dsv4": SHAPES,
    "v41": tuple(Shape(s.label + " v41", s.seq_lens, s.window, s.block_size, "v41_528") for s in SHAPES),
    "sparse": tuple(SparseShape(f"sparse {n} {int(v * 100)}% {layout.split('_')[0]}", n, v, layout)
                    for layout in ("dsv4_584", "v41_528") for n in (8192, 65536) for v in (0.03, 0.25, 1.0)),
}


def gpu_case(shape: Shape, seed: int, device="cuda"):
    """One call's arguments, built on the GPU."""
    layout = LAYOUTS[shape.layout]
    bs = shape.block_size
    pages = [-(-s // bs) for s in shape.seq_lens]
    num_blocks = sum(pages)
    g = torch.Generator(device=device).manual_seed(seed)
    k_cache = make_cache(num_blocks, bs, layout, g)
    width = max(pages) + 1
    block_table = torch.full((len(pages), width), POISON_PAGE, dtype=torch.int32, device=device)
    perm = torch.randperm(num_blocks, generator=g, device=device).to(torch.int32)
    used = 0
    for r, p in enumerate(pages):
        block_table[r, :p] = perm[used: used + p]
        used += p
    seq_lens = torch.tensor(shape.seq_lens, dtype=torch.int32, device=device)
    gather_lens = None
    if shape.window:
        gather_lens = torch.clamp(seq_lens, max=shape.window)
    rows = shape.window or max(shape.seq_lens)
    out = poisoned_out(len(pages), rows, device=device)
    return [out, k_cache, seq_lens, gather_lens, block_table, bs, 0]


def gpu_sparse_case(shape: SparseShape, seed: int, device="cuda"):
    layout = LAYOUTS[shape.layout]
    bs = shape.block_size
    num_blocks = -(-shape.num_slots // bs) + 1
    g = torch.Generator(device=device).manual_seed(seed)
    k_cache = make_cache(num_blocks, bs, layout, g)
    slots = random_slots(shape.num_slots, num_blocks * bs, shape.valid, g)
    out = poisoned_out(1, shape.num_slots, device=device)[0]
    return [out, k_cache, slots, bs]


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Bytes read + written per second of a large device-to-device copy."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    times = _event_times(lambda: dst.copy_(src), reps=20)
    return 2 * nbytes / statistics.median(times)


def _event_times(fn: Callable[[], None], reps: int, warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / 1e3)
    return times


def graph_time(calls: list[Callable[[], None]], reps: int = 30) -> float:
    """Median seconds per call: one graph holding one call per input set."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:  # load modules, compile Triton, outside the capture
            call()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    # Warm up for >= 50 ms: seen here, a variant timed right after a cold
    # stretch read 13% slower than the same kernel timed later.
    start = time.perf_counter()
    while time.perf_counter() - start < 0.05:
        graph.replay()
        torch.cuda.synchronize()
    return statistics.median(_event_times(graph.replay, reps)) / len(calls)


def _runner(backend: str, args, entry=None, grid=None, pdl: bool = False, pdl_env: str = "1") -> Callable[[], None]:
    """A call of the public op with KVGEN_BACKEND=backend (and KVGEN_PDL=pdl_env),
    or with backend "entry", a direct launch of one manifest kernel (grid from
    dispatch unless given)."""
    import kvgen
    from . import ops

    sparse = len(args) == 4
    if backend == "entry":
        if sparse:
            return lambda: ops.launch_entry_sparse(entry, args[0], args[1], args[2], grid=grid, pdl=pdl)
        return lambda: ops.launch_entry(entry, args[0], args[1], args[2], args[3], args[4], args[6],
                                        grid=grid, pdl=pdl)
    op = kvgen.dequantize_and_gather_k_cache_sparse if sparse else kvgen.dequantize_and_gather_k_cache

    def call():
        os.environ["KVGEN_BACKEND"], os.environ["KVGEN_PDL"] = backend, pdl_env
        try:
            op(*args)
        finally:
            os.environ.pop("KVGEN_BACKEND", None)
            os.environ.pop("KVGEN_PDL", None)
    return call


def _time_variants(label: str, cases: list, expected: list, variants: dict, working_set: int,
                   roofline_s: float, reference: Callable) -> dict:
    """Check each variant bit-exact on every input set (poisoned first), then time it."""
    results = {}
    for name, make in variants.items():
        calls = [make(a) for a in cases]
        for args, call, ref in zip(cases, calls, expected):
            args[0].view(torch.int16).fill_(POISON_BF16)
            call()
            torch.cuda.synchronize()
            bad = mismatches(args[0], ref)
            if bad:
                raise AssertionError(f"{label} {name}: {bad} values differ from the torch path")
        seconds = graph_time(calls)
        results[name] = {"us": seconds * 1e6, "gbps": working_set / seconds / 1e9, "fraction": roofline_s / seconds}
    # The torch path: eager (it synchronises), a few runs.
    t = statistics.median(_event_times(lambda: reference(*cases[0]), reps=3, warmup=1))
    results["torch"] = {"us": t * 1e6, "gbps": working_set / t / 1e9, "fraction": roofline_s / t}
    return results


def _eager_us(args) -> float:
    """Eager per-call latency of the public API (host overhead included)."""
    call = _runner("cubin", args)
    n = 200
    return statistics.median(_event_times(lambda: [call() for _ in range(n)], reps=5)) / n * 1e6


def _set_count(working_set: int, l2_bytes: int) -> int:
    """Input sets to rotate through so that one graph replay touches >= 4x L2."""
    return max(1, min(16, math.ceil(4 * l2_bytes / working_set)))


def _expected(cases: list, reference: Callable) -> list[torch.Tensor]:
    """The torch path's output for each input set (each set's `out` comes first)."""
    expected = []
    for args in cases:
        ref = args[0].clone()
        reference(ref, *args[1:])
        expected.append(ref)
    return expected


def bench_shape(shape: Shape, copy_bw: float, l2_bytes: int, sweep: bool,
                grid_targets: tuple[int, ...] = GRID_TARGETS) -> dict:
    from . import ops
    from .loader import registry
    from .reference import dequantize_and_gather_torch

    working_set = shape.tokens * (LAYOUTS[shape.layout].record_bytes + WRITE_BYTES)
    sets = _set_count(working_set, l2_bytes)
    cases = [gpu_case(shape, seed) for seed in range(sets)]
    expected = _expected(cases, dequantize_and_gather_torch)

    key = CallKey(shape.layout, shape.block_size, "dense", shape.window is not None,
                  torch.cuda.get_device_capability())
    rows = candidate_rows(registry().entries, key)
    seed_fields = ("num_stages", "num_warps", "schedule", "pdl")
    seed_entry = choose_row([e for e in rows if all(e.config[f] == getattr(SEED, f) for f in seed_fields)])
    chosen = ops.decide(*cases[0]).entry
    variants: dict[str, Callable[[list], Callable[[], None]]] = {
        "kvgen": lambda a: _runner("cubin", a),
        NO_PDL: lambda a: _runner("cubin", a, pdl_env="0"),
        "seed": lambda a: _runner("entry", a, seed_entry, (len(shape.seq_lens), SEED_GRID_Y, 1)),
        "triton": lambda a: _runner("triton", a),
    }
    if sweep:
        for e in rows:
            c = e.config
            variants[f"s{c['num_stages']}w{c['num_warps']}{c['schedule'][0]}p{int(c['pdl'])}"] = (
                lambda a, e=e: _runner("entry", a, e, pdl=e.pdl))
        rows_bound = shape.window or max(shape.seq_lens)
        for target in grid_targets:
            grid = launch_grid(chosen, len(shape.seq_lens), rows_bound, target)
            variants[f"ctas{target}"] = lambda a, g=grid: _runner("entry", a, chosen, g, pdl=chosen.pdl)

    roofline_s = working_set / copy_bw
    backends = _time_variants(shape.label, cases, expected, variants, working_set, roofline_s,
                              dequantize_and_gather_torch)
    for b in backends.values():
        b["speedup_vs_seed"] = backends["seed"]["us"] / b["us"]
    return {"shape": shape.label, "tokens": shape.tokens, "sets": sets, "roofline_us": roofline_s * 1e6,
            "chosen": chosen.name, "backends": backends, "eager_us": _eager_us(cases[0])}


def bench_sparse_shape(shape: SparseShape, copy_bw: float, l2_bytes: int) -> dict:
    from . import ops
    from .reference import dequantize_and_gather_sparse_torch

    probe = gpu_sparse_case(shape, 0)
    tokens = int((probe[2] >= 0).sum())
    working_set = max(1, tokens) * (LAYOUTS[shape.layout].record_bytes + WRITE_BYTES)
    sets = _set_count(working_set, l2_bytes)
    cases = [probe] + [gpu_sparse_case(shape, seed) for seed in range(1, sets)]
    expected = _expected(cases, dequantize_and_gather_sparse_torch)
    chosen = ops.decide_sparse(*cases[0]).entry
    variants = {"kvgen": lambda a: _runner("cubin", a), NO_PDL: lambda a: _runner("cubin", a, pdl_env="0"),
                "triton": lambda a: _runner("triton", a)}
    roofline_s = working_set / copy_bw
    backends = _time_variants(shape.label, cases, expected, variants, working_set, roofline_s,
                              dequantize_and_gather_sparse_torch)
    return {"shape": shape.label, "tokens": tokens, "sets": sets, "roofline_us": roofline_s * 1e6,
            "chosen": chosen.name, "backends": backends, "eager_us": _eager_us(cases[0])}


def host_overhead_us(calls: int = 2000) -> dict:
    """Host time per eager API call on a tiny gather (kernel time hidden)."""
    import kvgen

    args = gpu_case(Shape("tiny", (16,), block_size=16), seed=0)
    for _ in range(20):
        kvgen.dequantize_and_gather_k_cache(*args)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        kvgen.dequantize_and_gather_k_cache(*args)
    api = (time.perf_counter() - t0) / calls
    torch.cuda.synchronize()
    from . import ops

    entry = ops.decide(*args).entry
    t0 = time.perf_counter()
    for _ in range(calls):
        ops.launch_entry(entry, args[0], args[1], args[2], args[3], args[4], args[6])
    launch = (time.perf_counter() - t0) / calls
    torch.cuda.synchronize()
    return {"api_us": api * 1e6, "launch_only_us": launch * 1e6}


def run(out_dir: Path, shapes=SHAPES, sweep: bool = False, family: str = "dsv4",
        grid_targets: tuple[int, ...] = GRID_TARGETS) -> dict:
    import triton

    props = torch.cuda.get_device_properties(0)
    copy_bandwidth()  # ramps the clocks up before anything is measured
    copy_bw = copy_bandwidth()
    report = {
        "device": props.name, "date": date.today().isoformat(), "sms": props.multi_processor_count,
        "l2_bytes": props.L2_cache_size, "copy_gbps": copy_bw / 1e9,
        "versions": {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
                     "driver": torch.cuda.driver_version if hasattr(torch.cuda, "driver_version") else None},
        "host": host_overhead_us(), "shapes": [],
    }
    print(f"{props.name}: copy roofline {copy_bw / 1e9:.0f} GB/s (read + write); "
          f"host per API call {report['host']['api_us']:.1f} us", flush=True)
    for shape in shapes:
        if isinstance(shape, SparseShape):
            result = bench_sparse_shape(shape, copy_bw, props.L2_cache_size)
        else:
            result = bench_shape(shape, copy_bw, props.L2_cache_size, sweep, tuple(grid_targets))
        report["shapes"].append(result)
        cols = "  ".join(f"{k} {v['us']:8.2f}us {v['fraction']:.2f}" for k, v in result["backends"].items())
        print(f"{shape.label:<24} {cols}  eager {result['eager_us']:.1f}us", flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{props.name.replace(' ', '_')}_{family}.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {path}")
    return report


def markdown(report: dict) -> str:
    lines = [f"Device: {report['device']} ({report['sms']} SMs), {report['date']}; copy roofline "
             f"{report['copy_gbps']:.0f} GB/s (read + write); versions {report['versions']}. "
             f"Host time per eager API call: {report['host']['api_us']:.1f} us "
             f"(launch alone {report['host']['launch_only_us']:.1f} us).", "",
             ("| shape | tokens | roofline µs | kvgen µs | GB/s | fraction | × seed | seed µs | seed fraction "
              "| no-PDL µs | no-PDL fraction | triton µs | triton GB/s | torch µs | eager µs |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    speedups = []
    for s in report["shapes"]:
        b = s["backends"]
        seed = b.get("seed")
        if seed:
            speedups.append(b["kvgen"]["speedup_vs_seed"])
        lines.append(
            f"| {s['shape']} | {s['tokens']} | {s['roofline_us']:.2f} | {b['kvgen']['us']:.2f} | {b['kvgen']['gbps']:.0f} | "
            f"{b['kvgen']['fraction']:.2f} | "
            + (f"{b['kvgen']['speedup_vs_seed']:.2f} | {seed['us']:.2f} | {seed['fraction']:.2f} | " if seed else "– | – | – | ")
            + (f"{b[NO_PDL]['us']:.2f} | {b[NO_PDL]['fraction']:.2f} | " if NO_PDL in b else "– | – | ")
            + f"{b['triton']['us']:.2f} | {b['triton']['gbps']:.0f} | {b['torch']['us']:.0f} | {s['eager_us']:.1f} |")
    if speedups:
        geo = math.exp(sum(map(math.log, speedups)) / len(speedups))
        lines += ["", f"Geomean speedup of kvgen over the seed config: {geo:.2f}×"]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = [s["shape"] for s in report["shapes"]]
    backends = [b for b in ("kvgen", "seed", "triton", "torch") if b in report["shapes"][0]["backends"]]
    fig, ax = plt.subplots(figsize=(12, 5))
    width = 0.2
    for i, name in enumerate(backends):
        ax.bar([x + (i - 1.5) * width for x in range(len(shapes))],
               [s["backends"][name]["gbps"] for s in report["shapes"]], width, label=name)
    ax.axhline(report["copy_gbps"], color="k", linestyle="--", label="copy roofline")
    ax.set_xticks(range(len(shapes)), shapes, rotation=30, ha="right")
    ax.set_ylabel("GB/s (bytes read + written)")
    ax.set_title(f"dequantize_and_gather_k_cache on {report['device']} ({report['date']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
