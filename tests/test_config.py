"""Record formats, configs and spec files: what is accepted, and every refusal as one clear line."""

import dataclasses
import subprocess
import sys

import pytest

from kvgen import config as cfg
from kvgen.build.tree import shipped_configs
from kvgen.config import ConfigError
from kvgen.families.dequant_gather.config import DequantGatherConfig
from kvgen.formats import Format, FormatError
from kvgen.spec import SpecError, load_spec

SEED_NAME = "dqgk_dsv4_584_f448_b64_s4_w4_dense_g1_strided_p0_sm_90a"
SEED = next(c for c in shipped_configs() if c.name == SEED_NAME)
DSV4 = SEED.format
FP8_384 = Format("fp8_384", values=384, tail=128, scale_group=64)


# ------------------------------------------------------------------ formats
def test_formats_derive_what_they_do_not_state():
    assert (DSV4.head_dim, DSV4.data_bytes, DSV4.scale_bytes, DSV4.record_bytes) == (512, 576, 8, 584)
    assert (FP8_384.num_scales, FP8_384.scale_pad, FP8_384.record_bytes) == (6, 2, 648)
    v41 = Format("v41", values=512, scale_group=32)
    assert (v41.head_dim, v41.scale_bytes, v41.record_bytes) == (512, 16, 528)
    assert Format("wide", values=512, scale_group=16).scale_bytes == 32  # two 16-byte pieces
    assert Format.from_dict(FP8_384.to_dict(), record_bytes=648) == FP8_384


@pytest.mark.parametrize("fields, record_bytes, message", [
    (dict(name="v32_656", values=512, scale_group=128), 656, "does not add up to record_bytes=656"),
    (dict(name="f", values=450, scale_group=64), None, "scale_group 64 does not divide values 450"),
    (dict(name="f", values=392, tail=0, scale_group=8), None, "data row of 392 bytes cannot be moved in 16-byte"),
    (dict(name="f", values=448, tail=64, scale_group=64, scale_pad=3), None, "scale row of 10 bytes .* cannot be moved"),
    (dict(name="f", values=512, scale_group=32, value_kind="e5m2"), None, "value_kind 'e5m2'"),
    (dict(name="f", values=512, scale_group=32, scale_kind="f16"), None, "scale_kind 'f16'"),
    (dict(name="f", values=512, scale_group=32, placement="interleaved"), None, "placement 'interleaved'"),
    (dict(name="f", values=3, scale_group=1, value_kind="e2m1"), None, "do not fill whole bytes"),
    (dict(name="f", values=504, tail=8, scale_group=8, scale_kind="f32", placement="inline"), None,
     "cannot be moved in 16-byte copies"),
    (dict(name="f", values=0, scale_group=32), None, "must be positive"),
    (dict(name="f", values=512, scale_group=32, tail=-8), None, "tail"),
    (dict(name="Bad-Name", values=512, scale_group=32), None, "format name 'Bad-Name'"),
    (dict(name="f", values=512), None, "missing 1 required positional argument: 'scale_group'"),
    (dict(name="f", values=512, scale_group=32, group=4), None, "unknown field"),
])
def test_formats_that_do_not_add_up_are_refused_when_made(fields, record_bytes, message):
    with pytest.raises(FormatError, match=message) as err:
        Format.from_dict(fields, record_bytes)
    assert "\n" not in str(err.value) and isinstance(err.value, ValueError)


# ------------------------------------------------------------------ configs
def _alternatives():
    """For each field, another value the templates can serve."""
    extra_arch = dataclasses.replace(cfg.ARCHS["sm_90a"], name="sm_90x")
    return extra_arch, {
        "format": [dict(format=FP8_384), dict(format=Format("v41_528", values=512, scale_group=32))],
        "indexing": [dict(indexing="sparse", gather_lens=False), dict(indexing="packed", gather_lens=False)],
        "block_size": [dict(block_size=1), dict(block_size=1024)],
        "num_stages": [dict(num_stages=1), dict(num_stages=8)],
        "num_warps": [dict(num_warps=8)],
        "gather_lens": [dict(gather_lens=False)],
        "schedule": [dict(schedule="contiguous"), dict(schedule="compact", indexing="sparse", gather_lens=False),
                     dict(schedule="direct", indexing="sparse", gather_lens=False,
                          format=Format("fp8_256", values=256, scale_group=64))],
        "pdl": [dict(pdl=True)],
        "arch": [dict(arch="sm_90x")],
        "output": [dict(output="raw", indexing="packed", gather_lens=False)],
        "ballot_chunk": [dict(schedule="ballot", ballot_chunk=8, indexing="sparse", gather_lens=False)],
        "run_tokens": [dict(schedule="page_run", run_tokens=32, num_stages=1)],
        "evict_first": [dict(evict_first=True, schedule="compact", indexing="sparse", gather_lens=False)],
    }


def test_every_field_has_an_alternative_under_test():
    assert set(_alternatives()[1]) == {f.name for f in dataclasses.fields(DequantGatherConfig)}


def test_changing_any_field_changes_name_and_source(monkeypatch):
    from kvgen.build.render import render_kernel, sha256_text

    arch, alternatives = _alternatives()
    monkeypatch.setitem(cfg.ARCHS, arch.name, arch)
    base_source = sha256_text(render_kernel(SEED))
    for field, variants in alternatives.items():
        for change in variants:
            other = dataclasses.replace(SEED, **change)
            assert other.name != SEED.name, field
            assert sha256_text(render_kernel(other)) != base_source, field


def test_shipped_names_are_unique_and_cover_every_family():
    assert len({c.name for c in shipped_configs()}) == len(shipped_configs())
    configs = [c for c in shipped_configs() if c.family == "dqgk" and c.arch == "sm_90a"]
    assert len(configs) == 710
    assert {c.block_size for c in configs} == {16, 32, 64, 128, 256}
    assert {c.gather_lens for c in configs} == {False, True}
    families = {(c.format.name, c.indexing, c.output) for c in configs}
    formats = ("dsv4_584", "v41_528", "v41_288", "v32_656", "indexer_132")
    assert families == ({(f, i, "bf16") for f in formats for i in ("dense", "sparse", "packed")}
                        | {("indexer_132", "packed", "raw")})
    assert SEED.name == SEED_NAME  # names are stable: the format's name and value count, then each field


@pytest.mark.parametrize("change, message", [
    (dict(block_size=48), "power of two"),
    (dict(block_size=0), "power of two"),
    (dict(block_size=2048), "power of two in 1..1024"),
    (dict(num_stages=0), "num_stages"),
    (dict(num_warps=0), "num_warps"),
    (dict(num_warps=33), "num_warps"),
    (dict(num_stages=16, num_warps=32), "shared memory"),
    (dict(arch="sm_70"), "unknown arch"),
    (dict(arch="sm_80", pdl=True), "pdl=True needs griddepcontrol"),
    (dict(schedule="random"), "unknown schedule"),
    (dict(indexing="ragged"), "unknown indexing"),
    (dict(indexing="sparse"), "gather_lens applies to dense indexing only"),
    (dict(block_size="64"), "must be int"),
    (dict(gather_lens=1), "must be bool"),
    (dict(num_stages=True), "must be int"),
    (dict(format="dsv4_584"), "must be a kvgen.formats.Format"),
    (dict(format=Format("g4", values=448, tail=64, scale_group=4)), "multiples of 8"),
    (dict(format=Format("big", values=1536, scale_group=32)), "records of at most 1536 bytes"),
    (dict(output="raw"), "output='raw'"),
    (dict(output="hex"), "unknown output"),
    (dict(schedule="ballot"), "schedule='ballot' is built for sparse gathers"),
    (dict(ballot_chunk=8), "ballot_chunk=8 applies to the ballot and compact schedules only"),
    (dict(schedule="compact"), "schedule='compact' is built for sparse gathers"),
    (dict(schedule="compact", indexing="packed", gather_lens=False), "not packed indexing"),
    (dict(schedule="compact", indexing="sparse", gather_lens=False, ballot_chunk=5), "unknown ballot_chunk 5"),
    (dict(schedule="ballot", indexing="sparse", gather_lens=False, ballot_chunk=5), "unknown ballot_chunk 5"),
    (dict(schedule="ballot", indexing="packed", gather_lens=False), "not packed indexing"),
    (dict(schedule="ballot", indexing="sparse", gather_lens=False, format=Format(
        "small", values=128, scale_group=128, scale_kind="f32")), "4 records a step"),
    (dict(run_tokens=32), "run_tokens=32 applies to the page_run schedule only"),
    (dict(schedule="page_run", run_tokens=32), "num_stages must be 1"),
    (dict(schedule="page_run", num_stages=1, run_tokens=0), "power of two that divides block_size=64"),
    (dict(schedule="page_run", num_stages=1, run_tokens=48), "power of two that divides"),
    (dict(schedule="page_run", num_stages=1, run_tokens=128), "power of two that divides block_size=64"),
    (dict(schedule="page_run", num_stages=1, run_tokens=1), "multiple of 16 bytes"),
    (dict(schedule="page_run", num_stages=1, run_tokens=32, indexing="sparse", gather_lens=False),
     "built for dense bf16 gathers"),
    (dict(schedule="page_run", num_stages=1, run_tokens=32, indexing="packed", gather_lens=False),
     "built for dense bf16 gathers and raw packed ones, not packed indexing with output='bf16'"),
    (dict(schedule="page_run", num_stages=1, run_tokens=32, arch="sm_80"), "needs cp.async.bulk"),
    (dict(schedule="page_run", num_stages=1, block_size=1024, run_tokens=512), "run_tokens=512 needs"),
    (dict(schedule="direct", output="raw", indexing="packed", gather_lens=False),
     "schedule='direct' is built for bf16 gathers, not output='raw'"),
    (dict(evict_first=True, schedule="direct", output="raw", indexing="packed", gather_lens=False),
     "evict_first applies to bf16 output rows of the compact and direct schedules, not output='raw' under direct"),
    (dict(evict_first=True), "evict_first applies .* not output='bf16' under strided"),
    (dict(evict_first=True, schedule="page_run", num_stages=1, run_tokens=32),
     "evict_first applies .* under page_run"),
    (dict(evict_first=1), "evict_first must be bool"),
])
def test_unservable_configs_are_refused_when_made(change, message):
    with pytest.raises(ConfigError, match=message):
        dataclasses.replace(SEED, **change)


WRITER = next(c for c in shipped_configs() if c.name == "qik_v41_288_f512_b64_t2_w4_int64_p1_sm_90a_o32")


@pytest.mark.parametrize("change, message", [
    (dict(tokens_per_warp=9), "tokens_per_warp=9"),
    (dict(num_warps=33), "num_warps=33"),
    (dict(occupancy_warps=6), "occupancy_warps=6 must be 0 or a multiple of num_warps"),
    (dict(occupancy_warps=128), "occupancy_warps=128 must be 0 or a multiple of num_warps"),
    (dict(occupancy_warps=2), "occupancy_warps=2 must be 0 or a multiple of num_warps"),
    (dict(occupancy_warps=True), "occupancy_warps must be int"),
    (dict(pow2_scale=True), "pow2_scale applies to float32 scales"),
])
def test_unservable_writer_configs_are_refused_when_made(change, message):
    with pytest.raises(ConfigError, match=message):
        dataclasses.replace(WRITER, **change)


def test_writer_occupancy_is_named_only_where_set():
    """occupancy_warps came after the writers shipped: at its default (0, no register cap) a name leaves it
    out; set, it is `_o<warps>`, and the kernel asks for occupancy_warps / num_warps CTAs an SM."""
    from kvgen.build.render import render_kernel

    assert WRITER.occupancy_warps == 32 and WRITER.name.endswith("_o32")
    uncapped = dataclasses.replace(WRITER, occupancy_warps=0)
    assert uncapped.name == "qik_v41_288_f512_b64_t2_w4_int64_p1_sm_90a"
    assert "min_blocks_per_mp=8," in render_kernel(WRITER)
    assert "min_blocks_per_mp" not in render_kernel(uncapped)
    assert "min_blocks_per_mp=4," in render_kernel(dataclasses.replace(WRITER, num_warps=8))


def test_writer_lane_groups_follow_the_row_width():
    """A writer row of 16 chunks or fewer is written by several lane groups of a warp at once (the launch
    grid counts them too); wider rows by the whole warp."""
    from kvgen.families.quantize_insert.config import tokens_per_step
    from kvgen.testing import as_format

    assert {name: tokens_per_step(as_format(name)) for name in ("dsv4_584", "v41_528", "v41_288", "v32_656",
                                                               "indexer_132")} == {
        "dsv4_584": 1, "v41_528": 1, "v41_288": 1, "v32_656": 1, "indexer_132": 2}
    assert tokens_per_step(Format("tiny", values=64, scale_group=64, scale_kind="f32")) == 4


def test_round_trip_through_dict():
    assert DequantGatherConfig.from_dict(SEED.to_dict()) == SEED
    with pytest.raises(ConfigError, match="unknown config field"):
        DequantGatherConfig.from_dict({**SEED.to_dict(), "tile": 3})
    with pytest.raises(ConfigError, match="missing config field"):
        DequantGatherConfig.from_dict({k: v for k, v in SEED.to_dict().items() if k != "arch"})


# -------------------------------------------------------------------- specs
GOOD = """
[formats.fp8_384]
values = 384
tail = 128
scale_group = 64
record_bytes = 648

[[dequant_gather]]
format = "fp8_384"
indexing = ["dense", "sparse"]
block_size = [64, 512]
num_stages = 3
"""


def _spec(tmp_path, text, name="spec.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_a_spec_expands_its_products_with_the_defaults(tmp_path):
    spec = load_spec(_spec(tmp_path, GOOD))
    assert spec.formats == {"fp8_384": FP8_384}
    # dense takes both gather modes, sparse one; the defaults fill warps, schedule, pdl and arch.
    assert len(spec.configs) == 2 * (2 + 1)
    assert {(c.num_warps, c.schedule, c.pdl, c.arch) for c in spec.configs} == {(4, "strided", True, "sm_90a")}
    assert "dqgk_fp8_384_f384_b512_s3_w4_sparse_g0_strided_p1_sm_90a" in spec.names


@pytest.mark.parametrize("text, message", [
    ("[formats.f\nvalues = 1", "not valid TOML"),
    (GOOD.replace("record_bytes = 648", "record_bytes = 640"), "does not add up to record_bytes=640"),
    (GOOD.replace('format = "fp8_384"', 'format = "fp8_385"'), "format 'fp8_385' is not defined in this spec"),
    (GOOD.replace("num_stages = 3", "num_stagez = 3"), "unknown field\\(s\\) \\['num_stagez'\\]"),
    (GOOD.replace("num_stages = 3\n", ""), "no num_stages given"),
    (GOOD.replace("block_size = [64, 512]", "block_size = [64, 96]"), "block_size=96 must be a power of two"),
    (GOOD.replace("block_size = [64, 512]", "block_size = []"), "block_size is an empty list"),
    (GOOD + "[[gather]]\nformat = 'x'\n", "unknown table\\(s\\) \\['gather'\\]"),
    (GOOD + "[formats.other]\nvalues = 384\ntail = 128\nscale_group = 64\n",
     "formats fp8_384 and other both have 648-byte records"),
    ("formats = 5\n", "formats must be tables"),
    (GOOD.replace('format = "fp8_384"', "format = {x = 1}"), "format must name a \\[formats.NAME\\] table"),
    (GOOD.replace("record_bytes = 648", 'record_bytes = "648"'), "record_bytes must be an integer"),
])
def test_bad_specs_are_one_clear_line(tmp_path, text, message):
    with pytest.raises(SpecError, match=message) as err:
        load_spec(_spec(tmp_path, text))
    assert "\n" not in str(err.value) and str(tmp_path) in str(err.value)


def test_the_cli_refuses_a_bad_spec_in_one_line(tmp_path):
    bad = _spec(tmp_path, GOOD.replace("record_bytes = 648", "record_bytes = 640"))
    for argv in (["build", "--spec", str(bad), "--out", str(tmp_path / "tree")],
                 ["build", "--spec", str(tmp_path / "missing.toml"), "--out", str(tmp_path / "tree")],
                 ["build", "--spec", str(_spec(tmp_path, GOOD, "good.toml"))]):
        done = subprocess.run([sys.executable, "-m", "kvgen", *argv], capture_output=True, text=True, timeout=120)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("kvgen: error:"), done.stderr
    assert "--spec needs --out" in lines[0]
    assert not (tmp_path / "tree").exists()


def test_records_per_warp_step_follow_the_record_size():
    """Lane groups only where a record is small (BENCHMARKS.md, log 18): every shipped format of 288
    bytes or more keeps one record a warp step, the 132-byte indexer's four (eight raw), and the
    step's shared memory grows with it."""
    from kvgen.families.dequant_gather.config import tokens_per_step
    from kvgen.spec import SHIPPED_SPEC, load_spec

    formats = load_spec(SHIPPED_SPEC).formats
    assert {name: tokens_per_step(f) for name, f in formats.items()} == {
        "dsv4_584": 1, "v41_528": 1, "v41_288": 1, "v32_656": 1, "indexer_132": 4}
    assert tokens_per_step(formats["indexer_132"], "raw") == 8
    one = dataclasses.replace(SEED, format=formats["indexer_132"], indexing="sparse", gather_lens=False)
    assert one.smem_bytes == one.stage_bytes * 4 * one.num_stages * one.num_warps


def test_packed_rows_stage_the_request_starts():
    """A packed row's shared memory: the ring plus STAGED_REQS starts and seq_starts (int32 each)."""
    from kvgen.families.dequant_gather.config import STAGED_REQS

    sparse = dataclasses.replace(SEED, indexing="sparse", gather_lens=False)
    packed = dataclasses.replace(sparse, indexing="packed")
    assert packed.staged_reqs == STAGED_REQS and sparse.staged_reqs == 0 == SEED.staged_reqs
    assert packed.smem_bytes == sparse.smem_bytes + 8 * STAGED_REQS


def test_the_ballot_schedule_stages_an_out_row_per_stage():
    """Its shared memory: the ring plus one int32 out row per stage and warp."""
    strided = dataclasses.replace(SEED, indexing="sparse", gather_lens=False)
    ballot = dataclasses.replace(strided, schedule="ballot")
    assert ballot.smem_bytes == strided.smem_bytes + 4 * ballot.num_stages * ballot.num_warps
    assert "_ballot_" in ballot.name


def test_the_compact_schedule_keeps_a_list_of_its_chunk():
    """Its shared memory: the ring plus the chunk's list (slot and out row, an
    int32 each, per slot of the chunk) and a count per warp (16-byte aligned)."""
    strided = dataclasses.replace(SEED, indexing="sparse", gather_lens=False)
    compact = dataclasses.replace(strided, schedule="compact", ballot_chunk=16)
    assert compact.smem_bytes == strided.smem_bytes + 8 * 16 * 4 + 16
    assert "_compact_" in compact.name and compact.name.endswith("_c16")


def test_the_direct_schedule_holds_its_records_in_registers():
    """No shared memory (a packed call's requests found by the warp, not staged);
    a record is one lane a 16-byte output chunk, at most the warp's 32 lanes;
    only bf16 gathers, of any format (a bf16 tail copied)."""
    from kvgen.testing import as_format

    indexer = dataclasses.replace(SEED, format=as_format("indexer_132"), indexing="sparse", gather_lens=False,
                                  schedule="direct")
    assert indexer.smem_bytes == 0 and indexer.direct_lanes == 16
    assert "_sparse_g0_direct_" in indexer.name
    assert dataclasses.replace(indexer, format=as_format("v41_288")).direct_lanes == 32
    dataclasses.replace(indexer, arch="sm_80")  # plain loads and stores: built for any arch, not refused
    assert dataclasses.replace(indexer, indexing="dense", gather_lens=True).smem_bytes == 0
    packed = dataclasses.replace(indexer, indexing="packed")
    assert packed.smem_bytes == 0 == packed.staged_reqs  # a search a block, in global memory: nothing staged
    with pytest.raises(ConfigError, match="schedule='direct' is built for bf16 gathers, not output='raw'"):
        dataclasses.replace(indexer, indexing="packed", output="raw")
    for tailed in ("v32_656", "dsv4_584"):  # inline and page-split tails
        assert dataclasses.replace(indexer, format=as_format(tailed)).smem_bytes == 0


@pytest.mark.parametrize("change", [
    dict(indexing="sparse", gather_lens=False, schedule="compact", ballot_chunk=16, num_stages=8),  # the ring
    dict(indexing="sparse", gather_lens=False, schedule="direct"),  # values and DSv4's bf16 tail
    dict(indexing="packed", gather_lens=False, schedule="direct", format=Format(
        "i128", values=128, scale_group=128, scale_kind="f32")),  # lane groups of 16
])
def test_evict_first_stores_every_output_chunk_with_the_streaming_policy(change):
    """evict_first=True (the compact and direct schedules): every 16-byte output
    store of the kernel is the helpers' st.global.cs, none the default one;
    False renders no trace of it. Named only where set (the kernels shipped
    before it keep their names)."""
    import ast

    from kvgen.build.render import render_helpers, render_kernel

    plain = dataclasses.replace(SEED, **change)
    streaming = dataclasses.replace(plain, evict_first=True)
    assert streaming.name == plain.name + "_e1" and "_e" not in plain.name.removeprefix(SEED.family)
    before, after = render_kernel(plain), render_kernel(streaming)
    ast.parse(after)
    assert "store_evict_first_x4" not in before and "cute.copy(st_global" in before
    assert "cute.copy(st_global" not in after
    assert after.count("store_evict_first_x4(") == before.count("cute.copy(st_global")
    for flavour in cfg.FLAVOURS:
        assert "st.global.cs.v4.b32" in render_helpers(flavour)


def test_variant_names_tell_evict_first_rows_apart():
    from kvgen.tools.variants import variant_of

    config = {"num_stages": 8, "num_warps": 4, "schedule": "compact", "ballot_chunk": 16}
    assert variant_of(config) == "s8w4k16" == variant_of({**config, "evict_first": False})
    assert variant_of({**config, "evict_first": True}) == "s8w4k16e"


@pytest.mark.parametrize("fmt", [
    Format("u48", values=48, scale_group=16),  # 6 chunks: lanes past them idle
    Format("u96", values=96, scale_group=32, scale_kind="f32"),
    Format("u320", values=320, scale_group=64),  # 40 chunks: two passes, the second partial
    Format("e96", values=96, scale_group=16, value_kind="e2m1", scale_kind="e4m3", placement="inline"),
    Format("u768", values=768, scale_group=128),  # three passes
    Format("u16", values=16, scale_group=8),
    Format("t448", values=448, tail=64, scale_group=64),  # DSv4's: the second pass part values, part tail
    Format("t48", values=48, tail=16, scale_group=16),  # values and tail inside one pass of 8 lanes
    Format("t512", values=512, tail=64, scale_group=128, scale_kind="f32", placement="inline"),  # V3.2's: 3 passes
    Format("t256", values=256, tail=256, scale_group=32),  # whole passes of tail
])
@pytest.mark.parametrize("indexing", ["dense", "sparse", "packed"])
def test_the_direct_schedule_renders_for_any_format(fmt, indexing):
    """What the config accepts, the template writes as valid Python: chunk
    counts that are not a multiple of a record's lanes guard the lanes past them,
    and a format with a bf16 tail copies it."""
    import ast

    from kvgen.build.render import render_kernel

    config = dataclasses.replace(SEED, format=fmt, indexing=indexing, gather_lens=indexing == "dense",
                                 schedule="direct")
    source = render_kernel(config)
    ast.parse(source)
    assert ("if chunk < OUT_CHUNKS:" in source) == bool(fmt.head_dim // 8 % config.direct_lanes)
    assert ("tails[None, p, s]" in source) == bool(fmt.tail)
    if fmt.tail:  # where the tail lies: Format.regions, the one statement of the placements
        base, row_stride, _ = fmt.regions(config.block_size)["tail"]
        assert f"TAIL_BASE = {base}\n" in source and f"TAIL_ROW = {row_stride}\n" in source


def test_a_page_run_stages_one_run_of_rows_and_scale_rows():
    """Its shared memory: the run's data rows, its scale rows, one mbarrier; only
    the formats whose rows were checked on a GPU."""
    run = dataclasses.replace(SEED, schedule="page_run", num_stages=1, num_warps=8, run_tokens=32)
    assert run.smem_bytes == 32 * 576 + 32 * 8 + 8
    assert "_page_run_" in run.name and run.name.endswith("_r32")
    from kvgen.testing import as_format

    for name in ("v32_656", "v41_288", "indexer_132"):  # rows never checked on a GPU: refused
        with pytest.raises(ConfigError, match="page-split formats of e4m3 values with UE8M0 scales"):
            dataclasses.replace(run, format=as_format(name))


def test_a_raw_page_run_stages_a_chunk_of_rows():
    """The raw packed gather's page_run: its shared memory holds the chunk's data
    rows, one mbarrier and the staged starts; a chunk of any power of two up to a
    row a thread, whatever the block size (runs split at pages), on sm_90 and
    later only."""
    from kvgen.families.dequant_gather.config import STAGED_REQS
    from kvgen.testing import as_format

    raw = dataclasses.replace(SEED, format=as_format("indexer_132"), indexing="packed", gather_lens=False,
                              output="raw", schedule="page_run", num_stages=1, block_size=16, run_tokens=64)
    assert raw.smem_bytes == 64 * 128 + 16 + 8 * STAGED_REQS
    assert raw.name.endswith("_raw_r64")
    assert dataclasses.replace(raw, run_tokens=128).run_tokens == 128  # 4 warps: 128 threads
    for bad, message in ((dict(run_tokens=256), "at most 128 \\(num_warps \\* 32\\)"),
                         (dict(run_tokens=48), "run_tokens=48 must be a power of two"),
                         (dict(run_tokens=0), "run_tokens=0 must be a power of two"),
                         (dict(num_stages=2), "num_stages must be 1"),
                         (dict(arch="sm_80"), "needs cp.async.bulk")):
        with pytest.raises(ConfigError, match=message):
            dataclasses.replace(raw, **bad)
