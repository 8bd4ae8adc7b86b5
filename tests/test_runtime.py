"""The runtime half on the CPU: validation, dispatch (capability mocked), fallbacks, imports."""

import hashlib
import json
import importlib.util
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import kvgen
from kvgen.runtime import backend
from kvgen.families.dequant_gather import op as ops
from kvgen.runtime import dispatch
from kvgen.tools import tune
from kvgen.runtime.dispatch import TARGET_CTAS, CallKey, candidate_rows, choose_row, launch_grid, shape_class
from kvgen.runtime.loader import KvgenLoadError, registry, reset_registry
from kvgen.paths import generated_dir
from kvgen.families.dequant_gather.oracle import dequantize_and_gather_oracle, dequantize_and_gather_sparse_oracle
from kvgen.families.dequant_gather.reference import dequantize_and_gather_torch
from kvgen.testing import make_case, mismatches, whole_storage


def good_args():
    case = make_case(seq_lens=[40, 17], gather_lens=[30, 17], block_size=16, offset=1, seed=3)
    return list(case.args())


def _replace(i, value):
    def change(args):
        args[i] = value(args) if callable(value) else value
        return args
    return change


# Each rule of the issue: (mutation, exception, text naming the argument).
VALIDATION = {
    "out dtype": (_replace(0, lambda a: a[0].float()), TypeError, "out: expected dtype"),
    "out rank": (_replace(0, lambda a: a[0][0]), ValueError, "out: expected 3 dimensions"),
    "out last dim": (_replace(0, lambda a: torch.zeros(2, 5, 256, dtype=torch.bfloat16)), ValueError, "out: last dimension"),
    "out innermost stride": (_replace(0, lambda a: torch.zeros(2, 5, 1024, dtype=torch.bfloat16)[..., ::2]), ValueError, "out: innermost stride"),
    "out not a tensor": (_replace(0, None), TypeError, "out: expected a torch.Tensor"),
    "cache dtype": (_replace(1, lambda a: a[1].to(torch.int8)), TypeError, "k_cache: expected dtype"),
    "cache rank": (_replace(1, lambda a: a[1][0]), ValueError, "k_cache: expected 3"),
    "cache record size": (_replace(1, lambda a: torch.zeros(4, 16, 576, dtype=torch.uint8)), ValueError, "k_cache: last dimension"),
    "cache page stride not /16": (_replace(1, lambda a: torch.zeros(4 * (16 * 584 + 8), dtype=torch.uint8).as_strided((4, 16, 584), (16 * 584 + 8, 584, 1))), ValueError, "multiple of 16"),
    "cache page stride too small": (_replace(1, lambda a: torch.zeros(8 * 16 * 584, dtype=torch.uint8).as_strided((4, 16, 584), (16 * 584 - 16, 584, 1))), ValueError, "smaller than a page"),
    "cache rows not contiguous": (_replace(1, lambda a: torch.zeros(4, 16, 600, dtype=torch.uint8)[..., :584]), ValueError, "contiguous"),
    "cache misaligned": (_replace(1, lambda a: torch.zeros(4 * 16 * 584 + 1, dtype=torch.uint8)[1:].view(4, 16, 584)), ValueError, "16-byte aligned"),
    "seq_lens dtype": (_replace(2, lambda a: a[2].long()), TypeError, "seq_lens: expected dtype"),
    "seq_lens rank": (_replace(2, lambda a: a[2][None]), ValueError, "seq_lens: expected 1"),
    "gather_lens dtype": (_replace(3, lambda a: a[3].long()), TypeError, "gather_lens: expected dtype"),
    "gather_lens shape": (_replace(3, lambda a: a[3][:1]), ValueError, "gather_lens: shape"),
    "block_table dtype": (_replace(4, lambda a: a[4].long()), TypeError, "block_table: expected dtype"),
    "block_table rank": (_replace(4, lambda a: a[4][0]), ValueError, "block_table: expected 2"),
    "block_table rows": (_replace(4, lambda a: a[4][:1]), ValueError, "block_table: shape\\[0\\]"),
    "block_table inner stride": (_replace(4, lambda a: a[4].t().contiguous().t()), ValueError, "block_table: innermost"),
    "out rows": (_replace(0, lambda a: a[0][:1]), ValueError, "out: shape\\[0\\]"),
    "block_size mismatch": (_replace(5, 32), ValueError, "block_size: must equal"),
    "block_size type": (_replace(5, 16.0), TypeError, "block_size: expected an int"),
    "offset negative": (_replace(6, -1), ValueError, "offset: must be >= 0"),
    "offset past out": (_replace(6, 10_000), ValueError, "offset: must be <="),
    "offset type": (_replace(6, True), TypeError, "offset: expected an int"),
    "devices differ": (_replace(2, lambda a: a[2].to("meta")), ValueError, "seq_lens: on meta, but out is on cpu .all tensors must be on one device"),
}


@pytest.mark.parametrize("rule", sorted(VALIDATION))
def test_validation(rule):
    mutate, error, message = VALIDATION[rule]
    args = mutate(good_args())
    with pytest.raises(error, match=message):
        kvgen.dequantize_and_gather_k_cache(*args)


def test_valid_call_and_empty_batches():
    args = good_args()
    kvgen.dequantize_and_gather_k_cache(*args)
    assert kvgen.last_backend() == "torch"
    empty = make_case(seq_lens=[], block_size=16)
    kvgen.dequantize_and_gather_k_cache(*empty.args())
    assert kvgen.last_backend() is None  # nothing launched
    args = good_args()
    before = args[0].clone()
    args[6] = args[0].shape[1]  # offset == out.shape[1]: no room, nothing written
    kvgen.dequantize_and_gather_k_cache(*args)
    assert mismatches(args[0], before) == 0


def test_torch_path_rejects_out_of_range_values():
    args = good_args()
    args[3] = torch.tensor([50, 17], dtype=torch.int32)  # gather_len > seq_len
    with pytest.raises(ValueError, match="gather_lens"):
        kvgen.dequantize_and_gather_k_cache(*args)


# ------------------------------------------------------------------ dispatch
def key(**kw):
    fields = (("indexing", kw.pop("indexing", "dense")), ("gather_lens", kw.pop("gather_lens", True)))
    base = dict(family="dqgk", format="dsv4_584", block_size=64, fields=fields, capability=(9, 0))
    return CallKey(**{**base, **kw})


def test_rows_filter_on_exact_capability_and_shape():
    from kvgen.config import ARCHS

    entries = registry().entries
    assert candidate_rows(entries, key())
    for capability in [(8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (10, 3), (12, 0), (12, 1), (9, 1), (11, 0), (7, 5)]:
        rows = candidate_rows(entries, key(capability=capability))
        cubins = {e.arch for e in rows if not ARCHS[e.arch].ptx}  # exactly the arch of that capability
        assert cubins == {a.name for a in ARCHS.values() if not a.ptx and a.compute_capability == capability}
        ptx = {e.arch for e in rows if ARCHS[e.arch].ptx}  # every PTX target at or below it
        assert ptx == {a.name for a in ARCHS.values() if a.ptx and a.compute_capability <= capability}
    assert candidate_rows(entries, key(capability=None)) == []
    assert candidate_rows(entries, key(block_size=8)) == []
    assert all(e.config["gather_lens"] is False for e in candidate_rows(entries, key(gather_lens=False)))
    chosen = choose_row(candidate_rows(entries, key()))
    assert chosen.config["num_stages"] == 4 and chosen.config["num_warps"] == 4


def test_launch_grid_is_bounded_by_host_quantities():
    entry = choose_row(candidate_rows(registry().entries, key()))
    assert launch_grid(entry, 1, 262144) == (1, 32768, 1)
    assert launch_grid(entry, 32, 128) == (32, 32, 1)
    assert launch_grid(entry, 256, 256) == (256, 64, 1)
    assert launch_grid(entry, 256, 1 << 20) == (256, 128, 1)
    assert launch_grid(entry, 4, 1) == (4, 1, 1)
    # A schedule that fixes a warp's share (the ballot's chunk of 32 slots): 4 warps a CTA.
    assert launch_grid(entry, 1, 65536, rows_per_warp=32) == (1, 512, 1)
    assert launch_grid(entry, 1, 65537, rows_per_warp=32) == (1, 513, 1)
    # A packed gather's warps take two rows each (PACKED_MIN_STEPS), the indexer's lane groups four steps.
    packed = {e.format.name: e for e in registry().entries if e.config.get("indexing") == "packed"
              and e.config["block_size"] == 64 and e.arch == "sm_90a" and e.config.get("output", "bf16") == "bf16"
              and e.config["schedule"] == "strided"}
    from kvgen.families.dequant_gather import op as ops

    steps = ops.PACKED_MIN_STEPS
    assert launch_grid(packed["v41_288"], 1, 65536, min_steps=steps) == (1, 8192, 1)
    assert launch_grid(packed["indexer_132"], 1, 65536, tokens_per_step=4, min_steps=steps) == (1, 1024, 1)
    assert ops.grid_for(packed["v41_288"], 1, 65536) == (1, 8192, 1)  # the family's grid asks for them


def test_a_direct_row_gives_each_warp_a_block_of_its_lane_groups_records():
    """Under the direct schedule a warp's block is num_stages records a lane group:
    the indexer's 128 bf16 out (16 chunks) are 16 lanes' work, two records a
    warp a pass; NVFP4's 512 (64 chunks) the whole warp's, two chunks a lane."""
    from kvgen.families.dequant_gather import op as ops

    rows = {(e.format.name, e.config["num_stages"], e.config["num_warps"]): e for e in registry().entries
            if e.config.get("schedule") == "direct" and e.config["block_size"] == 64
            and e.config["indexing"] == "sparse" and not e.config.get("evict_first")}
    assert ops.grid_for(rows[("indexer_132", 4, 4)], 1, 262144) == (1, 262144 // (4 * 2 * 4), 1)
    assert ops.grid_for(rows[("indexer_132", 2, 8)], 1, 65537) == (1, -(-65537 // (8 * 2 * 2)), 1)
    assert ops.grid_for(rows[("v41_288", 4, 4)], 1, 262144) == (1, 262144 // (4 * 1 * 4), 1)
    assert ops.grid_for(rows[("v41_288", 2, 8)], 1, 1 << 22) == (1, ops.TARGET_CTAS, 1)  # held: blocks grid-stride
    # The kernel's block is the grid's rows a warp: the same number, stated once.
    source = (generated_dir() / "kvgen_kernels" / f"{rows[('indexer_132', 4, 4)].name}.py").read_text()
    assert "BLOCK_ROWS = 8  #" in source


def test_a_page_run_row_gives_each_cta_one_run_at_a_time():
    """A CTA per run of run_tokens positions (one more where a window may start
    inside a run), the grid held near TARGET_CTAS; its CTAs grid-stride over the rest."""
    from kvgen.families.dequant_gather import op as ops

    rows = [e for e in registry().entries if e.family == "dqgk" and e.config["schedule"] == "page_run"]
    assert {(e.config["block_size"], e.config["run_tokens"]) for e in rows} >= {(16, 16), (64, 32), (256, 32)}
    for entry in rows:
        run = entry.config["run_tokens"]
        extra = 1 if entry.config["gather_lens"] else 0
        assert ops._grid(entry, 1, 65536) == (1, 65536 // run + extra, 1), entry.name
        assert ops._grid(entry, 32, 128) == (32, -(-128 // run) + extra, 1), entry.name
        assert ops._grid(entry, 1, 1 << 22) == (1, 32768, 1), entry.name
        assert ops._grid(entry, 4, 0) == (4, 1, 1), entry.name


def test_ballot_and_compact_rows_give_each_warp_one_chunk_of_slots():
    """A ballot row's warp takes one chunk of slots; a compact row's CTA one chunk
    of num_warps such chunks, compacted together."""
    from kvgen.families.dequant_gather import op as ops
    from kvgen.families.dequant_gather.config import CHUNKED_SCHEDULES

    rows = [e for e in registry().entries if e.family == "dqgk" and e.config["schedule"] in CHUNKED_SCHEDULES]
    assert {(e.config["schedule"], e.config["ballot_chunk"]) for e in rows} == {
        ("ballot", 8), ("ballot", 16), ("ballot", 32), ("compact", 4), ("compact", 16)}
    for entry in rows:
        chunk, warps = entry.config["ballot_chunk"], entry.config["num_warps"]
        assert ops._grid(entry, 1, 65536) == (1, 65536 // (chunk * warps), 1), entry.name
        assert ops._grid(entry, 1, 65537) == (1, 65536 // (chunk * warps) + 1, 1), entry.name  # a partial chunk
        assert ops._grid(entry, 1, 2**30) == (1, TARGET_CTAS, 1), entry.name  # held: CTAs stride over chunks


def test_shape_classes_follow_host_known_sizes():
    assert shape_class(1, 8192) == "short" and shape_class(32, 128) == "short"
    assert shape_class(64, 2048) == "many_requests" and shape_class(256, 256) == "many_requests"
    assert shape_class(1, 262144) == "long" and shape_class(4, 131072) == "long"
    assert shape_class(8, 16384) == "long"
    assert [c.name for c in dispatch.SHAPE_CLASSES][-1] == CallKey("dqgk", "l", 1, (), None).shape_class


def _measured(shape, cls, times, default="s4w4s"):
    prefer = {v: {"num_stages": int(v[1]), "num_warps": int(v[3]), "schedule": "strided" if v[4] == "s" else "contiguous"}
              for v in times}
    return {"shape": shape, "match": {"format": "dsv4_584", "indexing": "dense", "shape_class": cls},
            "default": default, "us": times, "prefer": prefer}


def test_every_schedule_has_its_own_letter_in_variant_names():
    """Variant names (tune's measurements, bench's columns) tell every schedule
    apart, and each schedule that a field sizes carries that field."""
    from kvgen.families.dequant_gather.config import SCHEDULES
    from kvgen.tools.variants import SCHEDULE_LETTERS, variant_of

    assert set(SCHEDULE_LETTERS) == set(SCHEDULES)
    letters = [letter for letter, _ in SCHEDULE_LETTERS.values()]
    assert len(set(letters)) == len(letters)
    names = {variant_of(e.config) for e in registry().entries if e.family == "dqgk"}
    assert {"s4w4k4", "s8w4k16", "s8w8k16", "s4w4b16", "s1w8p32", "s4w4s"} <= names


def test_tune_writes_a_rule_only_past_the_margin():
    measured = [
        _measured("a", "long", {"s4w4s": 100.0, "s4w8c": 95.0, "s2w4s": 101.0}),
        _measured("b", "long", {"s4w4s": 50.0, "s4w8c": 48.0, "s2w4s": 49.0}),
        _measured("c", "short", {"s4w4s": 10.0, "s4w8c": 9.9, "s2w4s": 10.1}),  # 1%: noise, no rule
    ]
    rules, groups = tune.choose_rules(measured, margin=0.02)
    assert rules == [{"match": {"format": "dsv4_584", "indexing": "dense", "shape_class": "long"},
                      "prefer": {"num_stages": 4, "num_warps": 8, "schedule": "contiguous"}}]
    assert [g["rule"] for g in groups] == ["s4w8c", None]
    assert groups[0]["relative_time"]["s4w8c"] == pytest.approx((0.95 * 0.96) ** 0.5, abs=1e-4)
    # A variant not timed on every shape of its group is never chosen.
    measured[1]["us"].pop("s4w8c")
    rules, groups = tune.choose_rules(measured, margin=0.02)
    assert rules == [] and "s4w8c" not in groups[0]["relative_time"]


def test_tune_writes_a_rule_faster_on_every_shape_and_past_the_margin_on_one():
    """Inside the margin on the geometric mean, a variant faster on every shape of its group and past the
    margin on one is a rule (log 48's indexer packed rows: 0.994 and 0.967); past the margin on one shape but
    slower on another, it is not."""
    measured = [_measured("a", "long", {"s4w4s": 100.0, "s4w8c": 99.4, "s2w4s": 103.0}),
                _measured("b", "long", {"s4w4s": 50.0, "s4w8c": 48.35, "s2w4s": 48.0})]
    rules, groups = tune.choose_rules(measured, margin=0.02)
    assert groups[0]["relative_time"]["s4w8c"] > 0.98 and [g["rule"] for g in groups] == ["s4w8c"]
    measured[0]["us"]["s4w8c"] = 100.5  # now slower on shape a
    assert tune.choose_rules(measured, margin=0.02)[0] == []


def test_tune_keeps_a_held_rule_while_it_still_wins():
    """Hysteresis: a rule the device's entry holds stays while its variant is still the best and beats the
    default at all; inside the margin a variant that is not held, or a held one no longer best or no longer
    faster, gives no rule."""
    measured = [_measured("a", "long", {"s4w4s": 100.0, "s4w8c": 99.0, "s2w4s": 99.5}),
                _measured("b", "long", {"s4w4s": 50.0, "s4w8c": 49.5, "s2w4s": 49.9})]
    key = (None, "dsv4_584", "dense", None, None, "long")  # tune.MATCH_FIELDS' values (these shapes name no family)
    assert tune.choose_rules(measured)[0] == []
    assert [g["rule"] for g in tune.choose_rules(measured, held={key: "s4w8c"})[1]] == ["s4w8c"]
    assert tune.choose_rules(measured, held={key: "s2w4s"})[0] == []  # held, but no longer the best
    measured[0]["us"]["s4w8c"] = measured[1]["us"]["s4w8c"] = 1000.0
    measured[0]["us"]["s2w4s"], measured[1]["us"]["s2w4s"] = 100.5, 50.1
    assert tune.choose_rules(measured, held={key: "s2w4s"})[0] == []  # the best, but slower than the default
    entries = [{"tuned_on": {"device": "X"}, "groups": [{"match": {"family": "dqgk", "format": "dsv4_584",
                                                                   "indexing": "dense", "shape_class": "long"},
                                                         "rule": "s4w8c"}, {"match": {}, "rule": None}]},
               {"tuned_on": {"device": "Y"}, "groups": [{"match": {}, "rule": "s2w4s"}]}]
    assert tune.held_rules(entries, "X") == {("dqgk", "dsv4_584", "dense", None, None, "long"): "s4w8c"}


def test_tuning_some_families_keeps_the_others_measurements(tmp_path):
    """tune --family F replaces the groups F measured on this device (every shape
    class of them, renamed shapes included): the others' measurements (and so
    their rules) stay; another device's measurements are not this device's."""
    import json

    def measured(shape, fmt, cls="long"):
        m = _measured(shape, cls, {"s4w4s": 1.0})
        m["match"] = {**m["match"], "family": "dqgk", "format": fmt}
        return m

    old = {"format": 1, "tuned_on": {"device": "GPU A"},
           "measured": [measured("a", "dsv4_584"), measured("a short", "dsv4_584", "short"),
                        measured("b", "v41_528")]}
    path = tmp_path / "dispatch.json"
    new = [measured("a renamed", "dsv4_584")]
    assert tune.old_entries(path) == []  # no table yet
    path.write_text(json.dumps(old))  # a table of the first format: one device's
    entries = tune.old_entries(path)
    assert [m["shape"] for m in tune.kept_measurements(entries, "GPU A", new)] == ["b"]
    assert tune.kept_measurements(entries, "GPU B", new) == []
    path.write_text(json.dumps(tune.merged_table(entries, {"tuned_on": {"device": "GPU B"}, "measured": new})))
    entries = tune.old_entries(path)
    assert [e["tuned_on"]["device"] for e in entries] == ["GPU A", "GPU B"]
    assert [m["shape"] for m in tune.kept_measurements(entries, "GPU A", new)] == ["b"]
    assert tune.kept_measurements(entries, "GPU B", new) == []
    # A table tune cannot add to is refused before any timing, never overwritten: its entries would be lost.
    for bad, why in (({**old, "format": tune.FORMAT + 1}, "written by a later kvgen"), ({**old, "format": 0}, "format 0"),
                     ({"format": 2, "devices": [{"rules": []}]}, "KeyError"),
                     ({"format": 2, "devices": [old, old]}, "once"), ("not json", "JSONDecodeError")):
        path.write_text(bad if isinstance(bad, str) else json.dumps(bad))
        with pytest.raises(ValueError, match=why):
            tune.old_entries(path)


def test_tune_refuses_a_table_it_cannot_add_to_before_timing(tmp_path, monkeypatch, capsys):
    """`kvgen tune --out FILE` over a table it cannot read: exit 2 and one line, before any device work; the
    file is left as it was."""
    from kvgen.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *a: pytest.fail("timed before reading"))
    path = tmp_path / "dispatch.json"
    path.write_text('{"format": 99, "devices": []}')
    assert main(["tune", "--out", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "written by a later kvgen" in err and len(err.splitlines()) == 1
    assert path.read_text() == '{"format": 99, "devices": []}'


def test_tuning_on_a_device_keeps_the_other_devices_tables():
    """merged_table: this device's entry replaces its old one; the others stay as they were, in name order."""
    a, b, b_new, c = ({"tuned_on": {"device": d}, "rules": [n]} for d, n in
                      (("GPU A", 1), ("GPU B", 2), ("GPU B", 3), ("GPU C", 4)))
    table = tune.merged_table([c, b, a], b_new)
    assert table == {"format": tune.FORMAT, "devices": [a, b_new, c]}
    assert tune.merged_table([], a)["devices"] == [a]


TUNED_ON = "NVIDIA H100 80GB HBM3"  # the device of the committed dispatch table
LONG_RULE = {"match": {"format": "dsv4_584", "indexing": "dense", "shape_class": "long"},
             "prefer": {"num_stages": 4, "num_warps": 8, "schedule": "contiguous"}}


def test_a_rule_or_row_older_than_a_parameter_means_its_default():
    """choose_row: a preference that does not name a parameter added after the
    kernels shipped (named_at_default=False: evict_first) prefers its default,
    and a row built before it has it -- so a rule tuned before evict_first
    existed keeps its plain row whatever the names sort to."""
    from types import SimpleNamespace as Row

    plain = Row(name="z_plain", family="dqgk", config={"schedule": "compact", "num_stages": 8, "evict_first": False})
    streaming = Row(name="a_streaming", family="dqgk", config={"schedule": "compact", "num_stages": 8,
                                                               "evict_first": True})
    older = Row(name="b_older", family="dqgk", config={"schedule": "compact", "num_stages": 8})
    rule = {"schedule": "compact", "num_stages": 8}
    assert dispatch.UNNAMED_DEFAULTS["dqgk"]["evict_first"] is False  # entered by the family's op module
    assert choose_row([streaming, plain], rule) is plain
    assert choose_row([streaming, older], rule) is older
    assert choose_row([plain, streaming], {**rule, "evict_first": True}) is streaming
    assert choose_row([streaming, plain]) is plain  # the untuned default


def test_tuned_rules_choose_the_row_for_their_class(fake_gpu, monkeypatch):
    fake_gpu((9, 0))
    registry().entries  # load the trees, then give them one tuned rule
    monkeypatch.setattr(registry(), "_tuned", [dispatch.TunedTable({TUNED_ON: (LONG_RULE,)})])
    long_case = make_case(seq_lens=[20000], block_size=64)
    short_case = make_case(seq_lens=[70], block_size=64)
    chosen = ops.decide_dense(*long_case.args()).entry.config
    assert (chosen["num_warps"], chosen["schedule"], chosen["pdl"]) == (8, "contiguous", True)
    assert ops.decide_dense(*short_case.args()).entry.config["num_warps"] == 4  # another class: the default
    # KVGEN_PDL=0 outranks the rule: a row built without griddepcontrol, where one is shipped.
    monkeypatch.setenv("KVGEN_PDL", "0")
    assert ops.decide_dense(*long_case.args()).entry.pdl is False


def _tree_with_rule(tmp_path, device, table_format=tune.FORMAT, others=()):
    """A copy of the shipped tree whose table gives `device` LONG_RULE (and each of `others` no rules)."""
    root = tmp_path / "generated"
    shutil.copytree(generated_dir(), root, ignore=shutil.ignore_patterns("__pycache__"))
    entry = {"tuned_on": {"device": device}, "rules": [LONG_RULE]}
    if table_format == 1:
        table = {"format": 1, **entry}
    else:
        table = tune.merged_table([{"tuned_on": {"device": d}, "rules": []} for d in others], entry)
    (root / dispatch.DISPATCH_TABLE).write_text(json.dumps(table))
    return root


def test_tuned_rules_come_from_the_loaded_tree_and_its_device(tmp_path, fake_gpu):
    """A tree's rules steer calls only while that tree is loaded, and only on a
    device of the name they were tuned on."""
    long_case = make_case(seq_lens=[20000], block_size=64)
    warps = lambda: ops.decide_dense(*long_case.args()).entry.config["num_warps"]  # noqa: E731
    fake_gpu((9, 0), TUNED_ON)
    try:
        reset_registry(_tree_with_rule(tmp_path / "a", TUNED_ON))
        assert warps() == 8
        fake_gpu((9, 0), "NVIDIA H200")  # same compute capability, another device
        backend.clear_dispatch_cache()
        assert warps() == 4
        reset_registry(_tree_with_rule(tmp_path / "b", "NVIDIA H200"))
        assert warps() == 8
        fake_gpu((9, 0), TUNED_ON)
        reset_registry(_tree_with_rule(tmp_path / "c", "NVIDIA H200"))
        assert warps() == 4
        reset_registry(_tree_with_rule(tmp_path / "d", TUNED_ON, table_format=1))  # a table of the first format
        assert warps() == 8
        # One table, an entry a device: each device gets its own entry's rules, whichever comes first.
        for device, other in ((TUNED_ON, "NVIDIA H200"), ("NVIDIA H200", TUNED_ON), ("NVIDIA H200", "ZZ GPU")):
            reset_registry(_tree_with_rule(tmp_path / f"e {device} {other}", device, others=(other,)))
            fake_gpu((9, 0), device)
            assert warps() == 8, (device, other)
            fake_gpu((9, 0), other)
            backend.clear_dispatch_cache()
            assert warps() == 4, (device, other)
        fake_gpu((9, 0), TUNED_ON)
    finally:
        reset_registry()
    assert warps() == 4  # the shipped table has no dense rule


def test_a_malformed_dispatch_table_is_one_clear_error(tmp_path, fake_gpu):
    root = _tree_with_rule(tmp_path, TUNED_ON)
    (root / dispatch.DISPATCH_TABLE).write_text('{"format": 2, "devices": [{"rules": []}]}')  # no tuned_on
    fake_gpu((9, 0))
    try:
        reset_registry(root)
        with pytest.raises(ValueError, match="not a dispatch table this kvgen reads"):
            kvgen.select_backend(*good_args())
    finally:
        reset_registry()


def test_committed_dispatch_table_is_well_formed():
    path = generated_dir() / dispatch.DISPATCH_TABLE
    if not path.exists():
        pytest.skip("no tuned dispatch table committed")
    table = json.loads(path.read_text())
    assert table["format"] == tune.FORMAT
    devices = [e["tuned_on"]["device"] for e in table["devices"]]
    assert TUNED_ON in devices and devices == sorted(set(devices))  # one entry a device, in name order
    for device_entry in table["devices"]:
        _check_tuned_entry(device_entry)


def _check_tuned_entry(table: dict) -> None:
    """One device's entry: rules that match call fields, prefer shipped rows, and follow from its measurements."""
    import collections
    import dataclasses

    from kvgen.families import FAMILIES
    from kvgen.families.quantize_insert import op as writer_ops

    # The config fields a call fixes (the CallKey fields the families' ops pass), beside format, block size and arch.
    call_fields = sorted({name for fields in (*ops.DENSE_FIELDS.values(), ops.SPARSE_FIELDS,
                                              *ops.PACKED_FIELDS.values(), *writer_ops.WRITE_FIELDS.values())
                         for name, _ in fields})

    key_fields = {f.name for f in dataclasses.fields(CallKey)} | set(tune.MATCH_FIELDS)
    classes = {c.name for c in dispatch.SHAPE_CLASSES}
    entries = registry().entries
    for rule in table["rules"]:
        # A rule matches its family's call fields and prefers its family's generator parameters.
        config_fields = {f.name for f in dataclasses.fields(FAMILIES[rule["match"]["family"]])}
        assert set(rule["match"]) <= key_fields | config_fields, rule
        assert set(rule["prefer"]) <= set(tune.TUNED_FIELDS) & config_fields - {"pdl"}, rule
        assert rule["match"].get("shape_class", "long") in classes
        # Every rule prefers a row that is shipped for its format and indexing, and one
        # only of each block size, gather_lens, pdl and arch: where several match what
        # it names, one of them has the defaults of what it does not name
        # (dispatch.UNNAMED_DEFAULTS: evict_first=False for a rule older than it).
        named = {k: v for k, v in {**rule["prefer"], **rule["match"]}.items() if k in config_fields}
        groups = collections.defaultdict(list)  # the rows one call may choose among
        for e in entries:
            if e.family == rule["match"]["family"] and all(e.config.get(k) == v for k, v in named.items()):
                groups[e.config["block_size"], e.pdl, e.arch, *(e.config.get(k) for k in call_fields)].append(e)
        assert groups, rule
        for group in groups.values():
            defaults = [e for e in group if all(e.config.get(k, v) == v
                                                for k, v in dispatch.UNNAMED_DEFAULTS[e.family].items()
                                                if k not in named)]
            assert len(group) == 1 or len(defaults) == 1, (rule, [e.name for e in group])
    assert tune.choose_rules(table["measured"], table["margin"], tune.held_rules([table], table["tuned_on"]["device"]))[0] \
        == table["rules"]



def test_the_raw_gathers_rules_steer_only_raw_calls():
    """The shipped table's rules for the raw packed gather (page_run rows) match
    on output: the bf16 packed gather of the same format keeps its own (the
    direct schedule, short and long, since log 48)."""
    from kvgen.families.dequant_gather.op import PACKED_FIELDS

    rules = dispatch.read_tuned_table(generated_dir()).rules_for(TUNED_ON)
    for size_class, bf16_schedule in (("short", "direct"), ("long", "direct")):
        raw = CallKey("dqgk", "indexer_132", 64, PACKED_FIELDS["raw"], (9, 0), size_class)
        assert dispatch.preference_for(raw, rules)["schedule"] == "page_run"
        bf16 = CallKey("dqgk", "indexer_132", 64, PACKED_FIELDS["bf16"], (9, 0), size_class)
        assert (dispatch.preference_for(bf16, rules) or {}).get("schedule") == bf16_schedule


def test_tune_times_the_raw_gather_in_both_classes():
    shapes = tune.family_shapes("raw")
    assert {dispatch.shape_class(1, s.tokens) for s in shapes} == {"short", "long"}
    assert all(s.op == "raw" for s in shapes)


def test_tune_times_the_small_records_gathers_in_every_class():
    """dense_formats, sparse_formats and packed_formats: both tail-less formats, every shape class
    a call of theirs can have, sparse ones at low and full valid fractions; the
    shipped table sends their long sparse calls to the direct schedule."""
    from kvgen.tools.bench import Shape, SparseShape

    dense, sparse = tune.family_shapes("dense_formats"), tune.family_shapes("sparse_formats")
    assert all(isinstance(s, Shape) for s in dense) and all(isinstance(s, SparseShape) for s in sparse)
    for shapes in (dense, sparse):
        assert {s.format for s in shapes} == {"indexer_132", "v41_288"}
    assert {dispatch.shape_class(len(s.seq_lens), max(s.seq_lens)) for s in dense} == {"short", "long",
                                                                                       "many_requests"}
    assert {dispatch.shape_class(1, s.num_slots) for s in sparse} == {"short", "long"}
    assert {s.valid for s in sparse} == {0.03, 0.25, 1.0}
    packed = tune.family_shapes("packed_formats")
    assert {s.format for s in packed} == {"indexer_132", "v41_288"} and {s.op for s in packed} == {"packed"}
    assert {dispatch.shape_class(1, s.tokens) for s in packed} == {"short", "long"}
    rules = dispatch.read_tuned_table(generated_dir()).rules_for(TUNED_ON)
    for fmt in ("indexer_132", "v41_288"):
        key = CallKey("dqgk", fmt, 64, (("indexing", "sparse"), ("gather_lens", False)), (9, 0), "long")
        assert dispatch.preference_for(key, rules)["schedule"] == "direct"


def test_the_clis_tune_families_are_the_benchmarks():
    from kvgen import cli
    from kvgen.tools import bench, bench_formats

    assert set(cli.TUNE_FAMILIES) == set(bench.FAMILIES) | set(bench_formats.TUNE_FAMILIES)


def test_tune_skips_a_shape_no_cubin_row_serves(monkeypatch):
    """On an A100 the raw gather has PTX rows only: tune skips its shapes (nothing
    to choose among) instead of failing after timing every other family."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    assert tune._measure_packed_shape(tune.family_shapes("raw")[0], 50 << 20) is None

@pytest.fixture
def fake_gpu(monkeypatch):
    """Pretend the CPU tensors live on a GPU of the given compute capability,
    with a CUDA driver to load cubins (no launch happens in these tests)."""
    def set_capability(capability, name=TUNED_ON):
        monkeypatch.setattr(backend, "device_info", lambda device: ("cuda", capability, name))
        monkeypatch.setattr(backend, "driver", lambda: "a driver")
    return set_capability


@pytest.mark.parametrize("capability, expected", [((9, 0), "cubin"), ((8, 0), "cubin"), ((8, 9), "cubin"),
                                                  ((10, 0), "cubin"), ((12, 0), "cubin"), ((11, 0), "ptx"),
                                                  ((7, 5), "triton")])
def test_dispatch_by_capability(fake_gpu, capability, expected):
    fake_gpu(capability)
    assert kvgen.select_backend(*good_args()) == expected


def test_dispatch_without_a_cubin_for_the_shape(fake_gpu):
    fake_gpu((9, 0))
    case = make_case(seq_lens=[20], block_size=8)
    decision = ops.decide_dense(*case.args())
    assert decision.backend == "triton" and "no cubin for" in decision.reason


def test_dispatch_misaligned_out_avoids_the_cubin(fake_gpu):
    fake_gpu((9, 0))
    args = good_args()
    args[0] = torch.zeros(2 * 31 * 512 + 1, dtype=torch.bfloat16)[1:].view(2, 31, 512)
    assert kvgen.select_backend(*args) == "triton"


def test_dispatch_without_triton_goes_to_torch(fake_gpu, monkeypatch):
    fake_gpu((7, 5))
    monkeypatch.setattr(backend, "_available", lambda m: m != "triton")
    assert kvgen.select_backend(*good_args()) == "torch"


def test_cpu_tensors_go_to_torch():
    assert kvgen.select_backend(*good_args()) == "torch"


def test_forced_backends(fake_gpu, monkeypatch):
    monkeypatch.setenv("KVGEN_BACKEND", "cubin")
    with pytest.raises(kvgen.BackendUnavailable, match="not a CUDA device"):
        kvgen.dequantize_and_gather_k_cache(*good_args())
    fake_gpu((7, 5))
    with pytest.raises(kvgen.BackendUnavailable, match="no cubin for"):
        kvgen.select_backend(*good_args())
    monkeypatch.setenv("KVGEN_BACKEND", "torch")
    assert kvgen.select_backend(*good_args()) == "torch"
    monkeypatch.setenv("KVGEN_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(backend, "device_info", lambda device: ("cpu", None, None))
    with pytest.raises(kvgen.BackendUnavailable, match="Triton cannot run"):
        kvgen.select_backend(*good_args())
    monkeypatch.setenv("KVGEN_BACKEND", "fastest")
    with pytest.raises(ValueError, match="KVGEN_BACKEND"):
        kvgen.select_backend(*good_args())


def test_pdl_is_decided_per_call_and_can_be_turned_off(fake_gpu, monkeypatch):
    fake_gpu((9, 0))
    decision = ops.decide_dense(*good_args())
    assert decision.backend == "cubin" and decision.entry.pdl and decision.pdl
    monkeypatch.setenv("KVGEN_PDL", "0")
    assert ops.decide_dense(*good_args()).pdl is False
    # Where a row without the griddepcontrol instructions is shipped, KVGEN_PDL=0 takes it.
    case = make_case(seq_lens=[70], block_size=64)
    assert ops.decide_dense(*case.args()).entry.pdl is False
    monkeypatch.delenv("KVGEN_PDL")
    assert ops.decide_dense(*case.args()).entry.pdl is True
    monkeypatch.setenv("KVGEN_PDL", "sometimes")
    with pytest.raises(ValueError, match="KVGEN_PDL"):
        ops.decide_dense(*good_args())
    monkeypatch.delenv("KVGEN_PDL")
    fake_gpu((8, 0))
    backend.clear_dispatch_cache()  # decisions are cached per device, and this one changed capability
    assert ops.decide_dense(*good_args()).pdl is False  # Triton: nothing to launch with PDL


def test_evict_first_rows_follow_the_rules_and_can_be_turned_off(fake_gpu, monkeypatch):
    """The committed H100 rules send a long DSv4 sparse call to an evict-first
    compact row; KVGEN_EVICT_FIRST=0 takes its plain twin (same schedule,
    stages, warps, chunk), and a bad value is refused."""
    from kvgen.testing import make_sparse_case

    fake_gpu((9, 0))
    case = make_sparse_case(num_slots=20000, valid=0.25, block_size=64, format="dsv4_584")
    streaming = ops.decide_sparse(*case.args()).entry
    assert streaming.config["evict_first"] is True and streaming.config["schedule"] == "compact"
    monkeypatch.setenv("KVGEN_EVICT_FIRST", "0")
    plain = ops.decide_sparse(*case.args()).entry
    assert plain.config == {**streaming.config, "evict_first": False}
    monkeypatch.setenv("KVGEN_EVICT_FIRST", "sometimes")
    with pytest.raises(ValueError, match="KVGEN_EVICT_FIRST"):
        ops.decide_sparse(*case.args())


# A PTX instruction's opcode (after an optional predicate guard), at the start of a line.
_PTX_OPCODE = re.compile(r"^\s*(?:@!?%\w+\s+)?([a-z][\w.:]*)", re.MULTILINE)
_STATE_SPACES = ("global", "shared", "param", "local", "const")


def _touches_global(opcode: str) -> bool:
    """ld/st/red/atom/prefetch on .global or a generic address (no state space: may be
    global), or a cp.async* copy from or to .global; cvta, ld.param, ld.shared etc. are not."""
    parts = opcode.split(".")
    if parts[0] in ("ld", "ldu", "st", "red", "atom", "prefetch", "prefetchu"):
        spaces = [p for p in parts[1:] if p in _STATE_SPACES]
        return not spaces or "global" in spaces
    return parts[0].startswith("cp") and "global" in parts


def _pdl_sample():
    """Two PDL and two non-PDL rows of each (family, format, indexing), where shipped."""
    picked: dict[tuple, list] = {}
    for entry in registry().entries:
        group = picked.setdefault((entry.family, entry.config["format"], entry.config.get("indexing"), entry.pdl), [])
        if len(group) < 2:
            group.append(entry)
    return [entry for group in picked.values() for entry in group]


def _pdl_problems(ptx: str, pdl: bool) -> list[str]:
    """What is wrong with a kernel's PTX for its `pdl` field (empty: nothing). With
    PDL, griddepcontrol.wait sits in the entry block (no label or branch before it)
    and precedes every global load, store, atomic and cp.async, and launch_dependents
    follows it; without PDL neither instruction appears."""
    body = ptx[ptx.index("{", ptx.index(".entry")):]
    opcodes = [(m.start(), m.group(1)) for m in _PTX_OPCODE.finditer(body)]
    first_global = min((at for at, op in opcodes if _touches_global(op)), default=None)
    if first_global is None:
        return ["no global memory instruction found (is the parser broken?)"]
    waits = [at for at, op in opcodes if op == "griddepcontrol.wait"]
    launches = [at for at, op in opcodes if op == "griddepcontrol.launch_dependents"]
    if not pdl:
        return ["griddepcontrol in a kernel built without PDL"] if waits or launches else []
    if len(waits) != 1 or len(launches) != 1:
        return [f"{len(waits)} griddepcontrol.wait and {len(launches)} launch_dependents, expected one each"]
    problems = []
    if waits[0] > first_global:
        problems.append("a global memory access precedes griddepcontrol.wait")
    if launches[0] < waits[0]:
        problems.append("launch_dependents precedes the wait")
    if re.search(r"^\s*\$?\w+:|\bbra\b", body[:waits[0]], re.MULTILINE):
        problems.append("griddepcontrol.wait is not in the entry block (a label or branch precedes it)")
    return problems


@pytest.mark.parametrize("entry", _pdl_sample(), ids=lambda e: e.name)
def test_every_kernel_waits_before_touching_global_memory(entry):
    """PDL is only safe if griddepcontrol.wait comes before the first global
    access: checked in the PTX that CuteDSL compiles from the generated module."""
    pytest.importorskip("cutlass")
    from kvgen.build.compile import compile_module

    assert _pdl_problems(compile_module(generated_dir(), entry.name, entry.arch).ptx, entry.pdl) == [], entry.name


def test_pdl_ptx_check_catches_misordered_kernels():
    """The checker above, on hand-written PTX: a good kernel passes and each mistake is named."""
    def kernel(*lines):
        return ".visible .entry k(\n\t.param .u64 .ptr .global .align 16 k_param_0\n)\n{\n\t" + "\n\t".join(lines) + "\n}\n"

    load, wait, launch = "ld.global.b32 %r1, [%rd1];", "griddepcontrol.wait;", "griddepcontrol.launch_dependents;"
    params = "ld.param.b64 %rd1, [k_param_0];"
    assert _pdl_problems(kernel(params, wait, launch, "cvta.to.global.u64 %rd2, %rd1;", load), True) == []
    assert _pdl_problems(kernel(params, load), False) == []
    assert "precedes griddepcontrol.wait" in _pdl_problems(kernel(params, load, wait, launch), True)[0]
    assert "precedes griddepcontrol.wait" in _pdl_problems(
        kernel("cp.async.cg.shared.global [%r5], [%rd4], 16, 16;", wait, launch, load), True)[0]
    assert "precedes griddepcontrol.wait" in _pdl_problems(kernel("@%p1 st.u32 [%rd1], %r1;", wait, launch, load),
                                                           True)[0]  # a generic store may be global
    assert "launch_dependents precedes" in _pdl_problems(kernel(launch, wait, load), True)[0]
    assert "entry block" in _pdl_problems(kernel("@%p1 bra $L__BB0_2;", "$L__BB0_2:", wait, launch, load), True)[0]
    assert "expected one each" in _pdl_problems(kernel(launch, load), True)[0]
    assert "without PDL" in _pdl_problems(kernel(wait, launch, load), False)[0]


def test_launch_structs_match_cuda_h():
    """CUlaunchAttribute and CUlaunchConfig as cuda.h lays them out (x86-64)."""
    import ctypes
    from kvgen.runtime.driver import LaunchAttribute as _LaunchAttribute, LaunchConfig as _LaunchConfig

    assert ctypes.sizeof(_LaunchAttribute) == 72 and _LaunchAttribute.value.offset == 8
    assert ctypes.sizeof(_LaunchConfig) == 56
    assert (_LaunchConfig.stream.offset, _LaunchConfig.attrs.offset, _LaunchConfig.num_attrs.offset) == (32, 40, 48)


def test_pdl_launch_of_a_cubin_without_the_wait_is_refused():
    from kvgen.runtime.loader import LoadedKernel

    entry = next(e for e in registry().entries if not e.pdl)
    kernel = LoadedKernel(entry=entry, library=None, kernel=0, _prepared_devices=set())
    with pytest.raises(ValueError, match="griddepcontrol"):
        kernel.launch((1, 1, 1), [0] * len(entry.params), stream=0, device=0, pdl=True)


# ------------------------------------------------------------------- loader
@pytest.fixture
def corrupt_tree(tmp_path):
    shutil.copytree(generated_dir(), tmp_path / "generated")
    root = tmp_path / "generated"
    reg = reset_registry(root)
    yield root, reg
    reset_registry()


def test_corrupt_or_missing_cubin_is_never_loaded(corrupt_tree):
    root, reg = corrupt_tree
    entry = reg.entries[0]
    cubin = root / entry.cubin
    image = bytearray(cubin.read_bytes())
    image[len(image) // 2] ^= 0xFF  # one flipped byte
    cubin.write_bytes(bytes(image))
    with pytest.raises(KvgenLoadError, match="sha256"):
        reg.get(entry)
    with pytest.raises(KvgenLoadError, match="sha256"):  # a failure is remembered, not retried
        reg.get(entry)
    other = reg.entries[1]
    (root / other.cubin).unlink()
    with pytest.raises(KvgenLoadError, match="cannot read"):
        reg.get(other)


def test_load_failure_falls_back_with_a_warning(corrupt_tree, fake_gpu, monkeypatch):
    root, reg = corrupt_tree
    for entry in reg.entries:
        (root / entry.cubin).write_bytes(b"not a cubin")
    fake_gpu((9, 0))
    args = good_args()
    expected = args[0].clone()
    dequantize_and_gather_torch(*(expected, *args[1:]))
    with pytest.warns(RuntimeWarning, match="falling back from cubin"):
        kvgen.dequantize_and_gather_k_cache(*args)
    assert kvgen.last_backend() in ("triton", "torch")
    assert mismatches(args[0], expected) == 0
    monkeypatch.setenv("KVGEN_BACKEND", "cubin")  # forced: an error, not a switch
    with pytest.raises(KvgenLoadError):
        kvgen.dequantize_and_gather_k_cache(*good_args())


class _RefusingDriver:
    """A CUDA driver that refuses every image, as it would an image built for
    another GPU or a file that is not a cubin."""

    def load_library(self, image, what):
        from kvgen.runtime.driver import CudaError

        raise CudaError(f"cuLibraryLoadData({what}) failed: CUDA_ERROR_INVALID_IMAGE", 200)


def test_a_cubin_the_driver_rejects_falls_back(corrupt_tree, fake_gpu, monkeypatch):
    """A file that passes its sha256 check but that the driver refuses is a
    load error: the call falls back with a warning (an error when forced)."""
    import json

    from kvgen.runtime import loader

    root, reg = corrupt_tree
    manifest = json.loads((root / "manifest.json").read_text())
    for row in manifest["kernels"]:  # not a cubin, but the manifest vouches for its bytes
        (root / row["cubin"]).write_bytes(b"\x7fELF not a cubin")
        row["cubin_sha256"] = hashlib.sha256(b"\x7fELF not a cubin").hexdigest()
    (root / "manifest.json").write_text(json.dumps(manifest))
    reset_registry(root)
    fake_gpu((9, 0))
    monkeypatch.setattr(loader, "driver", lambda: _RefusingDriver())
    args = good_args()
    expected = args[0].clone()
    dequantize_and_gather_torch(*(expected, *args[1:]))
    with pytest.warns(RuntimeWarning, match="falling back from cubin.*driver rejected.*INVALID_IMAGE"):
        kvgen.dequantize_and_gather_k_cache(*args)
    assert kvgen.last_backend() in ("triton", "torch")
    assert mismatches(args[0], expected) == 0
    monkeypatch.setenv("KVGEN_BACKEND", "cubin")
    with pytest.raises(KvgenLoadError, match="driver rejected"):
        kvgen.dequantize_and_gather_k_cache(*good_args())


def test_no_driver_library_means_no_cubin(monkeypatch):
    monkeypatch.setattr(backend, "device_info", lambda device: ("cuda", (9, 0), TUNED_ON))
    monkeypatch.setattr(backend, "driver", lambda: None)
    decision = ops.decide_dense(*good_args())
    assert decision.backend == "triton" and "libcuda" in decision.reason


# ---------------------------------------------------------- triton fallback
@pytest.mark.parametrize("seed", range(4))
def test_triton_interpreter_matches_torch_on_random_calls(seed, monkeypatch):
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1")
    g = torch.Generator().manual_seed(seed)
    bs = [16, 32, 64, 128, 256][seed % 5]
    seq = torch.randint(0, 300, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist()
    gl = [int(torch.randint(0, s + 1, (1,), generator=g)) for s in seq] if seed % 2 else None
    case = make_case(seq_lens=seq, gather_lens=gl, block_size=bs, offset=seed, raw_bytes=seed >= 2,
                     page_pad=16 * seed, block_table_pad=seed, seed=seed)
    expected = case.out.clone()
    dequantize_and_gather_torch(*case.args(out=expected))
    monkeypatch.setenv("KVGEN_BACKEND", "triton")
    out = case.out.clone()
    kvgen.dequantize_and_gather_k_cache(*case.args(out=out))
    assert kvgen.last_backend() == "triton"
    assert mismatches(out, expected) == 0


# ------------------------------------------------------------------ imports
# Build-time only (kvgen/__init__.py): CuteDSL, jinja2, cuda.core and kvgen's own build stages.
BUILD_TOOLING = ("cutlass", "jinja2", "cuda.core", "kvgen.build.render", "kvgen.build.compile", "kvgen.build.link", "kvgen.build")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


def test_runtime_imports_no_build_tooling():
    """Dense and sparse calls and a manifest read import none of BUILD_TOOLING
    (a module counts if it is one of them or inside one: `cuda.core.x` but not
    `cuda.bindings`). The detector is checked in the same process: each tool
    that is installed must be flagged once imported, so a detector that can
    never fire (as `m.split('.')[0] == 'cuda.core'` could not) fails here."""
    script = (
        "import importlib, sys, kvgen\n"
        "from kvgen.testing import make_case, make_sparse_case\n"
        "c = make_case(seq_lens=[20], block_size=16)\n"
        "kvgen.dequantize_and_gather_k_cache(*c.args())\n"
        "kvgen.dequantize_and_gather_k_cache_sparse(*make_sparse_case(num_slots=8, block_size=16).args())\n"
        "import kvgen.runtime.loader; kvgen.runtime.loader.registry().entries\n"
        f"TOOLING = {BUILD_TOOLING!r}\n"
        "tooling = lambda: sorted({t for m in list(sys.modules) for t in TOOLING if m == t or m.startswith(t + '.')})\n"
        "assert not tooling(), f'runtime imported build tooling: {tooling()}'\n"
        "print('clean')\n"
        "for tool in ('jinja2', 'cuda.core', 'cutlass'):\n"
        "    try:\n"
        "        importlib.import_module(tool)\n"
        "    except ImportError:\n"
        "        continue\n"
        "    assert tool in tooling(), f'{tool} imported but not detected'\n"
        "    print('detects', tool)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != "KVGEN_BACKEND"})
    assert done.returncode == 0 and "clean" in done.stdout, done.stderr
    for tool in ("jinja2", "cuda.core", "cutlass"):
        if _installed(tool):
            assert f"detects {tool}" in done.stdout, done.stdout


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_custom_op_matches_the_oracle_and_has_a_fake(backend, monkeypatch):
    """The registered op, run through a forced backend, against the independent
    decoder; then torch.library.opcheck: its schema (only `out` mutated) and its
    fake implementation, on real and fake tensors."""
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1")
    monkeypatch.setenv("KVGEN_BACKEND", backend)
    op = torch.ops.kvgen.dequantize_and_gather_k_cache
    args = good_args()
    expected = args[0].clone()
    dequantize_and_gather_oracle(expected, *args[1:])
    op(*args)
    assert kvgen.last_backend() == backend
    assert mismatches(args[0], expected) == 0
    torch.library.opcheck(op, good_args(), test_utils=("test_schema", "test_faketensor"))


def test_cli_errors_are_one_line_with_status_2():
    for argv in (["build", "--arch", "sm_70"], ["build", "--kernel", "nope"], ["list", "--arch", "sm_1"]):
        done = subprocess.run([sys.executable, "-m", "kvgen", *argv], capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, argv
        assert len(done.stderr.strip().splitlines()) == 1 and "kvgen: error:" in done.stderr
    for sub in ("generate", "build", "list", "demo", "bench", "tune"):
        done = subprocess.run([sys.executable, "-m", "kvgen", sub, "--help"], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and "usage" in done.stdout


# -------------------------------------------------------------- sparse op
def good_sparse_args():
    from kvgen.testing import make_sparse_case

    return list(make_sparse_case(num_slots=40, valid=0.5, block_size=16, seed=4).args())


SPARSE_VALIDATION = {
    "out dtype": (_replace(0, lambda a: a[0].float()), TypeError, "out: expected dtype"),
    "out last dim": (_replace(0, lambda a: torch.zeros(40, 256, dtype=torch.bfloat16)), ValueError, "out: last dimension"),
    "out rows not one stride": (_replace(0, lambda a: torch.zeros(8, 10, 512, dtype=torch.bfloat16)[:, :5]), ValueError, "viewable"),
    "slots dtype": (_replace(2, lambda a: a[2].long()), TypeError, "slot_indices: expected dtype"),
    "slots count": (_replace(2, lambda a: a[2][:-1]), ValueError, "slots for"),
    "slots rank": (_replace(2, lambda a: a[2][None]), ValueError, "slot_indices: expected 1"),
    "cache record size": (_replace(1, lambda a: torch.zeros(4, 16, 576, dtype=torch.uint8)), ValueError, "k_cache: last dimension"),
    "block_size mismatch": (_replace(3, 32), ValueError, "block_size: must equal"),
    "devices differ": (_replace(2, lambda a: a[2].to("meta")), ValueError, "slot_indices: on meta, but out is on cpu"),
}


@pytest.mark.parametrize("rule", sorted(SPARSE_VALIDATION))
def test_sparse_validation(rule):
    mutate, error, message = SPARSE_VALIDATION[rule]
    with pytest.raises(error, match=message):
        kvgen.dequantize_and_gather_k_cache_sparse(*mutate(good_sparse_args()))


@pytest.mark.parametrize("capability, expected", [((9, 0), "cubin"), ((8, 0), "cubin"), ((10, 0), "cubin"),
                                                  ((11, 0), "ptx"), ((7, 5), "triton")])
def test_sparse_dispatch_by_capability(fake_gpu, capability, expected):
    fake_gpu(capability)
    assert kvgen.select_backend_sparse(*good_sparse_args()) == expected


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sparse_op_and_custom_op_match_the_oracle(backend, monkeypatch):
    """Both entry points, forced to each CPU backend, against the independent
    decoder: -1 slots untouched, a [..., 512] output, both layouts."""
    from kvgen.testing import make_sparse_case

    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1")
    monkeypatch.setenv("KVGEN_BACKEND", backend)
    for layout in ("dsv4_584", "v41_528"):
        case = make_sparse_case(num_slots=48, valid=0.5, block_size=16, format=layout, raw_bytes=True,
                                out_shape=(4, 12), seed=4)
        args = list(case.args())
        expected = args[0].clone()
        dequantize_and_gather_sparse_oracle(expected, *args[1:])
        for op in (kvgen.dequantize_and_gather_k_cache_sparse, torch.ops.kvgen.dequantize_and_gather_k_cache_sparse):
            out = args[0].clone()
            op(out, *args[1:])
            assert kvgen.last_backend() == backend
            assert mismatches(out, expected) == 0, (layout, op)
    torch.library.opcheck(torch.ops.kvgen.dequantize_and_gather_k_cache_sparse, good_sparse_args(),
                          test_utils=("test_schema", "test_faketensor"))


def test_cases_are_reproducible_in_isolation():
    """A seeded case is the same bytes (page padding included) whatever drew from the global RNG before it."""
    def storage(case):
        kc = case.k_cache
        return whole_storage(kc).clone()

    first = make_case(seq_lens=[70, 5], block_size=16, page_pad=48, seed=7)
    torch.rand(1000)  # another test's draws
    second = make_case(seq_lens=[70, 5], block_size=16, page_pad=48, seed=7)
    assert torch.equal(storage(first), storage(second))
    assert torch.equal(first.block_table, second.block_table)


@pytest.mark.parametrize("variable", ["KVGEN_PDL", "KVGEN_CHECK", "KVGEN_BACKEND", "KVGEN_EVICT_FIRST"])
def test_a_bad_switch_is_refused_whichever_backend_serves(variable, monkeypatch):
    """On CPU tensors too (the torch path), not only where the switch matters."""
    monkeypatch.setenv(variable, "2")
    with pytest.raises(ValueError, match=f"{variable}='2': expected"):
        kvgen.dequantize_and_gather_k_cache(*good_args())


def test_a_concurrent_first_call_waits_for_the_trees(monkeypatch):
    """Two threads' first calls: the second waits for the trees the first is loading
    (it never sees a registry with the shipped formats missing)."""
    import threading
    import time

    from kvgen.runtime import loader

    real = loader.read_tree

    def slow(root):
        time.sleep(0.3)
        return real(root)

    monkeypatch.setattr(loader, "read_tree", slow)
    try:
        reg = reset_registry()
        seen = []
        first = threading.Thread(target=lambda: seen.append(reg.format_for_record(584)))
        first.start()
        time.sleep(0.05)
        seen.append(reg.format_for_record(584))  # while the first thread is loading
        first.join()
        assert [f.name for f in seen] == ["dsv4_584", "dsv4_584"]
    finally:
        reset_registry()
