"""`make sanitize` (on a CUDA machine): compute-sanitizer over kvgen's cubins.

    python -m tests.sanitize            # memcheck, racecheck, initcheck, synccheck; exit 1 on any error
    python -m tests.sanitize --tool memcheck
    python -m tests.sanitize --calls    # just the calls (what each tool runs)

First it checks itself: memcheck must report an out-of-bounds gather (a
block-table entry far past the cache, KVGEN_CHECK unset).

The calls launch every shipped manifest row, readers and writers, directly
on a small case, and the public ops through the cubin backend for every
reader family (format x dense with and without gather_lens x sparse) and
block size and for the writer, each checked bit-exact against the torch
reference. Every tool runs them in a fresh process; a run
fails on any error the tool reports: a kernel error (out-of-bounds or
misaligned access, a shared-memory race, a read of uninitialised device
memory, a barrier misuse) or a CUDA API call that failed -- kvgen must add
no driver-API error to a serving stack run under the sanitizer.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time

TOOLS = ("memcheck", "racecheck", "initcheck", "synccheck")
ROWS_ENV = "KVGEN_SANITIZE_ROWS"  # --rows REGEX: only the manifest rows whose names match (the calls' subprocess reads it)
# memcheck, initcheck, synccheck: "ERROR SUMMARY: N errors";
# racecheck: "RACECHECK SUMMARY: N hazards displayed (E errors, W warnings)".
_SUMMARY = re.compile(r"ERROR SUMMARY: (\d+) error|RACECHECK SUMMARY: \d+ hazards? displayed \((\d+) error")
_API_ERROR = re.compile(r"Program hit (\w+) .* on CUDA API call to (\w+)")


def calls() -> int:
    """Run every call once; returns the number of mismatched values."""
    import torch

    import kvgen
    from kvgen.families.dequant_gather import op as ops
    from kvgen.runtime.loader import registry
    from kvgen.families.dequant_gather.reference import (dequantize_and_gather_packed_torch,
                                                         dequantize_and_gather_sparse_torch,
                                                         dequantize_and_gather_torch, gather_raw_packed_torch)
    from kvgen.testing import make_case, make_packed_case, make_raw_packed_case, make_sparse_case, mismatches
    from tests.golden.corpus import run_public

    def dense_case(layout, bs, gather_lens, seed):
        gl = [2 * bs + 1, 3] if gather_lens else None
        return make_case(seq_lens=[3 * bs + 7, 5], gather_lens=gl, block_size=bs, format=layout, offset=2, seed=seed)

    def sparse_case(layout, bs, seed):
        return make_sparse_case(num_slots=2 * bs + 5, valid=0.6, block_size=bs, format=layout, seed=seed)

    bad = 0
    os.environ["KVGEN_BACKEND"] = "cubin"
    from kvgen.config import ARCHS

    here = torch.cuda.get_device_capability()
    runs_here = [e for e in registry().entries if ARCHS[e.arch].serves(here)  # cubins of this arch, and PTX
                 and re.search(os.environ.get(ROWS_ENV, ""), e.name)]
    entries = [e for e in runs_here if e.family == "dqgk"]
    writers = [e for e in runs_here if e.family == "qik"]
    def packed_case(layout, bs, seed):
        return make_packed_case(seq_lens=[2 * bs + 3, 0, 9], block_size=bs, format=layout, seq_starts=[1, 0, 4],
                                workspace_gap=2, rows=2 + 2 * bs + 3 + 12, seed=seed)

    def raw_case(layout, bs, seed):
        return make_raw_packed_case(seq_lens=[2 * bs + 3, 0, 9], block_size=bs, format=layout, first_row=2, seed=seed)

    for i, entry in enumerate(entries):  # every shipped reader row, launched directly
        c = entry.config
        if c["indexing"] == "packed" and c.get("output") == "raw":
            case = raw_case(c["format"], c["block_size"], i)
            exp_k, exp_s = case.dst_k.clone(), case.dst_scale.clone()
            gather_raw_packed_torch(*case.reference_args(dst_k=exp_k, dst_scale=exp_s))
            kv_cache, dst_k, dst_scale, block_table, cu = case.args("cuda")
            ops.launch_raw(entry, kv_cache, dst_k, dst_scale, block_table, cu, pdl=entry.pdl)
            torch.cuda.synchronize()
            bad += int((dst_k.cpu() != exp_k).sum()) + int((dst_scale.cpu() != exp_s).sum())
            continue
        if c["indexing"] == "packed":
            case = packed_case(c["format"], c["block_size"], i)
            expected = case.out.clone()
            dequantize_and_gather_packed_torch(*case.reference_args(out=expected))
            args = case.args("cuda")
            out = args[1]
            ops.launch_packed(entry, *args, pdl=entry.pdl)
        elif c["indexing"] == "sparse":
            case = sparse_case(c["format"], c["block_size"], i)
            expected = case.out.clone()
            dequantize_and_gather_sparse_torch(*case.args(out=expected))
            out, k_cache, slots, _ = case.args("cuda")
            ops.launch_entry_sparse(entry, out, k_cache, slots, pdl=entry.pdl)
        else:
            case = dense_case(c["format"], c["block_size"], c["gather_lens"], i)
            expected = case.out.clone()
            dequantize_and_gather_torch(*case.args(out=expected))
            out, k_cache, seq_lens, gather_lens, block_table, _, offset = case.args("cuda")
            ops.launch_entry(entry, out, k_cache, seq_lens, gather_lens, block_table, offset, pdl=entry.pdl)
        torch.cuda.synchronize()
        bad += mismatches(out.cpu(), expected)
    families = sorted({(e.config["format"], e.config["indexing"], e.config["gather_lens"], e.config["block_size"],
                        e.config.get("output", "bf16")) for e in entries if not ARCHS[e.arch].ptx})
    for i, (layout, indexing, gather_lens, bs, output) in enumerate(families):  # the public ops, dispatched
        if indexing == "packed":
            case = (raw_case if output == "raw" else packed_case)(layout, bs, 1000 + i)
            got, _ = run_public(case, "cuda")
            if output == "raw":
                exp_k, exp_s = case.dst_k.clone(), case.dst_scale.clone()
                gather_raw_packed_torch(*case.reference_args(dst_k=exp_k, dst_scale=exp_s))
                bad += int((got.cpu() != torch.cat([exp_k, exp_s], dim=1)).sum())
            else:
                expected = case.out.clone()
                dequantize_and_gather_packed_torch(*case.reference_args(out=expected))
                bad += mismatches(got.cpu(), expected)
            assert kvgen.last_backend() == "cubin"
            continue
        if indexing == "sparse":
            case = sparse_case(layout, bs, 1000 + i)
            expected = case.out.clone()
            dequantize_and_gather_sparse_torch(*case.args(out=expected))
            out = case.out.to("cuda")
            kvgen.dequantize_and_gather_k_cache_sparse(*case.args("cuda", out=out))
        else:
            case = dense_case(layout, bs, gather_lens, 1000 + i)
            expected = case.out.clone()
            dequantize_and_gather_torch(*case.args(out=expected))
            out = case.out.to("cuda")
            kvgen.dequantize_and_gather_k_cache(*case.args("cuda", out=out))
        torch.cuda.synchronize()
        assert kvgen.last_backend() == "cubin"
        bad += mismatches(out.cpu(), expected)
    bad += writer_calls(writers)
    print(f"sanitize calls: {len(entries)} reader and {len(writers)} writer rows launched directly, "
          f"{len(families)} reader families and the writer through the ops, {bad} mismatched values or bytes")
    return bad


def writer_calls(writers) -> int:
    """Every writer row launched directly, then the public writer op, each on a
    poisoned, padded cache; returns the bytes that differ from the torch reference."""
    import torch

    import kvgen
    from kvgen.families.quantize_insert import op as insert
    from kvgen.families.quantize_insert.reference import quantize_and_insert_torch
    from kvgen.testing import _to, clone_strided, whole_storage
    from tests.test_gpu import writer_case

    bad = 0
    for i, entry in enumerate(writers + writers[:1]):
        c = entry.config
        dtype = torch.int64 if c["slot_dtype"] == "int64" else torch.int32
        k, k_cache, slots, bs, fmt = writer_case(c["format"], c["block_size"], i, dtype, specials=i % 2 == 1)
        pow2 = bool(c.get("pow2_scale", False))
        expected = clone_strided(k_cache)
        quantize_and_insert_torch(k, expected, slots, bs, fmt, pow2_scale=pow2)
        cache = _to(k_cache, "cuda")
        if i < len(writers):
            insert.launch_entry(entry, _to(k, "cuda"), cache, _to(slots, "cuda"), pdl=entry.pdl)
        else:  # the op, dispatched
            if pow2:
                kvgen.indexer_k_quant_and_cache(_to(k, "cuda"), cache, _to(slots, "cuda"), fmt.scale_group, "ue8m0")
            else:
                kvgen.quantize_and_insert_k_cache(_to(k, "cuda"), cache, _to(slots, "cuda"), bs)
            assert kvgen.last_backend() == "cubin"
        torch.cuda.synchronize()
        bad += int((whole_storage(cache).cpu() != whole_storage(expected)).sum())
    return bad


def out_of_bounds_call() -> int:
    """The harness's own check: a block-table entry far past the cache, unchecked
    (KVGEN_CHECK unset), read through a cubin -- memcheck must report it."""
    import torch

    import kvgen
    from kvgen.testing import make_case

    os.environ["KVGEN_BACKEND"] = "cubin"
    os.environ.pop("KVGEN_CHECK", None)
    case = make_case(seq_lens=[100], block_size=64, seed=1)
    case.block_table[0, 1] = 1 << 20  # page 2^20: ~37 GiB past the cache's start
    try:
        kvgen.dequantize_and_gather_k_cache(*case.args("cuda"))
        torch.cuda.synchronize()
        outcome = "no error"
    except RuntimeError as err:  # memcheck stops the kernel: the launch fails
        outcome = str(err).splitlines()[0]
    print(f"sanitize calls: one out-of-bounds gather ({outcome})")
    return 0


def run_tool(tool: str, mode: str = "--calls") -> tuple[int, list[str], float]:
    """(errors the tool reported, the failed API calls among them, seconds)."""
    command = ["compute-sanitizer", "--tool", tool, "--print-limit", "100", "--show-backtrace", "host",
               sys.executable, "-m", "tests.sanitize", mode]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    text = done.stdout + done.stderr
    summary = _SUMMARY.findall(text)
    if not summary or "sanitize calls:" not in text:
        raise SystemExit(f"{tool}: the run did not complete (exit {done.returncode}):\n{text[-4000:]}")
    errors = int("".join(summary[-1]))
    api = [f"{code} on {call}" for code, call in _API_ERROR.findall(text)]
    if (errors or done.returncode) and mode == "--calls":
        print(text[-6000:])
    return errors, api, seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", action="store_true", help="run the calls only (under a tool)")
    parser.add_argument("--tool", action="append", choices=TOOLS, help="only this tool (repeatable)")
    parser.add_argument("--rows", metavar="REGEX", help="only the manifest rows whose names match (re.search)")
    parser.add_argument("--out-of-bounds", action="store_true",
                        help="run one out-of-bounds gather (under a tool): the harness's self-test")
    args = parser.parse_args(argv)
    if args.rows is not None:
        os.environ[ROWS_ENV] = args.rows  # inherited by the tools' subprocesses
    if args.calls:
        return 1 if calls() else 0
    if args.out_of_bounds:
        return out_of_bounds_call()
    errors, _, _ = run_tool("memcheck", "--out-of-bounds")  # a harness that cannot fail proves nothing
    print(f"self-test: memcheck saw {errors} error(s) in an out-of-bounds gather (must be > 0)")
    failed = errors == 0
    for tool in args.tool or TOOLS:
        errors, api, seconds = run_tool(tool)
        print(f"{tool}: {errors} error(s), of which {len(api)} failed CUDA API call(s) "
              f"{sorted(set(api)) if api else ''}({seconds:.0f} s)")
        failed |= errors > 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
