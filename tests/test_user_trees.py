"""A user's own kernel tree: built from a spec on the CPU, served beside the shipped one.

The CPU tests build examples/fp8_384.toml (and a small-head format that takes
the template's other paths) into temporary folders. The GPU tests need the
trees built beforehand, on a machine with CuteDSL (the GPU machine has
none): they build them here when they can, else take them from
KVGEN_TEST_TREES (a folder holding fp8_384/ and head128/, built with
`python -m tests.test_user_trees OUT`), else skip.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kvgen
from kvgen.families.dequant_gather.oracle import dequantize_and_gather_oracle, dequantize_and_gather_sparse_oracle
from kvgen.runtime import backend
from kvgen.runtime.loader import TreeConflict, registry, reset_registry
from kvgen.testing import as_format, make_case, make_sparse_case, mismatches

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "fp8_384.toml"
# 128 e4m3 values, no tail, a code per 16 (8 codes, an 8-byte scale row): 136-byte
# records (not the shipped indexer's 132: two formats of one size cannot be
# loaded together), 128-wide output rows, 8-piece data rows -- fewer than a warp's lanes.
HEAD128 = """
[formats.h128]
values = 128
scale_group = 16
record_bytes = 136

[[dequant_gather]]
format = "h128"
indexing = ["dense", "sparse"]
block_size = [1, 64]
num_stages = 2

[[quantize_insert]]
format = "h128"
block_size = [1, 64]
slot_dtype = "int64"
"""
TREES = {"fp8_384": EXAMPLE.read_text(), "head128": HEAD128}


def build_trees(out: Path) -> dict[str, Path]:
    """Build every test tree under `out` (CPU, CuteDSL); returns name -> tree."""
    from kvgen.build.tree import build
    from kvgen.spec import load_spec

    trees = {}
    for name, text in TREES.items():
        spec = out / f"{name}.toml"
        spec.parent.mkdir(parents=True, exist_ok=True)
        spec.write_text(text)
        build(load_spec(spec).configs, out / name, progress=False, jobs=2)
        trees[name] = out / name
    return trees


@pytest.fixture(scope="module")
def trees(tmp_path_factory) -> dict[str, Path]:
    prebuilt = os.environ.get("KVGEN_TEST_TREES")
    if prebuilt:
        return {name: Path(prebuilt).resolve() / name for name in TREES}
    pytest.importorskip("cutlass", reason="building a tree needs the build extras (CuteDSL)")
    return build_trees(tmp_path_factory.mktemp("trees"))


@pytest.fixture
def with_trees(trees):
    """A registry holding the shipped tree and the test trees (as add_kernel_dir adds them)."""
    reset_registry()
    for tree in trees.values():
        kvgen.add_kernel_dir(tree)
    yield trees
    reset_registry()


def _git_status() -> str:
    return subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout


def test_the_example_builds_into_its_own_folder_on_the_cpu(tmp_path):
    pytest.importorskip("cutlass")
    before = _git_status()
    out = tmp_path / "my_kernels"
    done = subprocess.run([sys.executable, "-m", "kvgen", "build", "--spec", str(EXAMPLE), "--out", str(out),
                           "--quiet"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "10 built" in done.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["formats"] == {"fp8_384": {"values": 384, "scale_group": 64, "tail": 128, "value_kind": "e4m3",
                                               "scale_kind": "ue8m0", "scale_pad": 2, "placement": "page_split"}}
    assert len(list((out / "cubins" / "sm_90a").glob("*.cubin"))) == 10
    assert _git_status() == before  # no tracked file changed, the shipped tree included
    # Built again: nothing to do (content-hash cache), and bit-reproducible.
    again = subprocess.run([sys.executable, "-m", "kvgen", "build", "--spec", str(EXAMPLE), "--out", str(out),
                            "--quiet"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert "0 built, 10 unchanged" in again.stdout, again.stderr


def _page_pad(fmt, bs, seed):
    """Pages start 16 bytes apart (136-byte records need padding at block size 1), plus some."""
    return -bs * as_format(fmt).record_bytes % 16 + 16 * (seed % 3)


def _dense(fmt, bs, seed):
    return make_case(seq_lens=[3 * bs + 7, 5, bs], gather_lens=[2 * bs + 1, 5, 0], block_size=bs, format=fmt,
                     raw_bytes=seed % 2 == 1, offset=2, page_pad=_page_pad(fmt, bs, seed), block_table_pad=seed % 2,
                     seed=seed)


def _sparse(fmt, bs, seed):
    return make_sparse_case(num_slots=3 * bs + 11, valid=0.6, block_size=bs, format=fmt, raw_bytes=True,
                            page_pad=_page_pad(fmt, bs, seed), seed=seed)


CASES = [("fp8_384", 64), ("fp8_384", 512), ("h128", 1), ("h128", 64)]


@pytest.mark.parametrize("fmt, bs", CASES)
@pytest.mark.parametrize("path", ["torch", "triton"])
def test_user_formats_served_on_the_cpu(with_trees, fmt, bs, path, monkeypatch):
    if path == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1")
    monkeypatch.setenv("KVGEN_BACKEND", path)
    for seed, (make, op, oracle) in enumerate([
            (_dense, kvgen.dequantize_and_gather_k_cache, dequantize_and_gather_oracle),
            (_sparse, kvgen.dequantize_and_gather_k_cache_sparse, dequantize_and_gather_sparse_oracle)]):
        case = make(fmt, bs, seed)
        expected = case.out.clone()
        oracle(*case.args(out=expected))
        out = case.out.clone()
        op(*case.args(out=out))
        assert kvgen.last_backend() == path
        assert mismatches(out, expected) == 0, (fmt, bs, make.__name__)


def test_kernel_dirs_from_the_environment(trees, tmp_path):
    """KVGEN_KERNEL_DIRS (os.pathsep-separated), read by a fresh process."""
    script = ("import kvgen, torch\n"
              "from kvgen.testing import make_case\n"
              "from kvgen.runtime.loader import registry\n"
              "c = make_case(seq_lens=[100], block_size=64, format='fp8_384')\n"
              "kvgen.dequantize_and_gather_k_cache(*c.args())\n"
              "print(sorted(registry().formats), kvgen.last_backend())\n")
    env = dict(os.environ, KVGEN_KERNEL_DIRS=os.pathsep.join(str(t) for t in trees.values()))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['dsv4_584', 'fp8_384', 'h128', 'indexer_132', 'v32_656', 'v41_288', 'v41_528'] torch"


def test_user_rows_join_dispatch(with_trees, monkeypatch):
    monkeypatch.setattr(backend, "device_info", lambda device: ("cuda", (9, 0), "NVIDIA H100 80GB HBM3"))
    monkeypatch.setattr(backend, "driver", lambda: "a driver")
    from kvgen.families.dequant_gather import op

    case = _dense("fp8_384", 512, 0)
    decision = op.decide_dense(*case.args())
    assert decision.backend == "cubin" and decision.entry.root == with_trees["fp8_384"]
    assert decision.entry.name == "dqgk_fp8_384_f384_b512_s3_w4_dense_g1_strided_p1_sm_90a"


def test_without_the_tree_the_format_is_unknown():
    reset_registry()
    registry().entries
    assert "fp8_384" not in registry().formats
    with pytest.raises(ValueError, match="record size of a loaded format .*584.*got 648"):
        kvgen.dequantize_and_gather_k_cache(torch.zeros(1, 4, 512, dtype=torch.bfloat16),
                                            torch.zeros(2, 64, 648, dtype=torch.uint8),
                                            torch.ones(1, dtype=torch.int32), None,
                                            torch.zeros(1, 1, dtype=torch.int32), 64, 0)


def _tampered_copy(tree: Path, out: Path, change) -> Path:
    shutil.copytree(tree, out)
    manifest = json.loads((out / "manifest.json").read_text())
    change(manifest)
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def test_trees_that_clash_are_refused_naming_both(trees, tmp_path):
    def other_format(m):  # the same 648-byte records, laid out otherwise
        m["formats"]["fp8_384"].update(scale_group=128, scale_pad=5)
        for row in m["kernels"]:
            row["config"]["format"] = "fp8_384"
    def renamed_format(m):
        m["formats"]["other_648"] = m["formats"].pop("fp8_384")
        m["formats"]["other_648"].update(scale_group=128, scale_pad=5)
        for row in m["kernels"]:
            row["config"]["format"] = "other_648"
    def other_cubin(m):
        m["kernels"][0]["cubin_sha256"] = "0" * 64

    try:
        for name, change, message in [("a", other_format, "define different formats fp8_384 and fp8_384"),
                                      ("b", renamed_format, "define different formats fp8_384 and other_648"),
                                      ("c", other_cubin, "both hold dqgk_fp8_384_f384_b512_s3_w4_dense_g0")]:
            reset_registry()
            kvgen.add_kernel_dir(trees["fp8_384"])
            clash = _tampered_copy(trees["fp8_384"], tmp_path / name, change)
            with pytest.raises(TreeConflict, match=message) as err:
                kvgen.add_kernel_dir(clash)
            assert str(trees["fp8_384"]) in str(err.value) and str(clash) in str(err.value)
            assert isinstance(err.value, ValueError)
    finally:
        reset_registry()


def test_a_missing_tree_is_one_clear_error(tmp_path):
    try:
        reset_registry()
        with pytest.raises(ValueError, match="manifest not found"):
            kvgen.add_kernel_dir(tmp_path / "nowhere")
    finally:
        reset_registry()


@pytest.mark.gpu
@pytest.mark.parametrize("fmt, bs", CASES)
def test_user_tree_writers_bit_exact(with_trees, fmt, bs, monkeypatch):
    """The user trees' writer cubins through the public op, against the torch reference."""
    from kvgen.families.quantize_insert.reference import quantize_and_insert_torch
    from kvgen.testing import _to, clone_strided, whole_storage

    monkeypatch.setenv("KVGEN_BACKEND", "cubin")
    f = as_format(fmt)
    g = torch.Generator().manual_seed(bs)
    num_blocks, tokens = 3, 2 * bs + 1
    k = (torch.randn((tokens, f.head_dim), generator=g) * 3).to(torch.bfloat16)
    page = bs * f.record_bytes + _page_pad(fmt, bs, 1)
    k_cache = torch.randint(0, 256, (num_blocks * page,), generator=g, dtype=torch.uint8).as_strided(
        (num_blocks, bs, f.record_bytes), (page, f.record_bytes, 1))
    slots = torch.randperm(num_blocks * bs, generator=g)[:tokens]
    slots[::3] = -1
    expected = clone_strided(k_cache)
    quantize_and_insert_torch(k, expected, slots, bs, f)
    cache = _to(k_cache, "cuda")
    kvgen.quantize_and_insert_k_cache(k.cuda(), cache, slots.cuda(), bs)
    torch.cuda.synchronize()
    assert kvgen.last_backend() == "cubin"
    assert torch.equal(whole_storage(cache).cpu(), whole_storage(expected))


@pytest.mark.gpu
@pytest.mark.parametrize("fmt, bs", CASES)
def test_user_tree_cubins_bit_exact(with_trees, fmt, bs, monkeypatch):
    """Every row of the user trees, through the public ops (cubin backend), against the oracle."""
    monkeypatch.setenv("KVGEN_BACKEND", "cubin")
    for pdl in ("1", "0"):
        monkeypatch.setenv("KVGEN_PDL", pdl)
        for seed in range(3):
            for make, op, oracle in [
                    (_dense, kvgen.dequantize_and_gather_k_cache, dequantize_and_gather_oracle),
                    (_sparse, kvgen.dequantize_and_gather_k_cache_sparse, dequantize_and_gather_sparse_oracle)]:
                case = make(fmt, bs, seed)
                expected = case.out.clone()
                oracle(*case.args(out=expected))
                out = case.out.to("cuda")
                op(*case.args("cuda", out=out))
                torch.cuda.synchronize()
                assert kvgen.last_backend() == "cubin"
                assert mismatches(out.cpu(), expected) == 0, (fmt, bs, make.__name__, seed, pdl)


if __name__ == "__main__":  # build the trees for a GPU machine: python -m tests.test_user_trees OUT
    print({name: str(path) for name, path in build_trees(Path(sys.argv[1])).items()})


def test_a_tree_refuses_a_second_format_of_the_same_record_size(tmp_path):
    """Building another spec into a tree must not give it two 648-byte formats
    (calls could not tell them apart): refused before anything is written."""
    pytest.importorskip("cutlass")
    from kvgen.build.tree import build
    from kvgen.runtime.manifest import ManifestError
    from kvgen.spec import load_spec

    tree = tmp_path / "tree"
    first = tmp_path / "a.toml"
    first.write_text(EXAMPLE.read_text())
    configs = load_spec(first).configs
    build([c for c in configs if c.block_size == 64 and c.family == "dqgk"][:1], tree, progress=False)
    files = sorted(p.name for p in tree.rglob("*"))
    other = tmp_path / "b.toml"
    other.write_text("[formats.g128]\nvalues = 384\ntail = 128\nscale_group = 128\nscale_pad = 5\n"
                     "[[dequant_gather]]\nformat = 'g128'\nindexing = 'dense'\nblock_size = 64\nnum_stages = 3\n")
    with pytest.raises(ManifestError, match="already defines format fp8_384 \\(648-byte records\\)"):
        build(load_spec(other).configs, tree, progress=False)
    assert sorted(p.name for p in tree.rglob("*")) == files  # nothing written


def test_an_unreadable_manifest_is_never_built_or_pruned_over(tmp_path):
    from kvgen.build.tree import build, prune
    from kvgen.runtime.manifest import ManifestError

    tree = tmp_path / "tree"
    shutil.copytree(REPO / "generated", tree, ignore=shutil.ignore_patterns("__pycache__"))
    manifest = json.loads((tree / "manifest.json").read_text())
    manifest["format"] = 99  # a newer kvgen's, say
    (tree / "manifest.json").write_text(json.dumps(manifest))
    cubins = sorted((tree / "cubins").rglob("*.cubin"))
    for act in (lambda: prune(None, tree), lambda: build([], tree, progress=False)):
        with pytest.raises(ManifestError, match="not a kvgen manifest of format 2"):
            act()
    assert sorted((tree / "cubins").rglob("*.cubin")) == cubins
    done = subprocess.run([sys.executable, "-m", "kvgen", "prune", "--out", str(tree)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "prune --out DIR needs the --spec FILE" in done.stderr


def test_a_tree_that_fails_to_load_is_never_silently_dropped(tmp_path):
    missing = tmp_path / "not_built_yet"
    try:
        reset_registry()
        registry().entries
        os.environ["KVGEN_KERNEL_DIRS"] = str(missing)
        reset_registry()
        for _ in range(2):  # the same error every time, not once and then a registry without the tree
            with pytest.raises(ValueError, match="manifest not found"):
                registry().entries
    finally:
        os.environ.pop("KVGEN_KERNEL_DIRS", None)
        reset_registry()
