"""Probe (H100): how the launch grid and the pipeline depth move the small-record
gathers and the new writers, against a copy of the same bytes in the same rounds.

    python benchmarks/grid_sweep_formats.py [all|readers|writers|raw]
    python benchmarks/grid_sweep_formats.py writers FORMAT ...             # only these formats' writers
    python benchmarks/grid_sweep_formats.py reader FORMAT OP TOKENS K1,K2,...   # one shape, K rows a warp

Each variant is one manifest row launched directly with a chosen grid; every
variant is checked against the torch path before it is timed. Each variant's
graph is one call on one input set, so a kernel of under ~20 us reads at the
graph launch's floor here (every 65536-token indexer variant and its copy at
16.8-18.4 us, where bench_formats, rotating many sets a graph, reads 8-12):
compare variants of such shapes in bench_formats, not here.
"""

from __future__ import annotations

import torch

from kvgen.families.dequant_gather import op as ops
from kvgen.families.quantize_insert import op as insert
from kvgen.runtime.loader import registry
from kvgen.tools.bench import COPY, graph_times, same_bytes_copy
from kvgen.tools.bench_formats import BLOCK_SIZE, Bench, _case
from kvgen.tools.variants import variant_of


def rows(family, fmt, **fields):
    return [e for e in registry().entries if e.family == family and e.config["format"] == fmt and e.arch == "sm_90a"
            and e.config["block_size"] == BLOCK_SIZE and all(e.config.get(k) == v for k, v in fields.items())]


def row_name(entry) -> str:
    """A writer row's variant name, a row capped by occupancy_warps named apart from the uncapped one (o32)."""
    c = entry.config
    return variant_of(c) + (f"o{c['occupancy_warps']}" if c.get("occupancy_warps") else "")


def sweep_reader(b: Bench, per_warp=(1, 2, 4, 8, 16, 32)):
    from kvgen.families.dequant_gather import reference as rd
    from kvgen.testing import mismatches

    args = _CALLS.setdefault(b, _raw_args(b))
    outs, reference = _outputs_and_reference(b, args, rd)
    for t in outs:
        t.view(torch.uint8).fill_(0xA5)
    reference()
    expected = [t.clone() for t in outs]
    moved = sum(t.numel() * t.element_size() for t in outs) + b.tokens * args_format(b).record_bytes
    fields = {"indexing": b.op if b.op != "raw" else "packed", "output": "raw" if b.op == "raw" else "bf16"}
    variants = {}
    for entry in rows("dqgk", b.format, **fields):
        if entry.config.get("gather_lens"):
            continue
        warps = entry.config["num_warps"]
        for k in per_warp:
            reqs = 8 if b.op == "dense" else 1
            workers = max(1, b.tokens // reqs // (warps * k))
            grid = (reqs, min(workers, 65535), 1)
            variants[f"s{entry.config['num_stages']}w{warps} k{k}"] = [_launcher(b, entry, grid)]
    for name, calls in variants.items():
        for t in outs:
            t.view(torch.uint8).fill_(0xA5)
        calls[0]()
        torch.cuda.synchronize()
        for got, want in zip(outs, expected):
            bad = mismatches(got, want) if got.dtype == torch.bfloat16 else int((got != want).sum())
            assert bad == 0, (b.label, name, bad)
    variants[COPY] = same_bytes_copy(moved, 1)
    t = graph_times(variants)
    print(b.label, " ".join(f"[{n}: {v * 1e6:.2f}]" for n, v in t.items()),
          f"best/copy {t[COPY] / min(v for n, v in t.items() if n != COPY):.3f}", flush=True)


def _outputs_and_reference(b: Bench, args, rd):
    if b.op == "dense":
        return [args[0]], lambda: rd.dequantize_and_gather_torch(*args)
    if b.op == "sparse":
        return [args[0]], lambda: rd.dequantize_and_gather_sparse_torch(*args, BLOCK_SIZE)
    if b.op == "packed":
        cache, out, table, starts, reqs, seq_starts = args
        return [out], lambda: rd.dequantize_and_gather_packed_torch(out, cache, table, starts, reqs, seq_starts,
                                                                    BLOCK_SIZE)
    cache, dst_k, dst_s, table, cu = args
    return [dst_k, dst_s], lambda: rd.gather_raw_packed_torch(dst_k, dst_s, cache, table, cu, BLOCK_SIZE)


_CALLS = {}


def _launcher(b: Bench, entry, grid):
    import kvgen  # noqa: F401

    case = _CALLS[b]
    if b.op == "dense":
        out, cache, seq_lens, gl, table, _, offset = case
        return lambda: ops.launch_entry(entry, out, cache, seq_lens, gl, table, offset, grid=grid, pdl=entry.pdl)
    if b.op == "sparse":
        out, cache, slots = case
        return lambda: ops.launch_entry_sparse(entry, out, cache, slots, grid=grid, pdl=entry.pdl)
    if b.op == "packed":
        return lambda: ops.launch_packed(entry, *case, grid=grid, pdl=entry.pdl)
    return lambda: ops.launch_raw(entry, *case, grid=grid, pdl=entry.pdl)


def _raw_args(b: Bench):
    """The op's arguments for shape b (the same construction as bench_formats._case)."""
    from kvgen.testing import as_format
    from kvgen.tools.bench_formats import _cache

    fmt = as_format(b.format)
    g = torch.Generator(device="cuda").manual_seed(0)
    n = b.tokens
    cache = _cache(fmt, n, g)
    perm = torch.randperm(cache.shape[0], generator=g, device="cuda").to(torch.int32)
    reqs, per = 8, n // 8
    table = perm[: reqs * (per // BLOCK_SIZE)].reshape(reqs, per // BLOCK_SIZE).contiguous()
    starts = torch.arange(reqs + 1, dtype=torch.int32, device="cuda") * per
    if b.op == "dense":
        out = torch.empty((reqs, per, fmt.head_dim), dtype=torch.bfloat16, device="cuda")
        return (out, cache, torch.full((reqs,), per, dtype=torch.int32, device="cuda"), None, table, BLOCK_SIZE, 0)
    if b.op == "sparse":
        return (torch.empty((n, fmt.head_dim), dtype=torch.bfloat16, device="cuda"), cache,
                torch.randperm(n, generator=g, device="cuda").to(torch.int32))
    if b.op == "packed":
        return (cache, torch.empty((n, fmt.head_dim), dtype=torch.bfloat16, device="cuda"), table, starts[:reqs],
                reqs, None)
    return (cache, torch.empty((n, fmt.value_bytes), dtype=torch.uint8, device="cuda"),
            torch.empty((n, 4), dtype=torch.uint8, device="cuda"), table, starts)


def sweep_writer(b: Bench, ctas=(None, 132 * 16, 132 * 8, 132 * 4, 132 * 2)):
    from kvgen.testing import as_format

    fmt = as_format(b.format)
    call, outs, torch_path, moved, _ = _case(b, 0)
    pow2 = fmt.name == "indexer_132"
    entries = rows("qik", b.format, slot_dtype="int64", pow2_scale=pow2)
    # The case's tensors, through the closure of its call.
    k_cache = outs[0]
    torch_path()
    expected = k_cache.clone()
    cells = {c.cell_contents for c in call.__closure__}
    tensors = [t for t in cells if isinstance(t, torch.Tensor)]
    slots = next(t for t in tensors if t.dtype == torch.int64)
    bf16 = [t for t in tensors if t.dtype == torch.bfloat16]
    if len(bf16) == 2:  # kv_c, k_pe
        k, tail = sorted(bf16, key=lambda t: -t.shape[1])
        checked = insert.validate_ds_mla(k, tail, k_cache, slots)[0]
    else:
        k, tail = bf16[0], None
        checked = insert.validate(k, k_cache, slots, BLOCK_SIZE)
    variants = {}
    for e in entries:
        for n in ctas:
            grid = None if n is None else (n, 1, 1)
            name = f"{row_name(e)} {n or 'default'}"
            variants[name] = [lambda e=e, grid=grid: insert.launch_entry(e, k, k_cache, slots, grid=grid,
                                                                         checked=checked, pdl=e.pdl, tail=tail)]
    for name, calls in variants.items():
        k_cache.fill_(0xA5)
        calls[0]()
        torch.cuda.synchronize()
        assert torch.equal(k_cache, expected), name
    variants[COPY] = same_bytes_copy(moved, 1)
    t = graph_times(variants)
    print(b.label, " ".join(f"[{n}: {v * 1e6:.2f}]" for n, v in t.items()),
          f"best/copy {t[COPY] / min(v for n, v in t.items() if n != COPY):.3f}", flush=True)


def args_format(b: Bench):
    from kvgen.testing import as_format

    return as_format(b.format)


if __name__ == "__main__":
    import sys

    what = sys.argv[1] if len(sys.argv) > 1 else "all"
    if what == "reader":  # reader FORMAT OP TOKENS K1,K2,...: one shape, rows a warp K1, K2, ...
        fmt, op, n, ks = sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
        sweep_reader(Bench(f"{fmt} {op} {n}", fmt, op, n), per_warp=tuple(int(k) for k in ks.split(",")))
    if what == "raw":
        for n in (65536, 262144):
            for op in ("raw", "packed"):
                sweep_reader(Bench(f"indexer_132 {op} {n}", "indexer_132", op, n), per_warp=(8, 16, 32, 64, 128, 256))
    if what in ("all", "readers"):
        for op in ("dense", "sparse", "packed", "raw"):
            for n in (65536, 262144):
                sweep_reader(Bench(f"indexer_132 {op} {n}", "indexer_132", op, n), per_warp=(2, 4, 8))
    if what in ("all", "writers"):
        formats = ("v41_288", "v32_656", "indexer_132") + (("dsv4_584", "v41_528") if what == "writers" else ())
        for fmt in sys.argv[2:] or formats:  # writers [FORMAT ...]: only these formats
            for n in (65536, 262144):
                sweep_writer(Bench(f"{fmt} write {n}", fmt, "write", n))
