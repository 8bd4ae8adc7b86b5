"""The build half: generated sources, PTX, cubins and manifest (CPU; needs the build extras)."""

import dataclasses
import hashlib
import os
import shutil
from pathlib import Path

import pytest

from kvgen.build.tree import shipped_configs
from kvgen.families import FAMILIES
from kvgen.runtime.manifest import read_manifest, read_tree
from kvgen.paths import KERNELS_PACKAGE, MANIFEST_NAME, generated_dir, helpers_file

pytest.importorskip("jinja2")
pytest.importorskip("cutlass")

COMMITTED = generated_dir()
SEED = next(c for c in shipped_configs() if c.name == "dqgk_dsv4_584_f448_b64_s4_w4_dense_g1_strided_p0_sm_90a")

# The config fields each family's template branches on (its `if`s on `c.`),
# beside the format and arch: the rebuild sample takes one config of each
# combination that the spec has.
TEMPLATE_BRANCHES = {
    "dqgk": ("schedule", "indexing", "output", "gather_lens", "pdl", "evict_first"),
    "qik": ("pdl", "pow2_scale", "tokens_per_warp", "occupancy_warps"),
}


def test_the_rebuild_sample_knows_every_template_branch():
    """Each config field a family's template branches on (`{% if %}` / `{% elif %}`
    on `c.<field>`) is one of its TEMPLATE_BRANCHES, so the sample covers it."""
    import re

    from kvgen.paths import templates_dir

    assert set(TEMPLATE_BRANCHES) == set(FAMILIES)
    for family, cls in FAMILIES.items():
        text = (templates_dir() / cls.template).read_text()
        used = {field for tag in re.findall(r"\{%-?\s*(?:if|elif)\b(.*?)-?%\}", text, re.S)
                for field in re.findall(r"\bc\.(\w+)", tag)}
        fields = {f.name for f in dataclasses.fields(cls)}
        assert used & fields <= set(TEMPLATE_BRANCHES[family]), (family, sorted(used & fields))


def test_rendering_is_deterministic():
    """In one process (across processes: the next test)."""
    from kvgen.build.render import render_helpers, render_kernel
    from kvgen.config import FLAVOURS

    assert render_kernel(SEED) == render_kernel(SEED) == (COMMITTED / KERNELS_PACKAGE / SEED.filename).read_text()
    assert all(render_helpers(flavour) == render_helpers(flavour) for flavour in FLAVOURS)


def test_committed_sources_are_what_generate_writes(tmp_path):
    """The whole tree, rendered here, is the committed one, which another process
    rendered: fails on stale sources and on output that varies between processes
    (hash order, addresses, dates). A second generate writes nothing."""
    from kvgen.build.tree import generate

    generate(out_dir=tmp_path)
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.py"))
    committed = sorted(p.relative_to(COMMITTED) for p in COMMITTED.rglob("*.py") if "__pycache__" not in p.parts)
    assert fresh == committed
    for rel in fresh:
        assert (tmp_path / rel).read_text() == (COMMITTED / rel).read_text(), f"{rel}: run `make generate`"
    assert generate(out_dir=tmp_path) == []


def _rebuild_sample():
    """The first config by name of each family, arch, format and choice of its
    TEMPLATE_BRANCHES fields, and of each family, arch and value of any of its
    fields: every template path on every arch and format, every parameter value
    on every arch. Every shipped config with KVGEN_FULL_REBUILD=1."""
    configs = sorted(shipped_configs(), key=lambda c: c.name)
    if os.environ.get("KVGEN_FULL_REBUILD") == "1":
        return configs
    first = {}
    for config in configs:
        values = {**config.to_dict(), "format": config.format.name}
        branches = tuple(values[field] for field in TEMPLATE_BRANCHES[config.family])
        first.setdefault(("branches", config.family, config.arch, config.format.name, branches), config.name)
        for field, value in values.items():
            first.setdefault(("value", config.family, config.arch, field, value), config.name)
    chosen = set(first.values())
    return [c for c in configs if c.name in chosen]


def test_modules_compile_and_reproduce_the_committed_cubins(tmp_path):
    """A rebuild from the committed sources gives the committed cubins and
    manifest rows, bit for bit: of _rebuild_sample() (every template path on
    every arch and format; ~35 s on 2 cores), or of every cubin with
    KVGEN_FULL_REBUILD=1 (~2.5 minutes). Every row's hashes against its files:
    test_manifest_matches_the_files; every row up to date: the next test."""
    from kvgen.build.tree import build
    from kvgen.config import FLAVOURS

    sample = _rebuild_sample()
    needed = {"__init__.py", *(helpers_file(f) for f in FLAVOURS), *(c.filename for c in sample)}
    shutil.copytree(COMMITTED / KERNELS_PACKAGE, tmp_path / KERNELS_PACKAGE,
                    ignore=lambda folder, names: [n for n in names if n not in needed])
    result = build(sample, out_dir=tmp_path, progress=False, jobs=2)
    assert result == {"built": len(sample), "skipped": 0}
    fresh = {row["name"]: row for row in read_manifest(tmp_path / MANIFEST_NAME)["kernels"]}
    committed = {row["name"]: row for row in read_manifest(COMMITTED / MANIFEST_NAME)["kernels"]}
    assert sorted(fresh) == [c.name for c in sample]
    for name, row in fresh.items():
        assert row == committed[name], (name, sorted(k for k in row.keys() | committed[name].keys()
                                                     if row.get(k) != committed[name].get(k)))
    # Unchanged inputs: nothing is rebuilt.
    assert build(sample, out_dir=tmp_path, progress=False) == {"built": 0, "skipped": len(sample)}


def test_the_toolchain_includes_kvgens_compile_and_link_steps():
    """An edit to kvgen/build/compile.py or link.py changes every build key (so
    `build` rebuilds every kernel, and the next test fails until it has)."""
    from kvgen.build import link
    from kvgen.build.link import toolchain_versions

    steps = [Path(link.__file__).with_name(step).read_bytes() for step in ("compile.py", "link.py")]
    assert toolchain_versions()["kvgen-compile-link"] == hashlib.sha256(b"".join(steps)).hexdigest()[:16]


def test_every_committed_row_is_up_to_date():
    """Every row's build key is the one `build` computes now (its committed
    source, its flavour's helpers, its arch, this toolchain): `build` would skip
    it -- the rows the rebuild above does not sample included."""
    from kvgen.build.link import toolchain_versions
    from kvgen.build.tree import build_key
    from kvgen.config import ARCHS, FLAVOURS
    from kvgen.runtime.manifest import sha256_file

    toolchain = toolchain_versions()
    helpers = {f: sha256_file(COMMITTED / KERNELS_PACKAGE / helpers_file(f)) for f in FLAVOURS}
    for row in read_manifest(COMMITTED / MANIFEST_NAME)["kernels"]:
        flavour_helpers = helpers[ARCHS[row["arch"]].flavour]
        assert row["toolchain"] == toolchain and row["helpers_sha256"] == flavour_helpers, row["name"]
        source = sha256_file(COMMITTED / row["source"])
        assert row["build_key"] == build_key(source, flavour_helpers, row["arch"], toolchain), row["name"]


def test_manifest_matches_the_files():
    entries = list(read_tree(COMMITTED).entries)
    rows = read_manifest(COMMITTED / MANIFEST_NAME)["kernels"]
    assert len([e for e in entries if e.arch == "sm_90a"]) >= 20
    assert {e.name for e in entries} == {c.name for c in shipped_configs()}
    for entry, row in zip(entries, rows):
        cubin = (COMMITTED / entry.cubin).read_bytes()
        assert hashlib.sha256(cubin).hexdigest() == entry.cubin_sha256, entry.name
        assert hashlib.sha256((COMMITTED / entry.source).read_bytes()).hexdigest() == entry.source_sha256
        from kvgen.config import ARCHS

        expected_image = (f"ptx/{entry.arch}/{entry.name}.ptx" if ARCHS[entry.arch].ptx
                          else f"cubins/{entry.arch}/{entry.name}.cubin")
        assert entry.cubin == expected_image
        assert entry.symbol.startswith(entry.name) and entry.symbol.encode() in cubin
        config = FAMILIES[entry.family].from_dict({**entry.config, "format": entry.format})
        assert list(entry.params) == [(p.name, p.ctype) for p in config.params] and config.name == entry.name
        assert entry.block == (32 * entry.config["num_warps"], 1, 1)
        assert entry.spill_bytes == 0 and row["stack_bytes"] == 0, entry.name
        assert set(row["toolchain"]) >= {"nvidia-cutlass-dsl", "cuda-core", "nvidia-nvjitlink"}
        assert set(entry.config) == {f.name for f in dataclasses.fields(FAMILIES[entry.family])}


def test_seed_ptx_has_the_seed_design():
    from kvgen.build.compile import compile_module

    ptx = compile_module(COMMITTED, SEED.name, SEED.arch).ptx
    assert "cp.async.cg.shared.global" in ptx and "cp.async.wait_group" in ptx
    assert "cvt.rn.f16x2.e4m3x2" in ptx and "mul.rn.bf16x2" in ptx
    assert "st.global.v4.b32" in ptx  # 16-byte global stores
    assert ".local" not in ptx and "ld.local" not in ptx and "st.local" not in ptx
    assert ".reqntid 128, 1, 1" in ptx


def test_building_named_kernels_keeps_every_other_kernel(tmp_path):
    """`kvgen build --kernel NAME` rebuilds NAME and leaves the rest of the tree as it was."""
    from kvgen.build.tree import build

    shutil.copytree(COMMITTED, tmp_path, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
    before = read_manifest(tmp_path / MANIFEST_NAME)["kernels"]
    result = build([SEED], out_dir=tmp_path, progress=False, force=True)
    assert result == {"built": 1, "skipped": 0}
    after = read_manifest(tmp_path / MANIFEST_NAME)["kernels"]
    assert after == before  # the rebuilt seed reproduces its row; no other row lost
    assert all((tmp_path / row["cubin"]).exists() for row in after)


def _copy_tree(dst):
    shutil.copytree(COMMITTED, dst, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def _files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_building_a_subset_removes_nothing(tmp_path):
    """generate() or build() of one config against the whole tree keeps every
    other source, cubin and manifest row; only prune() removes, and only what
    its configs do not ask for."""
    from kvgen.build.tree import build, generate, prune

    root = _copy_tree(tmp_path / "generated")
    files, rows = _files(root), read_manifest(root / MANIFEST_NAME)["kernels"]
    generate([SEED], root)
    assert build([SEED], out_dir=root, progress=False) == {"built": 0, "skipped": 1}
    assert _files(root) == files and read_manifest(root / MANIFEST_NAME)["kernels"] == rows

    removed = prune([SEED], root)
    left = read_manifest(root / MANIFEST_NAME)["kernels"]
    assert [row["name"] for row in left] == [SEED.name]
    assert sorted(p.name for p in (root / "cubins").glob("*/*.cubin")) == [f"{SEED.name}.cubin"]
    assert sorted(p.name for p in (root / KERNELS_PACKAGE).glob("dqgk_*.py")) == [SEED.filename]
    assert len(removed) == 3 * (len(rows) - 1)  # a source, a cubin and a manifest row each
    assert prune([SEED], root) == []


def test_compile_compiles_the_file_it_is_given(tmp_path):
    """Two trees compiled in one process: each compile reads its own file, as it
    is now, even after an edit that keeps the file's size (stale bytecode)."""
    from kvgen.build.compile import compile_module

    first = compile_module(_copy_tree(tmp_path / "a"), SEED.name, SEED.arch)
    other = _copy_tree(tmp_path / "b")
    source = other / KERNELS_PACKAGE / SEED.filename
    text = source.read_text()
    # A wider ring slot (STAGE_BYTES 592 -> 608: other shared-memory offsets in
    # the PTX) and its SMEM_BYTES, with the same digit counts: the file keeps its size.
    stage, smem = SEED.stage_bytes, first.smem_bytes
    edits = {f"STAGE_BYTES = {stage} ": f"STAGE_BYTES = {stage + 16} ",
             f"SMEM_BYTES = {smem} ": f"SMEM_BYTES = {smem + 256} "}
    edited = text
    for old, new in edits.items():
        assert old in edited and len(old) == len(new)
        edited = edited.replace(old, new)
    source.write_text(edited)
    second = compile_module(other, SEED.name, SEED.arch)
    assert second.smem_bytes == smem + 256 and second.ptx != first.ptx
    source.write_text(text)  # back as it was, at once: the same size, likely the same second
    assert compile_module(other, SEED.name, SEED.arch).ptx == first.ptx
