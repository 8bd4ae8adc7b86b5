"""Is kvgen's gap to a copy the gather, or the traffic? (GPU; `python benchmarks/access_pattern.py`)

Timed side by side (bench.graph_times: CUDA-graph replays, interleaved rounds,
rotated past L2), for the bytes of each dense shape:
  kvgen            the shipped kernel, pages in random physical order (as in the bench)
  kvgen_in_order   the same kernel, pages in physical order (block table = arange)
  cast_1to2        torch's fp8 -> bf16 cast: a plain streaming kernel that reads
                   1 byte and writes 2 per value (kvgen's mix is 584 : 1024)
  memcpy           a device-to-device copy (1 : 1)
  stream_R_W       a plain streaming Triton kernel (no indirection, rows in order)
                   that reads R and writes W bytes per row: kvgen's 584 : 1024,
                   and 804 : 804 (the same bytes, a copy's 1 : 1 mix)
  stream_584_1024_paged  the same kernel reading its rows by pages of 64 rows
                   in random page order (as the bench's block tables lay a
                   request's pages; log 47): this kernel's bound on such a
                   gather, not every design's
and copies of one odd byte count rounded up to several granularities (the
bench saw 0.74-0.78 of the roofline for 133179 DSv4 tokens' bytes).
Each cell: µs, fraction of the 1 GiB roofline, (memcpy µs / its µs).
Results: BENCHMARKS.md, logs 11 and 47.
"""

import torch
import triton
import triton.language as tl

import kvgen
from kvgen.tools import bench
from kvgen.tools.bench import Shape, gpu_case, graph_times, in_physical_order



PAGE_ROWS = 64  # stream_584_1024_paged: rows a page, as the bench's block size


@triton.jit
def _stream(src, dst, pages, n_rows, R: tl.constexpr, W: tl.constexpr, RP: tl.constexpr, WP: tl.constexpr,
            ROWS: tl.constexpr, PAGED: tl.constexpr, PAGE: tl.constexpr):
    """Rows of R int32 words in, rows of W words out; every word read feeds the row's output.
    PAGED: out row r reads row pages[r // PAGE] * PAGE + r % PAGE."""
    rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS))[:, None]
    src_rows = rows
    if PAGED:
        page = tl.load(pages + rows // PAGE, mask=rows < n_rows, other=0)
        src_rows = page * PAGE + rows % PAGE
    rcols = tl.arange(0, RP)[None, :]
    x = tl.load(src + src_rows.to(tl.int64) * R + rcols, mask=(rows < n_rows) & (rcols < R), other=0)
    total = tl.sum(x, axis=1)[:, None]
    wcols = tl.arange(0, WP)[None, :]
    tl.store(dst + rows.to(tl.int64) * W + wcols, total + wcols, mask=(rows < n_rows) & (wcols < W))


def streams(tokens: int, sets: int, read_bytes: int, write_bytes: int, paged: bool = False):
    r, w = read_bytes // 4, write_bytes // 4
    n_pages = triton.cdiv(tokens, PAGE_ROWS)
    rows = n_pages * PAGE_ROWS  # whole pages of source rows
    cases = [(torch.randint(0, 1 << 20, (rows * r,), dtype=torch.int32, device="cuda"),
              torch.empty(tokens * w, dtype=torch.int32, device="cuda"),
              torch.randperm(n_pages, device="cuda").to(torch.int32) if paged else None) for _ in range(sets)]
    per_cta = 16
    grid = (triton.cdiv(tokens, per_cta),)
    return [lambda s=s, d=d, p=p: _stream[grid](s, d, p, tokens, r, w, triton.next_power_of_2(r),
                                                triton.next_power_of_2(w), per_cta, paged, PAGE_ROWS)
            for s, d, p in cases]


bench.copy_bandwidth()  # ramps the clocks
copy_bw = bench.copy_bandwidth()
l2 = torch.cuda.get_device_properties(0).L2_cache_size
for shape in (Shape("1x262144", (262144,)), Shape("8x16384", (16384,) * 8), Shape("64x2048", (2048,) * 64),
              Shape("1x65536", (65536,)), Shape("1x8192", (8192,)), Shape("32x8192 last128", (8192,) * 32, window=128)):
    working_set = shape.tokens * (584 + bench.WRITE_BYTES)
    sets = bench._set_count(working_set, l2)
    shuffled = [gpu_case(shape, seed) for seed in range(sets)]
    in_order = [in_physical_order(case, shape) for case in shuffled]
    values = working_set // 3  # read 1 byte, write 2
    casts = [(torch.empty(values, dtype=torch.uint8, device="cuda").random_(0, 120).view(torch.float8_e4m3fn),
              torch.empty(values, dtype=torch.bfloat16, device="cuda")) for _ in range(sets)]
    times = graph_times({
        "kvgen": [lambda a=a: kvgen.dequantize_and_gather_k_cache(*a) for a in shuffled],
        "kvgen_in_order": [lambda a=a: kvgen.dequantize_and_gather_k_cache(*a) for a in in_order],
        "cast_1to2": [lambda x=x, y=y: y.copy_(x) for x, y in casts],
        "memcpy": bench.same_bytes_copy(working_set, sets),
        "stream_584_1024": streams(shape.tokens, sets, 584, 1024),
        "stream_584_1024_paged": streams(shape.tokens, sets, 584, 1024, paged=True),
        "stream_804_804": streams(shape.tokens, sets, 804, 804),
    })
    roofline = working_set / copy_bw
    print(f"{shape.label:<10} " + "  ".join(f"{k} {t * 1e6:7.2f} us {roofline / t:.3f} ({times['memcpy'] / t:.3f})"
                                            for k, t in times.items()), flush=True)
    del shuffled, in_order, casts

odd = 133179 * (584 + bench.WRITE_BYTES) // 2
for granule in (1, 16, 4096, 1 << 16, 1 << 20):
    n = -(-odd // granule) * granule
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    t = graph_times({"": [lambda: dst.copy_(src)]})[""]
    print(f"copy of {n} bytes (rounded to {granule}): {t * 1e6:.2f} us, {2 * n / t / copy_bw:.3f} of the roofline",
          flush=True)
