"""The four entry points of issue 15 on the CPU (the torch path): each user
mistake is one TypeError/ValueError naming the argument, raised before
anything is written; vLLM's own argument dtypes are accepted."""

import pytest
import torch

import kvgen
from kvgen.families.dequant_gather.reference import gather_raw_packed_torch
from kvgen.testing import POISON_BYTE, as_format, make_packed_case, make_raw_packed_case


def _packed():
    return make_packed_case(seq_lens=[20, 9], block_size=16, format="v32_656", seed=1).args()


def _raw():
    return make_raw_packed_case(seq_lens=[5, 7], block_size=16, seed=2).args()


def _writer(fmt_name, tokens=6, block_size=16, blocks=2):
    fmt = as_format(fmt_name)
    k = torch.randn(tokens, fmt.head_dim).to(torch.bfloat16)
    cache = torch.zeros(blocks, block_size, fmt.record_bytes, dtype=torch.uint8)
    return fmt, k, cache, torch.arange(tokens, dtype=torch.int64)


def _call_packed(change):
    src, dst, table, starts, batch, seq_starts = _packed()
    args = dict(src_cache=src, dst=dst, block_table=table, workspace_starts=starts, batch_size=batch,
                seq_starts=seq_starts)
    args.update(change(args))
    kvgen.cp_gather_and_upconvert_fp8_kv_cache(**args)


@pytest.mark.parametrize("change, error, message", [
    (lambda a: {"batch_size": 2.0}, TypeError, "batch_size: expected an int"),
    (lambda a: {"batch_size": -1}, ValueError, r"batch_size: must be in \[0, 2\^30\)"),
    (lambda a: {"batch_size": 3}, ValueError, "block_table: 2 rows for 3 requests"),
    (lambda a: {"dst": a["dst"][:, :500]}, ValueError, "dst: last dimension must be 576"),
    (lambda a: {"dst": a["dst"].float()}, TypeError, "dst: expected dtype torch.bfloat16"),
    (lambda a: {"workspace_starts": a["workspace_starts"].long()}, TypeError, "workspace_starts: expected dtype"),
    (lambda a: {"seq_starts": torch.zeros(1, dtype=torch.int32)}, ValueError, "seq_starts: 1 entries for 2"),
    (lambda a: {"src_cache": a["src_cache"][:, :0]}, ValueError, r"src_cache: its block size \(shape\[1\]\)"),
    (lambda a: {"src_cache": a["src_cache"].view(-1)}, ValueError, "src_cache: expected a uint8"),
])
def test_packed_gather_refuses(change, error, message):
    with pytest.raises(error, match=message):
        _call_packed(change)


def _call_raw(change):
    kv, dst_k, dst_scale, table, cu = _raw()
    args = dict(kv_cache=kv, dst_k=dst_k, dst_scale=dst_scale, block_table=table, cu_seq_lens=cu)
    args.update(change(args))
    kvgen.cp_gather_indexer_k_quant_cache(**args)


@pytest.mark.parametrize("change, error, message", [
    (lambda a: {"dst_k": a["dst_k"][:, :64]}, ValueError, "dst_k: rows must be 128 bytes"),
    (lambda a: {"dst_scale": a["dst_scale"][:, :2]}, ValueError, "dst_scale: rows must be 4 bytes"),
    (lambda a: {"dst_scale": a["dst_scale"][:3]}, ValueError, "dst_scale: 3 rows for dst_k's"),
    (lambda a: {"dst_k": a["dst_k"].t()}, ValueError, "dst_k: innermost stride must be 1"),
    (lambda a: {"dst_k": [1, 2]}, TypeError, "dst_k: expected a torch.Tensor"),
    (lambda a: {"cu_seq_lens": torch.zeros(0, dtype=torch.int32)}, ValueError, "cu_seq_lens: expected"),
    (lambda a: {"kv_cache": torch.zeros(2, 16, 584, dtype=torch.uint8)}, ValueError, "with a 64-value bf16 tail"),
    (lambda a: {"kv_cache": torch.zeros(2, 16, 656, dtype=torch.uint8)}, ValueError, "v32_656 is inline"),
])
def test_raw_gather_refuses(change, error, message):
    with pytest.raises(error, match=message):
        _call_raw(change)


def test_raw_gather_takes_vllms_dtypes():
    """vLLM passes dst_k as float8_e4m3fn and may pass the scales as float32 [T, 1]: the same bytes land."""
    case = make_raw_packed_case(seq_lens=[5, 0, 7], block_size=16, first_row=1, seed=3)
    exp_k, exp_s = case.dst_k.clone(), case.dst_scale.clone()
    gather_raw_packed_torch(*case.reference_args(dst_k=exp_k, dst_scale=exp_s))
    kv, dst_k, dst_scale, table, cu = case.args()
    fp8 = dst_k.view(torch.float8_e4m3fn)
    f32 = dst_scale.view(torch.float32)  # [T, 1]
    kvgen.cp_gather_indexer_k_quant_cache(kv, fp8, f32, table, cu)
    assert torch.equal(fp8.view(torch.uint8), exp_k) and torch.equal(f32.view(torch.uint8), exp_s)
    assert int((exp_k[0] == POISON_BYTE).sum()) == 128  # row 0 is before cu_seq_lens[0]: untouched


@pytest.mark.parametrize("change, error, message", [
    (lambda a: {"kv_c": a["kv_c"][:, :500]}, ValueError, "kv_c: last dimension must be 512"),
    (lambda a: {"k_pe": a["k_pe"][:, :32]}, ValueError, "k_pe: last dimension must be 64"),
    (lambda a: {"k_pe": a["k_pe"][:3]}, ValueError, "k_pe: 3 rows for kv_c's 6"),
    (lambda a: {"kv_c": a["kv_c"].float()}, TypeError, "kv_c: expected dtype torch.bfloat16"),
    (lambda a: {"kv_cache": torch.zeros(2, 16, 528, dtype=torch.uint8)}, ValueError, "has no bf16 tail"),
    (lambda a: {"kv_cache": a["kv_cache"].view(2, -1)}, ValueError, "kv_cache: expected \\[num_blocks"),
    (lambda a: {"kv_cache": a["kv_cache"][:, :0]}, ValueError, r"kv_cache: its block size \(shape\[1\]\)"),
    (lambda a: {"slot_mapping": a["slot_mapping"].float()}, TypeError, "slot_mapping: expected dtype"),
])
def test_ds_mla_writer_refuses(change, error, message):
    fmt, k, cache, slots = _writer("v32_656")
    args = dict(kv_c=k[:, :512].contiguous(), k_pe=k[:, 512:].contiguous(), kv_cache=cache, slot_mapping=slots)
    args.update(change(args))
    before = cache.clone()
    with pytest.raises(error, match=message):
        kvgen.concat_and_cache_ds_mla(**args)
    assert torch.equal(cache, before)


@pytest.mark.parametrize("change, error, message", [
    (lambda a: {"quant_block_size": 64}, ValueError, "quant_block_size: format indexer_132 has one scale per 128"),
    (lambda a: {"quant_block_size": 128.0}, TypeError, "quant_block_size: expected an int"),
    (lambda a: {"scale_fmt": 5}, TypeError, "scale_fmt: expected a str or None"),
    (lambda a: {"kv_cache": torch.zeros(2, 16, 528, dtype=torch.uint8)}, ValueError, "has ue8m0 scales"),
    (lambda a: {"k": a["k"][:, :64]}, ValueError, "k: last dimension must be 128"),
])
def test_indexer_writer_refuses(change, error, message):
    fmt, k, cache, slots = _writer("indexer_132")
    args = dict(k=k, kv_cache=cache, slot_mapping=slots, quant_block_size=128, scale_fmt="ue8m0")
    args.update(change(args))
    before = cache.clone()
    with pytest.raises(error, match=message):
        kvgen.indexer_k_quant_and_cache(**args)
    assert torch.equal(cache, before)


def test_byte_view_message_names_the_cache():
    """A page too small for block_size records: the message names k_cache.shape[1]."""
    fmt, k, _, slots = _writer("v41_288")
    with pytest.raises(ValueError, match=r"do not fit a page of 100 bytes \(k_cache.shape\[1\]\)"):
        kvgen.quantize_and_insert_k_cache(k, torch.zeros(2, 100, dtype=torch.uint8), slots, 16, record_bytes=288)


@pytest.mark.parametrize("fmt", ["indexer_132", "v41_288"])
def test_packed_with_many_requests(fmt, monkeypatch):
    """17 requests, runs of empty ones, seq_starts: five levels of the request search. The torch
    path, the oracle and the Triton fallback (interpreter) agree on every row."""
    from kvgen.families.dequant_gather.oracle import dequantize_and_gather_packed_oracle
    from kvgen.families.dequant_gather.triton import dequantize_and_gather_packed_triton
    from kvgen.testing import clone_strided, mismatches

    lens = [3, 0, 0, 5, 1, 0, 7, 2, 0, 4, 6, 0, 1, 1, 0, 3, 2]
    case = make_packed_case(seq_lens=lens, block_size=4, format=fmt, workspace_gap=2,
                            seq_starts=[i % 3 for i in range(len(lens))], rows=2 + sum(lens) + 3, seed=7)
    outs = []
    for run in (lambda a: kvgen.cp_gather_and_upconvert_fp8_kv_cache(*a),
                lambda a: dequantize_and_gather_packed_oracle(a[1], a[0], a[2], a[3], a[4], a[5], 4)):
        args = case.args()
        run(args)
        outs.append(args[1])
    assert mismatches(outs[0], outs[1]) == 0
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    out = clone_strided(case.out)
    dequantize_and_gather_packed_triton(out, case.k_cache, case.block_table, case.workspace_starts, len(lens),
                                        case.seq_starts, 4)
    assert mismatches(out, outs[0]) == 0
