"""The writer's public op on the CPU: every host-checkable mistake is one clear
error before any launch, KVGEN_CHECK refuses bad slots, dispatch picks the row
of the call's slot dtype, and the op is a torch custom op with a fake."""

import pytest
import torch

import kvgen
from kvgen.families.quantize_insert import op as insert
from kvgen.families.quantize_insert.reference import quantize_and_insert_torch
from kvgen.runtime import backend
from kvgen.testing import as_format, clone_strided


def good_args(record_bytes=584, slot_dtype=torch.int64, seed=0):
    fmt = as_format({584: "dsv4_584", 528: "v41_528"}[record_bytes])
    g = torch.Generator().manual_seed(seed)
    k = torch.randn((10, fmt.head_dim), generator=g).to(torch.bfloat16)
    k_cache = torch.randint(0, 256, (4, 16, fmt.record_bytes), generator=g, dtype=torch.uint8)
    slots = torch.tensor([3, -1, 17, 40, 63, 0, 20, -1], dtype=slot_dtype)
    return [k, k_cache, slots, 16]


def _set(i, value):
    def change(args):
        args[i] = value(args) if callable(value) else value
        return args
    return change


def _byte_view(args, pad=16, record_bytes=None):
    k, k_cache, slots, bs = args
    pages = k_cache.reshape(k_cache.shape[0], -1)
    padded = torch.zeros((pages.shape[0], pages.shape[1] + pad), dtype=torch.uint8)
    padded[:, : pages.shape[1]] = pages
    return [k, padded, slots, bs] + ([record_bytes] if record_bytes else [])


VALIDATION = {
    "k dtype": (_set(0, lambda a: a[0].float()), TypeError, "k: expected dtype torch.bfloat16"),
    "k rank": (_set(0, lambda a: a[0][0]), ValueError, "k: expected 2 dimensions"),
    "k width": (_set(0, lambda a: a[0][:, :256]), ValueError, "k: last dimension must be 512"),
    "k inner stride": (_set(0, lambda a: torch.zeros(10, 1024, dtype=torch.bfloat16)[:, ::2]), ValueError,
                       "k: innermost stride"),
    "cache dtype": (_set(1, lambda a: a[1].to(torch.int8)), TypeError, "k_cache: expected dtype torch.uint8"),
    "cache rank": (_set(1, lambda a: a[1][0, 0]), ValueError, "k_cache: expected \\[num_blocks, block_size"),
    "cache record size": (_set(1, lambda a: torch.zeros(4, 16, 600, dtype=torch.uint8)), ValueError,
                          "k_cache: no loaded format has 600-byte records"),
    "block_size type": (_set(3, 16.0), TypeError, "block_size: expected an int"),
    "block_size vs cache": (_set(3, 32), ValueError, "block_size: must equal k_cache.shape\\[1\\]"),
    "slots dtype": (_set(2, lambda a: a[2].float()), TypeError, "slot_mapping: expected dtype torch.int32 or"),
    "slots rank": (_set(2, lambda a: a[2][None]), ValueError, "slot_mapping: expected 1 dimension"),
    "slots longer than k": (_set(2, lambda a: torch.zeros(11, dtype=torch.int64)), ValueError,
                            "slot_mapping: 11 slots for 10 rows of k"),
    "slots not contiguous": (_set(2, lambda a: torch.zeros(16, dtype=torch.int64)[::2]), ValueError,
                             "slot_mapping: must be contiguous"),
    "devices differ": (_set(2, lambda a: a[2].to("meta")), ValueError, "slot_mapping: on meta, but k is on cpu"),
    "misaligned page stride": (_set(1, lambda a: torch.zeros(4 * (16 * 584 + 8), dtype=torch.uint8).as_strided(
        (4, 16, 584), (16 * 584 + 8, 584, 1))), ValueError, "multiple of 16 bytes"),
}


@pytest.mark.parametrize("rule", sorted(VALIDATION))
def test_validation(rule):
    mutate, error, message = VALIDATION[rule]
    args = mutate(good_args())
    before = clone_strided(args[1]) if isinstance(args[1], torch.Tensor) and args[1].device.type == "cpu" else None
    with pytest.raises(error, match=message):
        kvgen.quantize_and_insert_k_cache(*args)
    if before is not None:
        assert torch.equal(args[1], before)  # nothing written


def test_byte_view_takes_its_format_from_record_bytes():
    args = good_args(528)
    view = _byte_view(args, record_bytes=528)
    kvgen.quantize_and_insert_k_cache(*view)
    expected = clone_strided(_byte_view(args)[1])
    quantize_and_insert_torch(args[0], expected, args[2], 16, as_format("v41_528"))
    assert torch.equal(view[1], expected)
    with pytest.raises(ValueError, match="record_bytes: no loaded format has 600-byte records"):
        kvgen.quantize_and_insert_k_cache(*_byte_view(args, record_bytes=600))
    with pytest.raises(ValueError, match="block_size: 16 records of 584 bytes do not fit a page of 8464 bytes"):
        kvgen.quantize_and_insert_k_cache(*_byte_view(args))  # default 584: a 528-byte page is too small
    with pytest.raises(ValueError, match="record_bytes: 584 disagrees with k_cache.shape\\[-1\\] \\(528\\)"):
        kvgen.quantize_and_insert_k_cache(*args, record_bytes=584)


def test_only_the_first_slots_tokens_are_written_and_an_empty_call_launches_nothing():
    args = good_args()
    before = args[1].clone()
    kvgen.quantize_and_insert_k_cache(args[0], args[1], args[2][:0], 16)
    assert kvgen.last_backend() is None and torch.equal(args[1], before)
    kvgen.quantize_and_insert_k_cache(*args)
    assert kvgen.last_backend() == "torch"
    expected = before.clone()
    quantize_and_insert_torch(args[0][:8], expected, args[2], 16, as_format("dsv4_584"))
    assert torch.equal(args[1], expected)


@pytest.mark.parametrize("slots, message", [
    ([3, 99999], "slot_mapping: token 1 has slot 99999, outside \\[-1, 64\\)"),
    ([3, -2], "slot_mapping: token 1 has slot -2"),
    ([5, -1, 7, -1, 5], "slot_mapping: tokens 0 and 4 both write slot 5"),
])
def test_checked_mode_refuses_bad_slots(slots, message, monkeypatch):
    monkeypatch.setenv("KVGEN_CHECK", "1")
    args = good_args()
    args[2] = torch.tensor(slots, dtype=torch.int64)
    before = args[1].clone()
    with pytest.raises(ValueError, match=message):
        kvgen.quantize_and_insert_k_cache(*args)
    assert torch.equal(args[1], before)
    args[2] = torch.tensor([5, -1, 7, -1], dtype=torch.int32)  # -1 repeated is fine
    kvgen.quantize_and_insert_k_cache(*args)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_dispatch_takes_the_row_of_the_slot_dtype(dtype, monkeypatch):
    # A Hopper the shipped table was not tuned on: the untuned default (t2w4), whatever the H100's rules say.
    monkeypatch.setattr(backend, "device_info", lambda device: ("cuda", (9, 0), "an untuned Hopper"))
    monkeypatch.setattr(backend, "driver", lambda: "a driver")
    decision = insert.decide_insert(*good_args(slot_dtype=dtype))
    assert decision.backend == "cubin"
    assert decision.entry.family == "qik" and decision.entry.config["slot_dtype"] == str(dtype).split(".")[-1]
    assert decision.entry.config["tokens_per_warp"] == 2 and decision.entry.config["num_warps"] == 4
    monkeypatch.setattr(backend, "device_info", lambda device: ("cuda", (8, 0), "NVIDIA A100"))
    backend.clear_dispatch_cache()
    assert insert.decide_insert(*good_args(slot_dtype=dtype)).entry.arch == "sm_80"
    monkeypatch.setattr(backend, "device_info", lambda device: ("cuda", (7, 5), "an old GPU"))
    backend.clear_dispatch_cache()
    assert insert.decide_insert(*good_args(slot_dtype=dtype)).backend == "triton"


def test_misaligned_k_goes_to_triton(monkeypatch):
    monkeypatch.setattr(backend, "device_info", lambda device: ("cuda", (9, 0), "NVIDIA H100 80GB HBM3"))
    monkeypatch.setattr(backend, "driver", lambda: "a driver")
    args = good_args()
    args[0] = torch.zeros(10 * 512 + 1, dtype=torch.bfloat16)[1:].view(10, 512)
    assert insert.decide_insert(*args).backend == "triton"


def test_custom_op_is_registered_with_a_fake():
    args = good_args()
    expected = args[1].clone()
    quantize_and_insert_torch(args[0][:8], expected, args[2], 16, as_format("dsv4_584"))
    torch.ops.kvgen.quantize_and_insert_k_cache(*args)
    assert torch.equal(args[1], expected)
    torch.library.opcheck(torch.ops.kvgen.quantize_and_insert_k_cache.default, tuple(good_args()),
                          test_utils=("test_schema", "test_faketensor"))


def test_launch_grid_ends_in_light_ctas():
    """A row loading several tokens a warp: full CTAs for all but about LIGHT_CTAS light CTAs' tokens, then
    those; a short write is light CTAs only; a row loading one token at a time keeps its ONE_TOKEN_CTAS cap."""
    from kvgen.families.quantize_insert.config import tokens_per_step
    from kvgen.runtime.loader import registry

    rows = {e.name: e for e in registry().entries}
    t4 = rows["qik_v41_288_f512_b64_t4_w4_int64_p1_sm_90a"]  # 16 tokens a full CTA, 4 a light one
    assert insert.launch_grid(t4, 65536) == ((65536 - insert.LIGHT_CTAS * 4) // 16 + insert.LIGHT_CTAS, 1, 1)
    assert insert.launch_grid(t4, 100) == (25, 1, 1)
    assert insert.launch_grid(t4, 1) == (1, 1, 1)
    assert insert.launch_grid(t4, 1 << 30) == (insert.MAX_WORKERS, 1, 1)
    t1 = rows["qik_dsv4_584_f448_b64_t1_w4_int64_p1_sm_90a"]
    assert insert.launch_grid(t1, 65536) == (insert.ONE_TOKEN_CTAS, 1, 1)
    assert insert.launch_grid(t1, 100) == (25, 1, 1)
    # The template's split of the grid it is given (its `heavy`, transcribed) gives exactly the full CTAs the
    # host planned, and they and the light ones cover every token: for each row shape, many token counts.
    for name in ("qik_v41_288_f512_b64_t4_w4_int64_p1_sm_90a", "qik_dsv4_584_f448_b64_t2_w4_int64_p1_sm_90a",
                 "qik_indexer_132_f128_b64_t4_w4_int64_p1_sm_90a_o32"):
        entry = rows[name]
        light = entry.config["num_warps"] * tokens_per_step(entry.format)
        full = light * entry.config["tokens_per_warp"]
        for n in [*range(1, 20000, 97), 65536, 65540, 262147]:
            for light_ctas in (0, 5, insert.LIGHT_CTAS):
                grid = insert.launch_grid(entry, n, light_ctas)[0]
                heavy = max((n - light * grid + full - light - 1) // (full - light), 0)
                assert heavy == max(n - light_ctas * light, 0) // full, (name, n, light_ctas)
                assert heavy * full + (grid - heavy) * light >= n > heavy * full + (grid - heavy - 1) * light
