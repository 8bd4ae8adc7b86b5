"""GPU tests of the three formats of issue 15 and the packed gathers, through
the public ops and dispatch (marker `gpu`; skipped without CUDA): every
backend that can serve the call on this GPU gives the torch reference's bits."""

import pytest
import torch

import kvgen
from kvgen.families.dequant_gather.config import STAGED_REQS
from kvgen.families.dequant_gather.reference import (dequantize_and_gather_packed_torch,
                                                     dequantize_and_gather_sparse_torch, dequantize_and_gather_torch,
                                                     gather_raw_packed_torch)
from kvgen.families.quantize_insert.reference import quantize_and_insert_torch
from kvgen.testing import (as_format, clone_strided, make_case, make_packed_case, make_raw_packed_case,
                           make_sparse_case, mismatches, whole_storage)

pytestmark = pytest.mark.gpu

NEW_FORMATS = ("v41_288", "v32_656", "indexer_132")
BACKENDS = ("cubin", "ptx", "triton")


def _served_by(backend, monkeypatch):
    monkeypatch.setenv("KVGEN_BACKEND", backend)
    from kvgen.runtime.backend import clear_dispatch_cache

    clear_dispatch_cache()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt", NEW_FORMATS)
@pytest.mark.parametrize("raw", [False, True])
def test_dense_and_sparse(fmt, backend, raw, monkeypatch):
    _served_by(backend, monkeypatch)
    for bs in (16, 64):
        case = make_case(seq_lens=[3 * bs + 5, 7, 0, bs], gather_lens=[2 * bs, 7, 0, 3], block_size=bs, format=fmt,
                         offset=1, raw_bytes=raw, seed=bs, page_pad=32)
        expected = case.out.clone()
        dequantize_and_gather_torch(*case.args(out=expected))
        out = case.out.cuda()
        kvgen.dequantize_and_gather_k_cache(*case.args("cuda", out=out))
        torch.cuda.synchronize()
        assert kvgen.last_backend() == backend
        assert mismatches(out.cpu(), expected) == 0, (fmt, bs, "dense")

        sparse = make_sparse_case(num_slots=2 * bs + 3, valid=0.7, block_size=bs, format=fmt, raw_bytes=raw,
                                  seed=bs + 1)
        expected = sparse.out.clone()
        dequantize_and_gather_sparse_torch(*sparse.args(out=expected))
        out = sparse.out.cuda()
        kvgen.dequantize_and_gather_k_cache_sparse(*sparse.args("cuda", out=out))
        torch.cuda.synchronize()
        assert mismatches(out.cpu(), expected) == 0, (fmt, bs, "sparse")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt", ("dsv4_584", "v41_528") + NEW_FORMATS)
def test_packed(fmt, backend, monkeypatch):
    _served_by(backend, monkeypatch)
    many = [3, 0, 0, 5, 1, 0, 7, 2, 0, 4, 6, 0, 1, 1, 0, 3, 2]  # 17 requests: five levels of the search
    # More requests than a CTA stages in shared memory: searched in global memory.
    unstaged = [i % 3 for i in range(STAGED_REQS + 9)]
    for bs, lens, seq_starts in ((16, None, None), (64, None, [3, 0, 70]), (16, many, [i % 3 for i in range(17)]),
                                 (16, unstaged, [i % 5 for i in range(len(unstaged))])):
        lens = lens or [2 * bs + 3, 0, 9]
        case = make_packed_case(seq_lens=lens, block_size=bs, format=fmt, seq_starts=seq_starts,
                                workspace_gap=3, rows=3 + sum(lens) + 20, raw_bytes=bs == 64, seed=bs, row_pad=8)
        expected = clone_strided(case.out)
        dequantize_and_gather_packed_torch(*case.reference_args(out=expected))
        args = case.args("cuda")
        kvgen.cp_gather_and_upconvert_fp8_kv_cache(*args)
        torch.cuda.synchronize()
        assert kvgen.last_backend() == backend
        assert mismatches(args[1].cpu(), expected) == 0, (fmt, bs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_raw_packed(backend, monkeypatch):
    _served_by(backend, monkeypatch)
    unstaged = [i % 4 for i in range(STAGED_REQS + 3)]  # searched in global memory, not staged
    for bs, lens in ((16, None), (64, None), (32, unstaged)):
        case = make_raw_packed_case(seq_lens=lens or [2 * bs + 3, 0, 9, bs], block_size=bs, first_row=2,
                                    raw_bytes=bs == 16, seed=bs)
        exp_k, exp_s = case.dst_k.clone(), case.dst_scale.clone()
        gather_raw_packed_torch(*case.reference_args(dst_k=exp_k, dst_scale=exp_s))
        kv_cache, dst_k, dst_scale, block_table, cu = case.args("cuda")
        kvgen.cp_gather_indexer_k_quant_cache(kv_cache, dst_k, dst_scale, block_table, cu)
        torch.cuda.synchronize()
        assert kvgen.last_backend() == backend
        assert torch.equal(dst_k.cpu(), exp_k) and torch.equal(dst_scale.cpu(), exp_s), bs


def _writer_inputs(fmt, bs, seed, specials):
    g = torch.Generator().manual_seed(seed)
    tokens, num_blocks = 2 * bs + 5, 3
    if specials:
        bits = torch.randint(0, 1 << 16, (tokens, fmt.head_dim), generator=g, dtype=torch.int32)
        k = bits.to(torch.int16).view(torch.bfloat16)
    else:
        k = (torch.randn((tokens, fmt.head_dim), generator=g) * 3).to(torch.bfloat16)
    page_bytes = bs * fmt.record_bytes + 16
    storage = torch.randint(0, 256, (num_blocks * page_bytes,), generator=g, dtype=torch.uint8)
    k_cache = storage.as_strided((num_blocks, bs, fmt.record_bytes), (page_bytes, fmt.record_bytes, 1))
    slots = torch.randperm(num_blocks * bs, generator=g)[:tokens]
    slots[torch.rand(tokens, generator=g) < 0.2] = -1
    return k, k_cache, slots


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("specials", [False, True])
def test_writers(backend, specials, monkeypatch):
    _served_by(backend, monkeypatch)
    for bs in (16, 64):
        # NVFP4 through quantize_and_insert_k_cache, on the byte view with record_bytes=288.
        fmt = as_format("v41_288")
        k, k_cache, slots = _writer_inputs(fmt, bs, bs, specials)
        expected = clone_strided(k_cache)
        quantize_and_insert_torch(k, expected, slots, bs, fmt)
        cache = clone_strided(k_cache, "cuda")
        byte_view = cache.as_strided((cache.shape[0], bs * 288), (cache.stride(0), 1), cache.storage_offset())
        kvgen.quantize_and_insert_k_cache(k.cuda(), byte_view, slots.cuda(), bs, record_bytes=288)
        torch.cuda.synchronize()
        assert kvgen.last_backend() == backend
        assert torch.equal(whole_storage(cache).cpu(), whole_storage(expected)), ("v41_288", bs)

        fmt = as_format("v32_656")
        k, k_cache, slots = _writer_inputs(fmt, bs, bs + 1, specials)
        expected = clone_strided(k_cache)
        quantize_and_insert_torch(k, expected, slots, bs, fmt)
        cache = clone_strided(k_cache, "cuda")
        kv_c, k_pe = k[:, :512].contiguous().cuda(), k[:, 512:].contiguous().cuda()
        kvgen.concat_and_cache_ds_mla(kv_c, k_pe, cache, slots.cuda())
        torch.cuda.synchronize()
        assert torch.equal(whole_storage(cache).cpu(), whole_storage(expected)), ("v32_656", bs)

        fmt = as_format("indexer_132")
        for scale_fmt in ("ue8m0", None):
            k, k_cache, slots = _writer_inputs(fmt, bs, bs + 2, specials)
            expected = clone_strided(k_cache)
            quantize_and_insert_torch(k, expected, slots, bs, fmt, pow2_scale=scale_fmt == "ue8m0")
            cache = clone_strided(k_cache, "cuda")
            kvgen.indexer_k_quant_and_cache(k.cuda(), cache, slots.to(torch.int32).cuda(), 128, scale_fmt)
            torch.cuda.synchronize()
            assert torch.equal(whole_storage(cache).cpu(), whole_storage(expected)), ("indexer_132", bs, scale_fmt)


def test_packed_in_a_cuda_graph(monkeypatch):
    monkeypatch.delenv("KVGEN_BACKEND", raising=False)
    case = make_packed_case(seq_lens=[100, 37], block_size=64, format="v32_656", seed=3)
    expected = clone_strided(case.out)
    dequantize_and_gather_packed_torch(*case.reference_args(out=expected))
    args = case.args("cuda")
    kvgen.cp_gather_and_upconvert_fp8_kv_cache(*args)  # load outside capture
    assert kvgen.last_backend() == "cubin"  # the graph holds the cubin, not a fallback
    args[1].view(torch.int16).fill_(0x7FBF)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        kvgen.cp_gather_and_upconvert_fp8_kv_cache(*args)
    graph.replay()
    torch.cuda.synchronize()
    assert mismatches(args[1].cpu(), expected) == 0
