import dataclasses

import pytest

from kvgen import config as cfg
from kvgen.config import SEED, ConfigError, DequantGatherConfig, build_matrix


def _alternatives(monkeypatch):
    """For each field, another value the templates can serve (registering an extra
    layout/arch row where the tables hold only one)."""
    layout = cfg.LAYOUTS["dsv4_584"]
    monkeypatch.setitem(cfg.LAYOUTS, "alt_584", dataclasses.replace(layout, name="alt_584"))
    monkeypatch.setitem(cfg.ARCHS, "sm_90x", dataclasses.replace(cfg.ARCHS["sm_90a"], name="sm_90x"))
    return {
        "layout": [dict(layout="alt_584"), dict(layout="v41_528", fp8_dim=512)],
        "fp8_dim": [dict(layout="v41_528", fp8_dim=512)],  # fp8_dim is tied to the layout's record
        "indexing": [dict(indexing="sparse", gather_lens=False)],
        "block_size": [dict(block_size=16), dict(block_size=256)],
        "num_stages": [dict(num_stages=1), dict(num_stages=8)],
        "num_warps": [dict(num_warps=8)],
        "gather_lens": [dict(gather_lens=False)],
        "schedule": [dict(schedule="contiguous")],
        "pdl": [dict(pdl=True)],
        "arch": [dict(arch="sm_90x")],
    }


def test_every_field_has_an_alternative_under_test(monkeypatch):
    assert set(_alternatives(monkeypatch)) == {f.name for f in dataclasses.fields(DequantGatherConfig)}


def test_changing_any_field_changes_name_and_source(monkeypatch):
    from kvgen.render import render_kernel, sha256_text

    base_source = sha256_text(render_kernel(SEED))
    for field, variants in _alternatives(monkeypatch).items():
        for change in variants:
            other = dataclasses.replace(SEED, **change)
            assert other.name != SEED.name, field
            assert sha256_text(render_kernel(other)) != base_source, field


def test_matrix_names_are_unique_and_cover_the_issue():
    configs = list(build_matrix())
    assert len({c.name for c in configs}) == len(configs) >= 20
    assert {c.block_size for c in configs} >= {16, 32, 64, 128, 256}
    assert len({c.num_stages for c in configs}) >= 3
    assert {c.gather_lens for c in configs} == {False, True}
    assert {c.arch for c in configs} == {"sm_90a"}
    families = {(c.layout, c.indexing) for c in configs}
    assert families == {("dsv4_584", "dense"), ("dsv4_584", "sparse"), ("v41_528", "dense"), ("v41_528", "sparse")}
    assert SEED in configs


def test_name_is_readable():
    assert SEED.name == "dqgk_dsv4_584_f448_b64_s4_w4_dense_g1_strided_p0_sm_90a"


@pytest.mark.parametrize("change, message", [
    (dict(fp8_dim=450), "multiple of the scale group"),
    (dict(fp8_dim=384), "does not fit layout"),
    (dict(block_size=48), "power of two"),
    (dict(block_size=0), "power of two"),
    (dict(num_stages=0), "num_stages"),
    (dict(num_warps=0), "num_warps"),
    (dict(num_warps=33), "num_warps"),
    (dict(num_stages=16, num_warps=32), "shared memory"),
    (dict(arch="sm_80"), "unknown arch"),
    (dict(layout="fp4"), "unknown layout"),
    (dict(schedule="random"), "unknown schedule"),
    (dict(indexing="ragged"), "unknown indexing"),
    (dict(indexing="sparse"), "gather_lens applies to dense indexing only"),
    (dict(layout="v41_528"), "does not fit layout"),
    (dict(block_size="64"), "must be int"),
    (dict(gather_lens=1), "must be bool"),
    (dict(num_stages=True), "must be int"),
])
def test_unservable_configs_are_refused_when_made(change, message):
    with pytest.raises(ConfigError, match=message):
        dataclasses.replace(SEED, **change)


def test_round_trip_through_dict():
    assert DequantGatherConfig.from_dict(SEED.to_dict()) == SEED
    with pytest.raises(ConfigError, match="unknown config field"):
        DequantGatherConfig.from_dict({**SEED.to_dict(), "tile": 3})
