"""`python -m kvgen bench`: every backend on the issue's shapes, on one GPU.

Method (docs: BENCHMARKS.md): caches written by the UE8M0 quantizer from
random data, pages randomly permuted; every result checked bit-exact against
the torch path before it is timed; kernels timed as CUDA-graph replays of one
call per input set, the sets rotated so that the working set exceeds L2
(cold cache, up to 16 sets), each sample a >= 2 ms group of back-to-back
replays after an untimed one (graph_times), median of 30 rounds; the copy
roofline is a large device-to-device copy (bytes read + written).
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

from ..runtime.dispatch import CallKey, candidate_rows, choose_row, shape_class, split_by_image
from ..testing import POISON_BF16, as_format, make_cache, mismatches, poisoned_out, random_block_table, random_slots
from .variants import geomean, variant_of

# The seed design, as one row of the shipped tree (the seed has no PDL).
SEED_NAME = "dqgk_dsv4_584_f448_b64_s4_w4_dense_g1_strided_p0_sm_90a"

# A DSv4 or V4.1 token's bf16 row (512 values), as the older probes count it;
# token_bytes counts a token's bytes for any format.
WRITE_BYTES = 1024
SEED_GRID_Y = 1024  # the seed's launch: grid (num_reqs, 1024)
NO_PDL = "kvgen_no_pdl"  # the public op with KVGEN_PDL=0
COPY = "copy"  # a device-to-device copy of the same bytes (same_bytes_copy)
GRID_TARGETS = (2048, 4096, 16384, 32768, 65536)  # --sweep: whole-grid CTA counts to try


@dataclass(frozen=True)
class Shape:
    label: str
    seq_lens: tuple[int, ...]
    window: int | None = None  # gather the last `window` tokens (gather_lens), else whole sequences
    block_size: int = 64
    format: str = "dsv4_584"

    @property
    def tokens(self) -> int:
        return sum(min(self.window, s) if self.window else s for s in self.seq_lens)


@dataclass(frozen=True)
class SparseShape:
    label: str
    num_slots: int
    valid: float  # fraction of slots that are not -1
    format: str = "dsv4_584"
    block_size: int = 64


@dataclass(frozen=True)
class WriterShape:
    """T tokens of k written into a cache of exactly T slots, pages in random
    order (each page's rows in order, as a long prefill writes them)."""

    label: str
    tokens: int
    format: str = "dsv4_584"
    block_size: int = 64
    slot_dtype: torch.dtype = torch.int64


WRITER_SHAPES = tuple(WriterShape(f"insert {n} {fmt.split('_')[0]}", n, fmt)
                      for fmt in ("dsv4_584", "v41_528") for n in (8192, 65536, 262144)) + tuple(
    WriterShape(f"insert {n} {fmt}", n, fmt) for fmt in ("v41_288", "v32_656", "indexer_132") for n in (65536, 262144))


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
    "writer": WRITER_SHAPES,
}


def gpu_case(shape: Shape, seed: int, device="cuda"):
    """One call's arguments, built on the GPU."""
    layout = as_format(shape.format)
    bs = shape.block_size
    pages = [-(-s // bs) for s in shape.seq_lens]
    num_blocks = sum(pages)
    g = torch.Generator(device=device).manual_seed(seed)
    k_cache = make_cache(num_blocks, bs, layout, g)
    block_table = random_block_table(pages, num_blocks, g)
    seq_lens = torch.tensor(shape.seq_lens, dtype=torch.int32, device=device)
    gather_lens = None
    if shape.window:
        gather_lens = torch.clamp(seq_lens, max=shape.window)
    rows = shape.window or max(shape.seq_lens)
    out = poisoned_out(len(pages), rows, device=device, head_dim=layout.head_dim)
    return [out, k_cache, seq_lens, gather_lens, block_table, bs, 0]


def in_physical_order(case: list, shape: Shape) -> list:
    """A gpu_case's arguments with every request's pages in physical order, back to back
    (block table = arange; requests of one length): the same call without the random page order."""
    case = list(case)
    table = case[4].clone()
    pages = -(-max(shape.seq_lens) // shape.block_size)
    table[:, :pages] = torch.arange(table.shape[0] * pages, dtype=table.dtype, device=table.device).view(-1, pages)
    case[4] = table
    return case


def gpu_sparse_case(shape: SparseShape, seed: int, device="cuda"):
    layout = as_format(shape.format)
    bs = shape.block_size
    num_blocks = -(-shape.num_slots // bs) + 1
    g = torch.Generator(device=device).manual_seed(seed)
    k_cache = make_cache(num_blocks, bs, layout, g)
    slots = random_slots(shape.num_slots, num_blocks * bs, shape.valid, g)
    out = poisoned_out(1, shape.num_slots, device=device, head_dim=layout.head_dim)[0]
    return [out, k_cache, slots, bs]


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Bytes read + written per second of a large device-to-device copy."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    times = _event_times(lambda: dst.copy_(src), reps=20)
    return 2 * nbytes / statistics.median(times)


# A timed group of replays lasts at least this long (graph_times).
GROUP_S = 2e-3


def _event_times(fn: Callable[[], None], reps: int, warmup: int = 3,
                 before: Callable[[], None] | None = None) -> list[float]:
    """Seconds of each of `reps` calls of fn, by CUDA events; `before`, if
    given, is queued ahead of each start event (untimed)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if before is not None:
            before()
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / 1e3)
    return times


def _capture(calls: list[Callable[[], None]], keep_graph: bool = False) -> torch.cuda.CUDAGraph:
    """One CUDA graph holding `calls`, each run once eagerly first (outside the
    capture: modules load, Triton compiles); `keep_graph`: its nodes stay
    readable (raw_cuda_graph), instantiated here."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph(keep_graph=keep_graph)
    # Captured on this side stream, of the current device: torch.cuda.graph's own default stream is made
    # once, on whichever device was current then, so a later capture for another GPU would record nothing.
    with torch.cuda.graph(graph, stream=stream):
        for call in calls:
            call()
    if keep_graph:
        graph.instantiate()
    return graph


def graph_times(variants: dict[str, list[Callable[[], None]]], rounds: int = 30,
                group_s: float = GROUP_S) -> dict[str, float]:
    """Median seconds per call of each variant, a variant being one call per
    input set, captured as one CUDA graph. The graphs are replayed in turn,
    round after round, so clock and thermal drift fall on every variant alike
    (timed one after another, the same kernel read up to 3% apart in one run).
    Each timed sample is a group of back-to-back replays of one graph lasting
    at least `group_s`, after one untimed replay of the same graph: that replay
    pays the write-back of the lines the variant before it left dirty in L2 and
    keeps the GPU busy while the group is queued, so each variant is timed in
    its own steady state, paying for its own write-backs, with no launch gap.
    Timed one replay at a time on an idle GPU (group_s=0, as before log 43),
    the same writer row read 2 us (6%) slower right after the copy than after
    another kvgen row (BENCHMARKS.md, log 43)."""
    graphs = {name: (_capture(calls), len(calls)) for name, calls in variants.items()}
    # Warm up for >= 50 ms: seen here, a variant timed right after a cold
    # stretch read 13% slower than the same kernel timed later.
    start = time.perf_counter()
    while time.perf_counter() - start < 0.05:
        for graph, _ in graphs.values():
            graph.replay()
        torch.cuda.synchronize()
    if group_s:
        group = {name: max(1, math.ceil(group_s / min(_event_times(graph.replay, reps=3, warmup=0,
                                                                   before=graph.replay))))
                 for name, (graph, _) in graphs.items()}
    else:
        group = dict.fromkeys(graphs, 1)
    samples: dict[str, list[float]] = {name: [] for name in graphs}
    for _ in range(rounds):
        for name, (graph, _) in graphs.items():
            samples[name] += _event_times(lambda g=graph, r=group[name]: [g.replay() for _ in range(r)], reps=1,
                                          warmup=0, before=graph.replay if group_s else None)
    return {name: statistics.median(samples[name]) / (n * group[name]) for name, (_, n) in graphs.items()}


def graph_time(calls: list[Callable[[], None]], reps: int = 30) -> float:
    """Median seconds per call of one variant (see graph_times)."""
    return graph_times({"": calls}, rounds=reps)[""]


def token_bytes(fmt) -> int:
    """The bytes one token moves between a cache record and its bf16 row, either
    way: the record, and the row's 2 bytes a value (a gather reads the one and
    writes the other, a write the reverse)."""
    return fmt.record_bytes + 2 * fmt.head_dim


def same_bytes_copy(working_set: int, sets: int) -> list[Callable[[], None]]:
    """Device-to-device copies moving `working_set` bytes (half read, half
    written), one buffer pair per input set: what a kernel moving those bytes
    at best costs in this harness, launch and ramp included."""
    # Rounded up to whole 64 KiB (at most 2% more bytes, on the smallest shape):
    # copies of 133179 DSv4 tokens' bytes, exact or rounded to 16 or 4096, ran
    # at 0.42-0.93 of the roofline from run to run; rounded to 64 KiB or 1 MiB,
    # at 0.92-0.96 (benchmarks/access_pattern.py).
    half = -(-working_set // (1 << 17)) * (1 << 16)
    pairs = [(torch.empty(half, dtype=torch.uint8, device="cuda").random_(),
              torch.empty(half, dtype=torch.uint8, device="cuda")) for _ in range(sets)]
    return [lambda s=s, d=d: d.copy_(s) for s, d in pairs]


def _runner(backend: str, args, entry=None, grid=None, pdl: bool = False, pdl_env: str = "1") -> Callable[[], None]:
    """A call of the public op with KVGEN_BACKEND=backend (and KVGEN_PDL=pdl_env),
    or with backend "entry", a direct launch of one manifest kernel (grid from
    dispatch unless given)."""
    import kvgen
    from ..families.dequant_gather import op as ops

    sparse = len(args) == 4
    if backend == "entry":
        if sparse:
            return lambda: ops.launch_entry_sparse(entry, args[0], args[1], args[2], grid=grid, pdl=pdl)
        return lambda: ops.launch_entry(entry, args[0], args[1], args[2], args[3], args[4], args[6],
                                        grid=grid, pdl=pdl)
    op = kvgen.dequantize_and_gather_k_cache_sparse if sparse else kvgen.dequantize_and_gather_k_cache
    return with_env(lambda: op(*args), KVGEN_BACKEND=backend, KVGEN_PDL=pdl_env)


def with_env(call: Callable[[], None], **values: str) -> Callable[[], None]:
    """`call` with these environment variables set for the call only: the
    caller's environment is left as it was found (a value restored, an absent
    variable removed)."""
    def run():
        saved = {name: os.environ.get(name) for name in values}
        os.environ.update(values)
        try:
            call()
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
    return run


def _time_variants(label: str, cases: list, expected: list, variants: dict, working_set: int,
                   roofline_s: float, reference: Callable) -> dict:
    """Check each variant bit-exact on every input set (poisoned first), then
    time them all, interleaved, with a copy of the same bytes beside them."""
    timed = {}
    for name, make in variants.items():
        calls = timed[name] = [make(a) for a in cases]
        for args, call, ref in zip(cases, calls, expected):
            args[0].view(torch.int16).fill_(POISON_BF16)
            call()
            torch.cuda.synchronize()
            bad = mismatches(args[0], ref)
            if bad:
                raise AssertionError(f"{label} {name}: {bad} values differ from the torch path")
    timed[COPY] = same_bytes_copy(working_set, len(cases))
    seconds = graph_times(timed)
    del timed  # frees the copy's buffers before the torch path runs
    # The torch path: eager (it synchronises), a few runs.
    seconds["torch"] = statistics.median(_event_times(lambda: reference(*cases[0]), reps=3, warmup=1))
    return {name: {"us": t * 1e6, "gbps": working_set / t / 1e9, "fraction": roofline_s / t}
            for name, t in seconds.items()}


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


@dataclass
class Workload:
    """One shape's input sets on the GPU, their expected outputs, and its call key."""

    shape: Shape | SparseShape
    cases: list  # one argument list per input set, `out` first
    expected: list  # the torch path's output per set
    tokens: int  # tokens gathered (valid slots, for sparse)
    working_set: int  # bytes read + written by one call
    reference: Callable
    num_reqs: int  # a sparse call is one request ...
    max_rows: int  # ... of num_slots rows; a dense call's out rows bound every gather
    key: CallKey  # what dispatch sees (shape class included)

    @property
    def sparse(self) -> bool:
        return isinstance(self.shape, SparseShape)


def workload(shape: Shape | SparseShape, l2_bytes: int) -> Workload:
    from ..families.dequant_gather.reference import dequantize_and_gather_sparse_torch, dequantize_and_gather_torch

    per_token = token_bytes(as_format(shape.format))
    if isinstance(shape, SparseShape):
        probe = gpu_sparse_case(shape, 0)
        tokens = int((probe[2] >= 0).sum())
        working_set = max(1, tokens) * per_token
        cases = [probe] + [gpu_sparse_case(shape, seed) for seed in range(1, _set_count(working_set, l2_bytes))]
        reference = dequantize_and_gather_sparse_torch
        indexing, has_gather_lens, num_reqs, max_rows = "sparse", False, 1, shape.num_slots
    else:
        tokens = shape.tokens
        working_set = tokens * per_token
        cases = [gpu_case(shape, seed) for seed in range(_set_count(working_set, l2_bytes))]
        reference = dequantize_and_gather_torch
        indexing, has_gather_lens = "dense", shape.window is not None
        num_reqs, max_rows = len(shape.seq_lens), shape.window or max(shape.seq_lens)
    key = CallKey("dqgk", shape.format, shape.block_size, (("indexing", indexing), ("gather_lens", has_gather_lens)),
                  torch.cuda.get_device_capability(), shape_class(num_reqs, max_rows))
    return Workload(shape, cases, _expected(cases, reference), tokens, working_set, reference, num_reqs, max_rows,
                    key)


def entry_variants(rows, name: Callable | None = None) -> dict[str, Callable[[list], Callable[[], None]]]:
    """Each row launched directly on dispatch's grid (PDL as the row was built),
    named by `name(row)` (default: the fields that tell rows of one call key apart)."""
    return {(name or variant_name)(e): (lambda a, e=e: _runner("entry", a, e, pdl=e.pdl)) for e in rows}


def variant_name(entry) -> str:
    return f"{variant_of(entry.config)}p{int(entry.config['pdl'])}"


def bench_shape(shape: Shape | SparseShape, copy_bw: float, l2_bytes: int, sweep: bool = False,
                grid_targets: tuple[int, ...] = GRID_TARGETS) -> dict:
    """Every backend on one shape (the seed config for dense shapes; with
    `sweep`, every shipped row and grid size too), checked, then timed."""
    from ..families.dequant_gather import op as ops
    from ..runtime.loader import registry

    w = workload(shape, l2_bytes)
    chosen = (ops.decide_sparse if w.sparse else ops.decide_dense)(*w.cases[0]).entry
    variants: dict[str, Callable[[list], Callable[[], None]]] = {
        "kvgen": lambda a: _runner("cubin", a),
        NO_PDL: lambda a: _runner("cubin", a, pdl_env="0"),
        "triton": lambda a: _runner("triton", a),
    }
    rows = split_by_image(candidate_rows(registry().entries, w.key))[0]  # this GPU's cubins, not the PTX fallbacks
    if not w.sparse:
        seed_fields = ("num_stages", "num_warps", "schedule", "pdl")
        seed = next(e for e in registry().entries if e.name == SEED_NAME).config
        seed_entry = choose_row([e for e in rows if all(e.config[f] == seed[f] for f in seed_fields)])
        variants["seed"] = lambda a: _runner("entry", a, seed_entry, (len(shape.seq_lens), SEED_GRID_Y, 1))
    if sweep:
        variants.update(entry_variants(rows))
        for target in grid_targets:
            grid = ops.grid_for(chosen, w.num_reqs, w.max_rows, target)
            variants[f"ctas{target}"] = lambda a, g=grid: _runner("entry", a, chosen, g, pdl=chosen.pdl)

    roofline_s = w.working_set / copy_bw
    backends = _time_variants(shape.label, w.cases, w.expected, variants, w.working_set, roofline_s, w.reference)
    if "seed" in backends:
        for b in backends.values():
            b["speedup_vs_seed"] = backends["seed"]["us"] / b["us"]
    return {"shape": shape.label, "tokens": w.tokens, "sets": len(w.cases), "roofline_us": roofline_s * 1e6,
            "chosen": chosen.name, "shape_class": w.key.shape_class, "backends": backends,
            "eager_us": _eager_us(w.cases[0])}


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
    from ..families.dequant_gather import op as ops

    entry = ops.decide_dense(*args).entry
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
        "host": host_overhead_us(), "shapes": [], "family": family,
    }
    print(f"{props.name}: copy roofline {copy_bw / 1e9:.0f} GB/s (read + write); "
          f"host per API call {report['host']['api_us']:.1f} us", flush=True)
    for shape in shapes:
        if isinstance(shape, WriterShape):
            result = bench_writer_shape(shape, copy_bw, props.L2_cache_size, sweep)
        else:
            result = bench_shape(shape, copy_bw, props.L2_cache_size, sweep, tuple(grid_targets))
        report["shapes"].append(result)
        cols = "  ".join(f"{k} {v['us']:8.2f}us {v['fraction']:.2f}" for k, v in result["backends"].items())
        print(f"{shape.label:<24} {cols}  eager {result.get('eager_us', float('nan')):.1f}us", flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{props.name.replace(' ', '_')}_{family}.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {path}")
    return report


def _cell(b: dict, name: str, *fields: str) -> str:
    """`b[name]`'s fields as table cells ("–" where the report has no such backend)."""
    formats = {"us": "{:.2f}", "fraction": "{:.2f}", "gbps": "{:.0f}", "speedup_vs_seed": "{:.2f}"}
    return " | ".join(formats[f].format(b[name][f]) if f in b.get(name, ()) else "–" for f in fields)


def markdown(report: dict) -> str:
    if report.get("family") == "writer":
        return writer_markdown(report)
    lines = [f"Device: {report['device']} ({report['sms']} SMs), {report['date']}; copy roofline "
             f"{report['copy_gbps']:.0f} GB/s (read + write); versions {report['versions']}. "
             f"Host time per eager API call: {report['host']['api_us']:.1f} us "
             f"(launch alone {report['host']['launch_only_us']:.1f} us).", "",
             ("| shape | tokens | roofline µs | copy µs | copy fraction | kvgen µs | GB/s | fraction | × seed "
              "| seed µs | seed fraction | no-PDL µs | no-PDL fraction | triton µs | triton GB/s | torch µs | eager µs |"),
             "|---" * 17 + "|"]
    speedups, ceilings = [], []
    for s in report["shapes"]:
        b = s["backends"]
        if "seed" in b:
            speedups.append(b["kvgen"]["speedup_vs_seed"])
            if COPY in b:
                ceilings.append(b["seed"]["us"] / b[COPY]["us"])
        lines.append(
            f"| {s['shape']} | {s['tokens']} | {s['roofline_us']:.2f} | {_cell(b, COPY, 'us', 'fraction')} | "
            f"{_cell(b, 'kvgen', 'us', 'gbps', 'fraction', 'speedup_vs_seed')} | {_cell(b, 'seed', 'us', 'fraction')} | "
            f"{_cell(b, NO_PDL, 'us', 'fraction')} | {_cell(b, 'triton', 'us', 'gbps')} | "
            f"{b['torch']['us']:.0f} | {s['eager_us']:.1f} |")
    if speedups:
        lines += ["", f"Geomean speedup of kvgen over the seed config: {geomean(speedups):.2f}×"]
    if ceilings and len(ceilings) == len(speedups):
        lines += ["", f"Geomean speedup of a copy of the same bytes over the seed config (what a gather "
                      f"as fast as a plain copy would reach): {geomean(ceilings):.2f}×"]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = [s["shape"] for s in report["shapes"]]
    backends = [b for b in (COPY, "kvgen", "seed", "triton", "torch") if b in report["shapes"][0]["backends"]]
    fig, ax = plt.subplots(figsize=(12, 5))
    width = 0.8 / len(backends)
    for i, name in enumerate(backends):
        ax.bar([x + (i - (len(backends) - 1) / 2) * width for x in range(len(shapes))],
               [s["backends"][name]["gbps"] for s in report["shapes"]], width, label=name)
    ax.axhline(report["copy_gbps"], color="k", linestyle="--", label="copy roofline")
    ax.set_xticks(range(len(shapes)), shapes, rotation=30, ha="right")
    ax.set_ylabel("GB/s (bytes read + written)")
    op = "quantize_and_insert_k_cache" if report.get("family") == "writer" else "dequantize_and_gather_k_cache"
    ax.set_title(f"{op} on {report['device']} ({report['date']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def writer_key(shape: WriterShape) -> CallKey:
    """What dispatch sees of a writer shape's call."""
    from ..families.quantize_insert.op import WRITE_FIELDS

    fields = WRITE_FIELDS[str(shape.slot_dtype).split(".")[-1], False]  # the public call's: float32 scales as computed
    return CallKey("qik", shape.format, shape.block_size, fields, torch.cuda.get_device_capability(),
                   shape_class(1, shape.tokens))


def gpu_writer_case(shape: WriterShape, seed: int, device="cuda"):
    fmt = as_format(shape.format)
    g = torch.Generator(device=device).manual_seed(seed)
    num_blocks = -(-shape.tokens // shape.block_size)
    k = torch.randn((shape.tokens, fmt.head_dim), generator=g, device=device).to(torch.bfloat16)
    k_cache = torch.empty((num_blocks, shape.block_size, fmt.record_bytes), dtype=torch.uint8, device=device)
    pages = torch.randperm(num_blocks, generator=g, device=device)
    token = torch.arange(shape.tokens, device=device)
    slots = (pages[token // shape.block_size] * shape.block_size + token % shape.block_size).to(shape.slot_dtype)
    return [k, k_cache, slots, shape.block_size]


def _writer_runner(backend: str, args, entry=None) -> Callable[[], None]:
    import kvgen
    from ..families.quantize_insert import op as insert

    if backend == "entry":
        return lambda: insert.launch_entry(entry, args[0], args[1], args[2], pdl=entry.pdl)
    return with_env(lambda: kvgen.quantize_and_insert_k_cache(*args), KVGEN_BACKEND=backend)


def bench_writer_shape(shape: WriterShape, copy_bw: float, l2_bytes: int, sweep: bool = False) -> dict:
    """The writer's backends on one shape: each checked byte for byte against the
    torch path on every input set (the cache poisoned first), then timed."""
    from ..families.quantize_insert import op as insert
    from ..families.quantize_insert.reference import quantize_and_insert_torch
    from ..runtime.loader import registry

    fmt = as_format(shape.format)
    working_set = shape.tokens * token_bytes(fmt)
    cases = [gpu_writer_case(shape, seed) for seed in range(_set_count(working_set, l2_bytes))]
    expected = []
    for k, k_cache, slots, bs in cases:
        k_cache.fill_(0xA5)
        quantize_and_insert_torch(k, k_cache, slots, bs, fmt)
        expected.append(k_cache.clone())
    chosen = insert.decide_insert(*cases[0]).entry
    variants = {"kvgen": lambda a: _writer_runner("cubin", a), "triton": lambda a: _writer_runner("triton", a)}
    if sweep:
        for e in split_by_image(candidate_rows(registry().entries, writer_key(shape)))[0]:
            variants[variant_of(e.config)] = lambda a, e=e: _writer_runner("entry", a, e)
    timed = {}
    for name, make in variants.items():
        calls = timed[name] = [make(a) for a in cases]
        for args, call, ref in zip(cases, calls, expected):
            args[1].fill_(0xA5)
            call()
            torch.cuda.synchronize()
            bad = int((args[1] != ref).sum())
            if bad:
                raise AssertionError(f"{shape.label} {name}: {bad} cache bytes differ from the torch path")
    timed[COPY] = same_bytes_copy(working_set, len(cases))
    seconds = graph_times(timed)
    del timed
    seconds["torch"] = statistics.median(_event_times(lambda: quantize_and_insert_torch(*cases[0], fmt), reps=3,
                                                      warmup=1))
    roofline_s = working_set / copy_bw
    backends = {name: {"us": t * 1e6, "gbps": working_set / t / 1e9, "fraction": roofline_s / t}
                for name, t in seconds.items()}
    return {"shape": shape.label, "tokens": shape.tokens, "sets": len(cases), "roofline_us": roofline_s * 1e6,
            "chosen": chosen.name, "backends": backends}


def writer_markdown(report: dict) -> str:
    lines = [f"Device: {report['device']} ({report['sms']} SMs), {report['date']}; copy roofline "
             f"{report['copy_gbps']:.0f} GB/s (read + write).", "",
             "| shape | tokens | copy µs | kvgen µs | GB/s | kvgen / copy | triton µs | triton GB/s | torch µs | row |",
             "|---" * 10 + "|"]
    for s in report["shapes"]:
        b = s["backends"]
        lines.append(f"| {s['shape']} | {s['tokens']} | {b[COPY]['us']:.2f} | {b['kvgen']['us']:.2f} | "
                     f"{b['kvgen']['gbps']:.0f} | {b[COPY]['us'] / b['kvgen']['us']:.3f} | {b['triton']['us']:.2f} | "
                     f"{b['triton']['gbps']:.0f} | {b['torch']['us']:.0f} | {s['chosen']} |")
        extra = {k: v for k, v in b.items() if k not in (COPY, "kvgen", "triton", "torch")}
        if extra:
            lines.append("| ↳ rows | | | " + ", ".join(f"{k} {v['us']:.2f}" for k, v in extra.items()) + " | | | | | | |")
    return "\n".join(lines)

