"""GPU tests (marker `gpu`; skipped without CUDA). Run on the device machine:
`python -m pytest -m gpu`."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import kvgen
from kvgen.config import ARCHS
from kvgen.families.dequant_gather.config import CHUNKED_SCHEDULES
from kvgen.families.dequant_gather.reference import (dequantize_and_gather_packed_torch,
                                                     dequantize_and_gather_sparse_torch, dequantize_and_gather_torch,
                                                     gather_raw_packed_torch)
from kvgen.testing import (POISON_BF16, clone_strided, make_case, make_packed_case, make_raw_packed_case,
                           make_sparse_case, mismatches, poisoned_out, whole_storage)

pytestmark = pytest.mark.gpu

BLOCK_SIZES = (16, 32, 64, 128, 256)


def run(backend, case, monkeypatch, device="cuda"):
    monkeypatch.setenv("KVGEN_BACKEND", backend)
    out = case.out.to(device)
    kvgen.dequantize_and_gather_k_cache(*case.args(device, out=out))
    torch.cuda.synchronize()
    assert kvgen.last_backend() == backend
    return out.cpu()


def reference(case):
    expected = case.out.clone()
    dequantize_and_gather_torch(*case.args(out=expected))
    return expected


@pytest.mark.parametrize("layout", ["dsv4_584", "v41_528"])
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("with_gather_lens", [False, True])
def test_backends_bit_exact(layout, block_size, with_gather_lens, monkeypatch):
    for seed in range(3):
        g = torch.Generator().manual_seed(1000 * block_size + seed)
        num_reqs = int(torch.randint(1, 9, (1,), generator=g))
        seq = torch.randint(0, 700, (num_reqs,), generator=g).tolist()
        gl = [int(torch.randint(0, s + 1, (1,), generator=g)) for s in seq] if with_gather_lens else None
        case = make_case(seq_lens=seq, gather_lens=gl, block_size=block_size, offset=seed * 3,
                         raw_bytes=seed == 2, page_pad=16 * seed, block_table_pad=seed, seed=seed, format=layout)
        expected = reference(case)
        for backend in ("cubin", "triton", "torch"):
            assert mismatches(run(backend, case, monkeypatch), expected) == 0, (backend, seq, gl)


@pytest.mark.parametrize("layout", ["dsv4_584", "v41_528"])
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_sparse_backends_bit_exact(layout, block_size, monkeypatch):
    for seed, valid in enumerate((0.03, 0.5, 1.0)):
        case = make_sparse_case(num_slots=2000 + seed, valid=valid, block_size=block_size, format=layout,
                                raw_bytes=seed == 1, page_pad=16 * seed, seed=seed)
        expected = case.out.clone()
        dequantize_and_gather_sparse_torch(*case.args(out=expected))
        for backend in ("cubin", "triton", "torch"):
            monkeypatch.setenv("KVGEN_BACKEND", backend)
            out = case.out.cuda()
            kvgen.dequantize_and_gather_k_cache_sparse(*case.args("cuda", out=out))
            torch.cuda.synchronize()
            assert kvgen.last_backend() == backend
            assert mismatches(out.cpu(), expected) == 0, (backend, layout, block_size, valid)


def test_default_dispatch_serves_cubin_on_hopper():
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("cubins are sm_90a")
    case = make_case(seq_lens=[100], block_size=64)
    assert kvgen.select_backend(*case.args("cuda")) == "cubin"
    case = make_sparse_case(num_slots=100, block_size=64, format="v41_528")
    assert kvgen.select_backend_sparse(*case.args("cuda")) == "cubin"


def test_cuda_graph_capture_and_replay(monkeypatch):
    monkeypatch.setenv("KVGEN_BACKEND", "cubin")
    case = make_case(seq_lens=[300, 20, 129], gather_lens=[200, 20, 1], block_size=32, offset=4)
    args = list(case.args("cuda"))
    out = args[0]
    kvgen.dequantize_and_gather_k_cache(*args)  # load outside the capture
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        out.view(torch.int16).fill_(0x7FBF)
        with torch.cuda.graph(graph, stream=stream):
            kvgen.dequantize_and_gather_k_cache(*args)
    out.view(torch.int16).fill_(0x7FBF)
    graph.replay()
    torch.cuda.synchronize()
    assert mismatches(out.cpu(), reference(case)) == 0
    # Replay sees new inputs written in place.
    args[2].copy_(torch.tensor([250, 20, 129], dtype=torch.int32))
    case.seq_lens = torch.tensor([250, 20, 129], dtype=torch.int32)
    out.view(torch.int16).fill_(0x7FBF)
    graph.replay()
    torch.cuda.synchronize()
    assert mismatches(out.cpu(), reference(case)) == 0


def test_torch_compile_graph(monkeypatch):
    monkeypatch.setenv("KVGEN_BACKEND", "cubin")
    case = make_case(seq_lens=[64, 65], block_size=16)

    @torch.compile(fullgraph=True)
    def step(out, k_cache, seq_lens, block_table):
        kvgen.dequantize_and_gather_k_cache(out, k_cache, seq_lens, None, block_table, 16, 0)
        return out.float().sum(dim=-1)

    args = case.args("cuda")
    step(args[0], args[1], args[2], args[4])
    torch.cuda.synchronize()
    assert mismatches(args[0].cpu(), reference(case)) == 0


def test_cache_larger_than_4gib(monkeypatch):
    free, _ = torch.cuda.mem_get_info()
    block_size, record = 64, 584
    page = block_size * record
    num_blocks = (5 << 30) // page  # ~5 GiB of pages
    if free < num_blocks * page * 1.5:
        pytest.skip("not enough GPU memory")
    small = make_case(seq_lens=[300, 70], gather_lens=[280, 70], block_size=block_size, seed=7, extra_pages=0)
    k_cache = torch.empty((num_blocks, block_size, record), dtype=torch.uint8, device="cuda")
    # Put the case's pages at the very end of the cache: byte offsets past 4 GiB.
    base = num_blocks - small.k_cache.shape[0]
    k_cache[base:] = small.k_cache.cuda()
    block_table = (small.block_table + base).to(torch.int32)
    block_table[small.block_table < 0] = -1
    for backend in ("cubin", "triton"):
        monkeypatch.setenv("KVGEN_BACKEND", backend)
        out = poisoned_out(2, small.out.shape[1], device="cuda")
        kvgen.dequantize_and_gather_k_cache(out, k_cache, small.seq_lens.cuda(), small.gather_lens.cuda(),
                                            block_table.cuda(), block_size, 0)
        torch.cuda.synchronize()
        assert mismatches(out.cpu(), reference(small)) == 0, backend
    assert (base * page) > (1 << 32)


def test_first_use_from_eight_threads():
    # A fresh process, so that the first load really happens under contention.
    script = textwrap.dedent("""
        import threading, torch, kvgen
        from kvgen.testing import make_case, mismatches
        from kvgen.families.dequant_gather.reference import dequantize_and_gather_torch
        case = make_case(seq_lens=[500, 3, 64], gather_lens=[400, 3, 10], block_size=64, seed=3)
        expected = case.out.clone()
        dequantize_and_gather_torch(*case.args(out=expected))
        barrier = threading.Barrier(8)
        results = []
        def worker():
            out = case.out.cuda()
            args = case.args("cuda", out=out)
            barrier.wait()
            kvgen.dequantize_and_gather_k_cache(*args)
            torch.cuda.synchronize()
            results.append((kvgen.last_backend(), mismatches(out.cpu(), expected)))
        threads = [threading.Thread(target=worker) for _ in range(8)]
        [t.start() for t in threads]; [t.join() for t in threads]
        assert len(results) == 8 and all(r == ("cubin", 0) for r in results), results
        print("ok", results)
    """)
    env = dict(os.environ, KVGEN_BACKEND="cubin")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


def test_second_device_if_present(monkeypatch):
    if torch.cuda.device_count() < 2:
        pytest.skip("one GPU")
    case = make_case(seq_lens=[100, 7], block_size=64)
    monkeypatch.setenv("KVGEN_BACKEND", "cubin")
    out = run("cubin", case, monkeypatch, device="cuda:1")
    assert mismatches(out, reference(case)) == 0


def _rows_here(**wanted):
    """The reader rows (cubins, and PTX the driver JIT-compiles) that run on
    this GPU and whose config holds each wanted value (a tuple: one of its
    values); there must be some."""
    from kvgen.runtime.loader import registry

    here = torch.cuda.get_device_capability()

    def holds(config, field, value):
        got = config.get(field, "bf16" if field == "output" else None)
        return got in value if isinstance(value, tuple) else got == value

    rows = [e for e in registry().entries if e.family == "dqgk" and ARCHS[e.arch].serves(here)
            and all(holds(e.config, f, v) for f, v in wanted.items())]
    assert rows, wanted
    return rows


def test_every_shipped_kernel_bit_exact():
    """Each cubin in the manifest, launched directly (not only the rows dispatch picks)."""
    from kvgen.families.dequant_gather import op as ops

    runs_here = _rows_here()
    assert {ARCHS[e.arch].ptx for e in runs_here} == {False, True}  # cubins, and PTX the driver JIT-compiles
    for i, entry in enumerate(runs_here):  # the readers that run on this GPU
        c = entry.config
        bs = c["block_size"]
        if c["indexing"] == "packed" and c.get("output") == "raw":
            case = make_raw_packed_case(seq_lens=[3 * bs + 7, 0, 5, bs], block_size=bs, format=c["format"],
                                        first_row=3, raw_bytes=i % 2 == 1, seed=i)
            exp_k, exp_s = case.dst_k.clone(), case.dst_scale.clone()
            gather_raw_packed_torch(*case.reference_args(dst_k=exp_k, dst_scale=exp_s))
            kv_cache, dst_k, dst_scale, block_table, cu = case.args("cuda")
            for grid in (None, (1, 1, 1)):  # the dispatch grid, then one CTA: many tokens per warp
                dst_k.fill_(0xA5)
                dst_scale.fill_(0xA5)
                ops.launch_raw(entry, kv_cache, dst_k, dst_scale, block_table, cu, grid=grid)
                torch.cuda.synchronize()
                assert torch.equal(dst_k.cpu(), exp_k) and torch.equal(dst_scale.cpu(), exp_s), (entry.name, grid)
            continue
        if c["indexing"] == "packed":
            case = make_packed_case(seq_lens=[3 * bs + 7, 0, 5, bs], block_size=bs, format=c["format"],
                                    seq_starts=[1, 4, 0, bs + 3] if i % 2 else None, workspace_gap=2,
                                    rows=2 + 4 * bs + 12 + 9, raw_bytes=i % 3 == 1, seed=i, row_pad=8)
            expected = clone_strided(case.out)
            dequantize_and_gather_packed_torch(*case.reference_args(out=expected))
            args = case.args("cuda")
            out = args[1]
            ops.launch_packed(entry, *args)
        elif c["indexing"] == "sparse":
            case = make_sparse_case(num_slots=3 * bs + 5, valid=0.6, block_size=bs, format=c["format"], seed=i,
                                    raw_bytes=i % 3 == 1)
            expected = case.out.clone()
            dequantize_and_gather_sparse_torch(*case.args(out=expected))
            out, k_cache, slots, _ = case.args("cuda")
            ops.launch_entry_sparse(entry, out, k_cache, slots)
        else:
            gl = [2 * bs + 1, 3, bs] if c["gather_lens"] else None
            case = make_case(seq_lens=[3 * bs + 7, 5, bs], gather_lens=gl, block_size=bs, format=c["format"],
                             offset=2, raw_bytes=i % 2 == 1, seed=i)
            expected = reference(case)
            out, k_cache, seq_lens, gather_lens, block_table, _, offset = case.args("cuda")
            ops.launch_entry(entry, out, k_cache, seq_lens, gather_lens, block_table, offset)
        torch.cuda.synchronize()
        assert mismatches(out.cpu(), expected) == 0, entry.name
        # Again on one CTA (one worker per request): each warp walks many tokens
        # through its ring, so every stage is refilled while others are in use.
        out.view(torch.int16).fill_(POISON_BF16)
        small = (out.shape[0] if c["indexing"] == "dense" else 1, 1, 1)
        if c["indexing"] == "packed":
            ops.launch_packed(entry, *args, grid=small)
        elif c["indexing"] == "sparse":
            ops.launch_entry_sparse(entry, out, k_cache, slots, grid=small)
        else:
            ops.launch_entry(entry, out, k_cache, seq_lens, gather_lens, block_table, offset, grid=small)
        torch.cuda.synchronize()
        assert mismatches(out.cpu(), expected) == 0, (entry.name, "one CTA")


def test_page_run_rows_with_empty_and_unaligned_windows():
    """page_run rows where a window starts inside a run and gathers nothing, or
    one token, or ends the cache's last page early: only the addressed rows
    change (a window of 0 at an unaligned start gives the kernel a run of no rows)."""
    from kvgen.families.dequant_gather import op as ops

    for i, entry in enumerate(_rows_here(schedule="page_run", gather_lens=True)):
        bs = entry.config["block_size"]
        case = make_case(seq_lens=[bs + 5, 7, 2 * bs + 1, 0, 3], gather_lens=[0, 0, 1, 0, 3], block_size=bs,
                         format=entry.config["format"], offset=1, seed=i)
        expected = reference(case)
        out, k_cache, seq_lens, gather_lens, block_table, _, offset = case.args("cuda")
        for grid in (None, (out.shape[0], 1, 1)):
            out.view(torch.int16).fill_(POISON_BF16)
            ops.launch_entry(entry, out, k_cache, seq_lens, gather_lens, block_table, offset, grid=grid)
            torch.cuda.synchronize()
            assert mismatches(out.cpu(), expected) == 0, (entry.name, grid)



def _raw_page_run_rows():
    return _rows_here(schedule="page_run", output="raw")


def _strided_rows(t: torch.Tensor, pad: int) -> torch.Tensor:
    """t's rows as a column slice of a wider tensor (rows `pad` bytes apart beyond their width)."""
    wide = torch.full((t.shape[0], t.shape[1] + pad), 0xA5, dtype=t.dtype, device=t.device)
    wide[:, : t.shape[1]] = t
    return wide[:, : t.shape[1]]


def test_raw_page_run_rows_split_chunks_into_runs():
    """The raw gather's page_run rows, whose chunks of run_tokens rows split
    into a run per request and page: chunks of many one-row and empty
    requests (up to a run a row), requests that start inside a page's run,
    more requests than a CTA stages (searched in global memory), strided
    destination rows; on the dispatch grid, on one CTA and on three. Rows
    before cu_seq_lens[0] and past cu_seq_lens[-1] stay poisoned."""
    from kvgen.families.dequant_gather import op as ops
    from kvgen.families.dequant_gather.config import STAGED_REQS

    for i, entry in enumerate(_raw_page_run_rows()):
        bs, run = entry.config["block_size"], entry.config["run_tokens"]
        tiny = [(1, 0, 1, 1, 2, 0, 1)[j % 7] for j in range(3 * run)]
        for lens in (tiny + [2 * bs + 3, run + 1, 5], [j % 4 for j in range(STAGED_REQS + 5)]):
            case = make_raw_packed_case(seq_lens=lens, block_size=bs, format=entry.config["format"], first_row=5,
                                        extra_rows=3, raw_bytes=i % 2 == 1, seed=i)
            exp_k, exp_s = _strided_rows(case.dst_k, 16), _strided_rows(case.dst_scale, 4)
            gather_raw_packed_torch(*case.reference_args(dst_k=exp_k, dst_scale=exp_s))
            kv_cache, _, _, block_table, cu = case.args("cuda")
            for grid in (None, (1, 1, 1), (1, 3, 1)):
                dst_k, dst_s = _strided_rows(case.dst_k, 16).cuda(), _strided_rows(case.dst_scale, 4).cuda()
                ops.launch_raw(entry, kv_cache, dst_k, dst_s, block_table, cu, grid=grid)
                torch.cuda.synchronize()
                assert torch.equal(dst_k.cpu(), exp_k) and torch.equal(dst_s.cpu(), exp_s), (entry.name, grid)


def test_raw_page_run_rows_with_decreasing_starts():
    """Unchecked starts that decrease (docs/semantics.md): a page_run row ends,
    writes only rows cu_seq_lens[0] .. cu_seq_lens[-1] - 1, and gives each of
    them -- values and scales alike -- some request whose start is at or below it."""
    from kvgen.families.dequant_gather import op as ops

    for i, entry in enumerate(_raw_page_run_rows()):
        bs = entry.config["block_size"]
        case = make_raw_packed_case(seq_lens=[200] * 4, block_size=bs, format=entry.config["format"], seed=i)
        cu = torch.tensor([3, 150, 40, 170, 190], dtype=torch.int32)  # every position read lies in a mapped page
        exp_k, exp_s = case.dst_k.clone(), case.dst_scale.clone()
        candidates = {}
        for r in range(4):  # each request's reading of every row at or after its start
            k, s = case.dst_k.clone(), case.dst_scale.clone()
            one = torch.tensor([int(cu[r]), 190], dtype=torch.int32)
            gather_raw_packed_torch(k, s, case.k_cache, case.block_table[r:r + 1], one, bs)
            candidates[r] = (k, s)
        kv_cache, dst_k, dst_s, block_table, _ = case.args("cuda")
        ops.launch_raw(entry, kv_cache, dst_k, dst_s, block_table, cu.cuda())
        torch.cuda.synchronize()
        got_k, got_s = dst_k.cpu(), dst_s.cpu()
        assert torch.equal(got_k[:3], exp_k[:3]) and torch.equal(got_k[190:], exp_k[190:]), entry.name
        assert torch.equal(got_s[:3], exp_s[:3]) and torch.equal(got_s[190:], exp_s[190:]), entry.name
        for t in range(3, 190):
            assert any(torch.equal(got_k[t], k[t]) and torch.equal(got_s[t], s[t])
                       for r, (k, s) in candidates.items() if int(cu[r]) <= t), (entry.name, t)


def _direct_packed_rows():
    return _rows_here(schedule="direct", indexing="packed")


def test_direct_packed_rows_find_each_blocks_request():
    """The direct schedule's packed rows find a block's request once (by a warp
    ballot over up to 32 requests' starts held in lanes; more requests: a
    search in global memory) and search again past its end: 32 and 33
    requests (the ballot's last case and the search's first) of 0-9 rows,
    so blocks cross several requests, empty ones among them, with seq_starts
    and rows before the first start; on the dispatch grid, on one CTA and on
    three. Rows before the first start stay poisoned."""
    from kvgen.families.dequant_gather import op as ops

    for i, entry in enumerate(_direct_packed_rows()):
        bs = entry.config["block_size"]
        for num_reqs in (32, 33):
            lens = [(3, 0, 9, 1, 5, 0, 0, 7, 2)[(j + i) % 9] for j in range(num_reqs)]
            case = make_packed_case(seq_lens=lens, block_size=bs, format=entry.config["format"],
                                    seq_starts=[(j * 5) % 11 for j in range(num_reqs)], workspace_gap=3,
                                    rows=3 + sum(lens) + 6, seed=i, row_pad=8)
            expected = clone_strided(case.out)
            dequantize_and_gather_packed_torch(*case.reference_args(out=expected))
            for grid in (None, (1, 1, 1), (1, 3, 1)):
                args = case.args("cuda")
                ops.launch_packed(entry, *args, grid=grid, pdl=entry.pdl)
                torch.cuda.synchronize()
                assert mismatches(args[1].cpu(), expected) == 0, (entry.name, num_reqs, grid)


def test_direct_packed_rows_with_decreasing_starts():
    """Unchecked starts that decrease (docs/semantics.md): a direct packed row
    ends, leaves rows before the first start poisoned, and gives every other
    row some request whose start is at or below it -- with 4 requests (the
    warp's ballot) and with 36 (the search in global memory; the last 32
    start past every row)."""
    from kvgen.families.dequant_gather import op as ops

    rows = 240
    for i, entry in enumerate(_direct_packed_rows()):
        bs = entry.config["block_size"]
        for idle in (0, 32):
            # The first four requests have pages for `rows` positions each, so every row any of them may be
            # given reads mapped pages; the idle ones own no row.
            case = make_packed_case(seq_lens=[rows] * 4 + [0] * idle, block_size=bs, format=entry.config["format"],
                                    seed=i, rows=4 * rows)
            starts = torch.tensor([3, 150, 40, 170] + [rows] * idle, dtype=torch.int32)
            poisoned = clone_strided(case.out)[:rows]
            candidates = {}
            for r in range(4):  # each request's reading of every row at or after its start
                one = clone_strided(case.out)[:rows]
                dequantize_and_gather_packed_torch(one, case.k_cache, case.block_table[r:r + 1],
                                                   starts[r:r + 1], 1, None, bs)
                candidates[r] = one
            k_cache, out, block_table, _, num_reqs, _ = case.args("cuda")
            out = out[:rows]
            ops.launch_packed(entry, k_cache, out, block_table, starts.cuda(), num_reqs, None, pdl=entry.pdl)
            torch.cuda.synchronize()
            got = out.cpu()
            assert mismatches(got[:3], poisoned[:3]) == 0, (entry.name, idle)
            for t in range(3, rows):
                assert any(mismatches(got[t:t + 1], one[t:t + 1]) == 0
                           for r, one in candidates.items() if int(starts[r]) <= t), (entry.name, idle, t)


def _ballot_slot_patterns(num_slots: int, cache_slots: int, chunk: int) -> dict[str, torch.Tensor]:
    """Slot patterns the chunking of a warp's `chunk` slots must get right:
    nothing valid, everything valid, only the last (partial) chunk, whole empty
    chunks between valid ones (a warp loops over several chunks for one stage),
    negative slots other than -1, and only each chunk's top lane valid."""
    g = torch.Generator().manual_seed(num_slots)
    real = torch.randint(0, cache_slots, (num_slots,), generator=g, dtype=torch.int32)
    none = torch.full((num_slots,), -1, dtype=torch.int32)
    patterns = {"none": none.clone(), "all": real.clone()}
    last = none.clone()
    last[-(num_slots % chunk or chunk):] = real[-(num_slots % chunk or chunk):]
    patterns["last partial chunk"] = last
    sparse_runs = none.clone()
    sparse_runs[::97] = real[::97]  # most chunks empty, the rest with one valid lane
    patterns["one every 97"] = sparse_runs
    negative = real.clone()
    negative[1::3] = torch.randint(-2**31, 0, (len(negative[1::3]),), generator=g, dtype=torch.int32)
    patterns["negatives"] = negative
    top = none.clone()
    top[chunk - 1::chunk] = real[chunk - 1::chunk]
    patterns["top lane only"] = top
    return patterns


def test_ballot_rows_slot_patterns():
    """Every ballot- and compact-schedule row, on the dispatch grid, on one CTA
    and on two (a CTA over several chunks), over the slot patterns its chunking
    must handle, sized from its chunk (three CTAs' chunks, then a partial one
    whose second warp's chunk is partial too); rows of -1 (or any negative)
    slot stay poisoned."""
    from kvgen.families.dequant_gather import op as ops

    for i, entry in enumerate(_rows_here(schedule=CHUNKED_SCHEDULES)):
        c = entry.config
        bs = c["block_size"]
        chunk = c["ballot_chunk"]
        num_slots = 3 * chunk * c["num_warps"] + chunk + chunk // 2 + 1
        case = make_sparse_case(num_slots=num_slots, block_size=bs, format=c["format"], seed=i)
        cache_slots = case.k_cache.shape[0] * bs
        for name, slots in _ballot_slot_patterns(num_slots, cache_slots, chunk).items():
            case.slot_indices = slots
            expected = case.out.clone()
            dequantize_and_gather_sparse_torch(*case.args(out=expected))
            out, k_cache, slots_gpu, _ = case.args("cuda")
            for grid in (None, (1, 1, 1), (1, 2, 1)):
                out.view(torch.int16).fill_(POISON_BF16)
                ops.launch_entry_sparse(entry, out, k_cache, slots_gpu, grid=grid)
                torch.cuda.synchronize()
                assert mismatches(out.cpu(), expected) == 0, (entry.name, name, grid)


@pytest.mark.parametrize("pdl", [False, True])
def test_launch_paths_bit_exact(pdl, monkeypatch):
    """Both launches (cuLaunchKernel; cuLaunchKernelEx with programmatic stream
    serialization) give the reference bits."""
    from kvgen.families.dequant_gather import op as ops

    case = make_case(seq_lens=[700, 3, 129], gather_lens=[650, 3, 64], block_size=64, offset=5, seed=11)
    out, k_cache, seq_lens, gather_lens, block_table, block_size, offset = case.args("cuda")
    entry = ops.decide_dense(out, k_cache, seq_lens, gather_lens, block_table, block_size, offset).entry
    ops.launch_entry(entry, out, k_cache, seq_lens, gather_lens, block_table, offset, pdl=pdl)
    torch.cuda.synchronize()
    assert mismatches(out.cpu(), reference(case)) == 0


def test_a_cubin_the_driver_rejects_falls_back(tmp_path, monkeypatch):
    """Bytes that pass their sha256 check but that this driver refuses to load:
    the call falls back to Triton with a warning; forced, it is an error."""
    import hashlib
    import json
    import shutil

    from kvgen.runtime.loader import KvgenLoadError, reset_registry
    from kvgen.paths import generated_dir

    root = tmp_path / "generated"
    shutil.copytree(generated_dir(), root, ignore=shutil.ignore_patterns("__pycache__"))
    junk = b"\x7fELF" + bytes(range(256)) * 8
    manifest = json.loads((root / "manifest.json").read_text())
    for row in manifest["kernels"]:
        (root / row["cubin"]).write_bytes(junk)
        row["cubin_sha256"] = hashlib.sha256(junk).hexdigest()
    (root / "manifest.json").write_text(json.dumps(manifest))
    case = make_case(seq_lens=[300, 7], gather_lens=[200, 7], block_size=64, seed=12)
    try:
        reset_registry(root)
        out = case.out.to("cuda")
        with pytest.warns(RuntimeWarning, match="driver rejected"):
            kvgen.dequantize_and_gather_k_cache(*case.args("cuda", out=out))
        torch.cuda.synchronize()
        assert kvgen.last_backend() == "triton"
        assert mismatches(out.cpu(), reference(case)) == 0
        monkeypatch.setenv("KVGEN_BACKEND", "cubin")
        with pytest.raises(KvgenLoadError, match="driver rejected"):
            kvgen.dequantize_and_gather_k_cache(*case.args("cuda"))
    finally:
        reset_registry()


def pdl_chain(iterations: int = 20, graph: bool = False) -> int:
    """A kernel that reads what the kernel before it wrote, both launched with
    PDL: A gathers into `staging` on a deliberately small grid (4 CTAs, so it
    runs long), and lets dependents launch at once; B, the public op, reads
    `staging`'s bytes as its cache. B's grid runs beside A's on the idle SMs,
    so B is right only if it waits (griddepcontrol.wait) before reading.
    Returns the number of mismatching values."""
    from kvgen.families.dequant_gather import op as ops

    block_size, record = 64, 584
    a = make_case(seq_lens=[16384], block_size=16, seed=5)
    a_args = list(a.args("cuda"))
    a_entry = ops.decide_dense(*a_args).entry
    assert a_entry.pdl
    staging = a_args[0]  # [1, 16384, 512] bf16 = 16 MiB, written by A
    pages = staging.numel() * 2 // (block_size * record)
    as_cache = staging.view(torch.uint8).view(-1)[: pages * block_size * record].view(pages, block_size, record)
    g = torch.Generator().manual_seed(9)
    tokens = pages * block_size
    block_table = torch.randperm(pages, generator=g).to(torch.int32).view(1, pages).cuda()
    seq_lens = torch.tensor([tokens], dtype=torch.int32, device="cuda")
    out_b = poisoned_out(1, tokens, device="cuda")
    b_args = [out_b, as_cache, seq_lens, None, block_table, block_size, 0]

    def step():
        staging.view(torch.int16).fill_(0x7FBF)
        out_b.view(torch.int16).fill_(0x7FBF)
        out, k_cache, seq_lens_a, gather_lens, block_table_a, _, offset = a_args
        ops.launch_entry(a_entry, out, k_cache, seq_lens_a, gather_lens, block_table_a, offset, grid=(1, 4, 1), pdl=True)
        kvgen.dequantize_and_gather_k_cache(*b_args)

    bad = 0
    run_step = step
    if graph:
        step()  # load outside the capture
        torch.cuda.synchronize()
        cuda_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(cuda_graph):
            step()
        run_step = cuda_graph.replay
    for _ in range(iterations):
        run_step()
        torch.cuda.synchronize()
        expected = poisoned_out(1, tokens)
        dequantize_and_gather_torch(expected, as_cache.cpu(), seq_lens.cpu(), None, block_table.cpu(), block_size, 0)
        bad += mismatches(out_b.cpu(), expected)
    return bad


@pytest.mark.parametrize("graph", [False, True])
def test_pdl_kernel_waits_for_the_kernel_before_it(graph, monkeypatch):
    monkeypatch.setenv("KVGEN_BACKEND", "cubin")
    assert pdl_chain(iterations=10, graph=graph) == 0


# ------------------------------------------------------------------ writers
def writer_case(fmt_name, bs, seed, slot_dtype=torch.int64, specials=False, tokens=None):
    """k with random (or special) values, a poisoned cache with padded pages, slots
    in random page order with some -1, strided k rows: 3 * bs + 3 tokens in 4 pages,
    or `tokens` - 2 in pages enough for `tokens`."""
    from kvgen.testing import as_format

    fmt = as_format(fmt_name)
    g = torch.Generator().manual_seed(seed)
    tokens, num_blocks = (3 * bs + 5, 4) if tokens is None else (tokens, -(-tokens // bs) + 1)
    rows = torch.randn((tokens, fmt.head_dim + 8), generator=g) * 4
    if specials:  # NaN, ±Inf, zeros, subnormals, ties and huge values among the values
        bits = torch.randint(0, 1 << 16, (tokens, fmt.head_dim + 8), generator=g, dtype=torch.int32)
        rows = bits.to(torch.int16).view(torch.bfloat16).float()
    k = rows.to(torch.bfloat16)[:, : fmt.head_dim]  # strided rows
    page_bytes = bs * fmt.record_bytes + 48
    storage = torch.randint(0, 256, (num_blocks * page_bytes,), generator=g, dtype=torch.uint8)
    k_cache = storage.as_strided((num_blocks, bs, fmt.record_bytes), (page_bytes, fmt.record_bytes, 1))
    slots = torch.randperm(num_blocks * bs, generator=g)[:tokens]
    slots[torch.rand(tokens, generator=g) < 0.2] = -1
    return k, k_cache, slots.to(slot_dtype)[: tokens - 2], bs, fmt


def _on_gpu(t):
    from kvgen.testing import _to

    return _to(t, "cuda")


def test_every_shipped_writer_row_bit_exact():
    """Each writer cubin in the manifest, launched directly, against the torch reference: the whole cache storage."""
    from kvgen.families.quantize_insert import op as insert
    from kvgen.families.quantize_insert.config import tokens_per_step
    from kvgen.families.quantize_insert.reference import quantize_and_insert_torch
    from kvgen.runtime.loader import registry

    here = torch.cuda.get_device_capability()
    writers = [e for e in registry().entries if e.family == "qik" and ARCHS[e.arch].serves(here)]
    assert len(writers) >= 40
    for i, entry in enumerate(writers):
        c = entry.config
        dtype = torch.int64 if c["slot_dtype"] == "int64" else torch.int32
        pow2 = c.get("pow2_scale", False)
        for specials in (False, True):
            k, k_cache, slots, bs, fmt = writer_case(c["format"], c["block_size"], i, dtype, specials)
            expected = clone_strided(k_cache)
            quantize_and_insert_torch(k, expected, slots, bs, fmt, pow2_scale=pow2)
            k_gpu, slots_gpu = _on_gpu(k), _on_gpu(slots)
            # The dispatch grid; one and two CTAs (warps grid-stride over many tokens); full CTAs then light ones (the
            # template's light tail: a grid a little wider than one CTA for every `full` tokens); light CTAs
            # only, with idle ones past them.
            light = c["num_warps"] * tokens_per_step(entry.format)
            full = light * c["tokens_per_warp"]
            n = slots.shape[0]
            for grid in (None, 1, 2, -(-n // full) + 2, -(-n // light) + 3):
                cache_gpu = _on_gpu(k_cache)
                insert.launch_entry(entry, k_gpu, cache_gpu, slots_gpu, pdl=entry.pdl,
                                    grid=grid and (grid, 1, 1))
                torch.cuda.synchronize()
                assert torch.equal(whole_storage(cache_gpu).cpu(), whole_storage(expected)), (entry.name, specials,
                                                                                              grid)
            if fmt.tail:  # the tail from a tensor of its own (concat_and_cache_ds_mla's k_pe)
                values, tail = k[:, : fmt.values], k[:, fmt.values:].contiguous()
                cache_gpu = _on_gpu(k_cache)
                insert.launch_entry(entry, _on_gpu(values), cache_gpu, slots_gpu, pdl=entry.pdl, tail=_on_gpu(tail),
                                    checked=insert.validate_ds_mla(_on_gpu(values), _on_gpu(tail), cache_gpu,
                                                                   slots_gpu)[0])
                torch.cuda.synchronize()
                assert torch.equal(whole_storage(cache_gpu).cpu(), whole_storage(expected)), (entry.name, "tail")


def test_writer_rows_full_then_light_ctas_bit_exact():
    """A write long enough for the dispatch grid's full CTAs and its light tail together (the rows of block
    size 64 that load several tokens a warp, every format): the whole cache storage against the torch path."""
    from kvgen.families.quantize_insert import op as insert
    from kvgen.families.quantize_insert.reference import quantize_and_insert_torch
    from kvgen.runtime.loader import registry

    here = torch.cuda.get_device_capability()
    rows = [e for e in registry().entries if e.family == "qik" and ARCHS[e.arch].serves(here)
            and e.config["block_size"] == 64 and e.config["tokens_per_warp"] > 1]
    assert len(rows) >= 10
    for i, entry in enumerate(rows):
        dtype = torch.int64 if entry.config["slot_dtype"] == "int64" else torch.int32
        k, k_cache, slots, bs, fmt = writer_case(entry.config["format"], 64, i, dtype, tokens=6002)
        expected = clone_strided(k_cache)
        quantize_and_insert_torch(k, expected, slots, bs, fmt, pow2_scale=entry.config.get("pow2_scale", False))
        k_gpu, slots_gpu = _on_gpu(k), _on_gpu(slots)
        for light_ctas in (insert.LIGHT_CTAS, 37):  # the dispatch grid's light CTAs, or a few after more full ones
            cache_gpu = _on_gpu(k_cache)
            insert.launch_entry(entry, k_gpu, cache_gpu, slots_gpu, pdl=entry.pdl,
                                grid=insert.launch_grid(entry, slots.shape[0], light_ctas))
            torch.cuda.synchronize()
            assert torch.equal(whole_storage(cache_gpu).cpu(), whole_storage(expected)), (entry.name, light_ctas)


@pytest.mark.parametrize("backend", ["cubin", "triton"])
def test_writer_op_on_gpu_matches_torch(backend, monkeypatch):
    """The public writer on CUDA tensors: both formats, both views of the cache, both slot dtypes."""
    from kvgen.families.quantize_insert.reference import quantize_and_insert_torch

    monkeypatch.setenv("KVGEN_BACKEND", backend)
    for seed, (fmt_name, bs, dtype) in enumerate([("dsv4_584", 64, torch.int64), ("v41_528", 16, torch.int32),
                                                  ("dsv4_584", 256, torch.int32), ("v41_528", 128, torch.int64)]):
        k, k_cache, slots, bs, fmt = writer_case(fmt_name, bs, seed, dtype, specials=seed % 2 == 1)
        expected = clone_strided(k_cache)
        quantize_and_insert_torch(k, expected, slots, bs, fmt)
        cache_gpu = _on_gpu(k_cache)
        byte_view = cache_gpu.as_strided((cache_gpu.shape[0], cache_gpu.stride(0)), (cache_gpu.stride(0), 1))
        kvgen.quantize_and_insert_k_cache(_on_gpu(k), byte_view, _on_gpu(slots), bs, record_bytes=fmt.record_bytes)
        torch.cuda.synchronize()
        assert kvgen.last_backend() == backend
        assert torch.equal(whole_storage(cache_gpu).cpu(), whole_storage(expected)), (fmt_name, bs, dtype)


def test_writer_in_a_cuda_graph(monkeypatch):
    from kvgen.families.quantize_insert.reference import quantize_and_insert_torch

    monkeypatch.setenv("KVGEN_BACKEND", "cubin")
    k, k_cache, slots, bs, fmt = writer_case("dsv4_584", 64, 7)
    expected = clone_strided(k_cache)
    quantize_and_insert_torch(k, expected, slots, bs, fmt)
    k_gpu, cache_gpu, slots_gpu = _on_gpu(k), _on_gpu(k_cache), _on_gpu(slots)
    kvgen.quantize_and_insert_k_cache(k_gpu, cache_gpu, slots_gpu, bs)  # load outside the capture
    torch.cuda.synchronize()
    cache_gpu.copy_(_on_gpu(k_cache))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        kvgen.quantize_and_insert_k_cache(k_gpu, cache_gpu, slots_gpu, bs)
    cache_gpu.copy_(_on_gpu(k_cache))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(whole_storage(cache_gpu).cpu(), whole_storage(expected))
