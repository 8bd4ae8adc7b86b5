"""KVGEN_CHECK=1: every class of bad device-side index is refused before any
launch, with the argument, the request (or row) and the value named, and
nothing written. On the CPU, and on a CUDA device (marker gpu) through the
cubin backend."""

import pytest
import torch

import kvgen
from kvgen.testing import make_case, make_sparse_case, mismatches

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def dense_args(device):
    # Request 0 reads block-table columns 1..3 (positions 20..59, block size 16);
    # column 0 and the poisoned columns past 3 are never read.
    case = make_case(seq_lens=[60, 17], gather_lens=[40, 17], block_size=16, offset=1, seed=3)
    return list(case.args(device))


def poke(t, index, value):
    t[index] = value
    return t


DENSE = {
    "page past the cache": (lambda a: poke(a[4], (0, 2), a[1].shape[0]), "block_table: request 0, column 2 holds page"),
    "negative page": (lambda a: poke(a[4], (1, 1), -7), "block_table: request 1, column 1 holds page -7"),
    "gather_len > seq_len": (lambda a: poke(a[3], 1, 18), "gather_lens: request 1 gathers 18 tokens of a seq_len of 17"),
    "negative gather_len": (lambda a: poke(a[3], 0, -1), "gather_lens: request 0 gathers -1"),
    "seq_len past the table": (lambda a: (poke(a[2], 1, 16 * a[4].shape[1] + 1), poke(a[3], 1, 1)),
                               "seq_lens: request 1 has seq_len 81, past its block-table row's capacity"),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rule", sorted(DENSE))
def test_bad_dense_values_are_refused(rule, device, monkeypatch):
    monkeypatch.setenv("KVGEN_CHECK", "1")
    if device == "cuda":
        monkeypatch.setenv("KVGEN_BACKEND", "cubin")
    args = dense_args(device)
    spoil, message = DENSE[rule]
    spoil(args)
    before = args[0].clone()
    with pytest.raises(ValueError, match=message):
        kvgen.dequantize_and_gather_k_cache(*args)
    assert mismatches(args[0], before) == 0  # nothing written


@pytest.mark.parametrize("device", DEVICES)
def test_entries_the_call_does_not_read_are_not_checked(device, monkeypatch):
    """Column 0 of request 0 lies before its gather window: a junk page there is fine."""
    monkeypatch.setenv("KVGEN_CHECK", "1")
    args = dense_args(device)
    assert int(args[4][0, 4]) < 0  # poisoned, unused
    expected = args[0].clone()
    kvgen.dequantize_and_gather_k_cache(*args)
    poke(args[4], (0, 0), 10**6)
    out = expected.clone()
    kvgen.dequantize_and_gather_k_cache(out, *args[1:])
    assert mismatches(out, args[0]) == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("slot, message", [(10**6, "slot_indices: row 3 holds slot 1000000, outside \\[-1, "),
                                           (-2, "slot_indices: row 3 holds slot -2")])
def test_bad_slots_are_refused(device, slot, message, monkeypatch):
    monkeypatch.setenv("KVGEN_CHECK", "1")
    if device == "cuda":
        monkeypatch.setenv("KVGEN_BACKEND", "cubin")
    case = make_sparse_case(num_slots=40, valid=0.5, block_size=16, seed=4)
    out, k_cache, slots, block_size = case.args(device)
    slots[3] = slot
    before = out.clone()
    with pytest.raises(ValueError, match=message):
        kvgen.dequantize_and_gather_k_cache_sparse(out, k_cache, slots, block_size)
    assert mismatches(out, before) == 0
    slots[3] = k_cache.shape[0] * block_size - 1  # the last slot: fine
    kvgen.dequantize_and_gather_k_cache_sparse(out, k_cache, slots, block_size)


def test_the_switch_is_read_at_each_call(monkeypatch):
    args = dense_args("cpu")
    poke(args[3], 1, 18)  # gather_len > seq_len
    monkeypatch.setenv("KVGEN_CHECK", "0")
    with pytest.raises(ValueError, match="gather_lens: a request gathers more"):  # the torch path's own check
        kvgen.dequantize_and_gather_k_cache(*args)
    monkeypatch.setenv("KVGEN_CHECK", "1")
    with pytest.raises(ValueError, match="gather_lens: request 1"):
        kvgen.dequantize_and_gather_k_cache(*args)
    monkeypatch.setenv("KVGEN_CHECK", "sometimes")
    with pytest.raises(ValueError, match="KVGEN_CHECK=.sometimes.: expected 1 or 0"):
        kvgen.dequantize_and_gather_k_cache(*dense_args("cpu"))


@pytest.mark.gpu
def test_check_refuses_to_run_inside_graph_capture(monkeypatch):
    monkeypatch.setenv("KVGEN_CHECK", "1")
    args = dense_args("cuda")
    kvgen.dequantize_and_gather_k_cache(*args)  # warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(ValueError, match="CUDA-graph capture"):
        with torch.cuda.graph(graph):
            kvgen.dequantize_and_gather_k_cache(*args)


def test_packed_calls_are_checked(monkeypatch):
    """KVGEN_CHECK=1 on the packed gathers: starts out of order, a position past the
    block-table row, a page outside the cache -- each one line, nothing written."""
    import kvgen
    from kvgen.testing import make_packed_case, make_raw_packed_case

    monkeypatch.setenv("KVGEN_CHECK", "1")
    case = make_packed_case(seq_lens=[20, 9], block_size=16, format="v32_656", seed=1)
    src, dst, block_table, starts, batch, _ = case.args()
    before = dst.clone()
    bad_starts = starts.flip(0).contiguous()
    with pytest.raises(ValueError, match="workspace_starts: entry 1 .* below entry 0"):
        kvgen.cp_gather_and_upconvert_fp8_kv_cache(src, dst, block_table, bad_starts, batch)
    with pytest.raises(ValueError, match="block_table: request 0 reads position"):
        kvgen.cp_gather_and_upconvert_fp8_kv_cache(src, dst, block_table, starts, batch,
                                                   torch.tensor([40, 0], dtype=torch.int32))
    with pytest.raises(ValueError, match="seq_starts: request 1 starts at position -3"):
        kvgen.cp_gather_and_upconvert_fp8_kv_cache(src, dst, block_table, starts, batch,
                                                   torch.tensor([0, -3], dtype=torch.int32))
    table = block_table.clone()
    table[1, 0] = src.shape[0]
    with pytest.raises(ValueError, match="request 1, column 0 holds page"):
        kvgen.cp_gather_and_upconvert_fp8_kv_cache(src, dst, table, starts, batch)
    assert torch.equal(dst.view(torch.int16), before.view(torch.int16))

    raw = make_raw_packed_case(seq_lens=[5, 7], block_size=16, seed=2)
    kv_cache, dst_k, dst_scale, table, cu = raw.args()
    with pytest.raises(ValueError, match="cu_seq_lens: the last request ends at row 12, past the output's 10 rows"):
        kvgen.cp_gather_indexer_k_quant_cache(kv_cache, dst_k[:10], dst_scale[:10], table, cu)
    table = table.clone()
    table[0, 0] = -1
    with pytest.raises(ValueError, match="request 0, column 0 holds page -1"):
        kvgen.cp_gather_indexer_k_quant_cache(kv_cache, dst_k, dst_scale, table, cu)
    assert bool((dst_k == 0xA5).all())
