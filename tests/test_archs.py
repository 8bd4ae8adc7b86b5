"""Every NVIDIA arch in service: arch rows, dispatch by compute capability with
the PTX route, and -- on the H100, the one GPU the project can run on -- each
helper flavour's PTX JIT-compiled and checked bit for bit on the golden corpora
and the fuzz, readers and writers (the sm_80 flavour's compute_80 PTX runs on
sm_90; so does the Hopper flavour's compute_90 PTX)."""

import collections
import json
import shutil
import warnings

import pytest
import torch

import kvgen
from kvgen.config import ARCHS, ConfigError, FLAVOURS
from kvgen.families.dequant_gather import op as ops
from kvgen.paths import generated_dir
from kvgen.runtime import backend
from kvgen.runtime.loader import registry, reset_registry
from kvgen.testing import make_case

H100 = "NVIDIA H100 80GB HBM3"


def good_args():
    return list(make_case(seq_lens=[40, 17], gather_lens=[30, 17], block_size=16, offset=1, seed=3).args())


@pytest.mark.parametrize("capability, backend_name, arch", [
    ((9, 0), "cubin", "sm_90a"), ((8, 0), "cubin", "sm_80"), ((8, 6), "cubin", "sm_86"), ((8, 9), "cubin", "sm_89"),
    ((10, 0), "cubin", "sm_100a"), ((10, 3), "cubin", "sm_103a"), ((12, 0), "cubin", "sm_120a"),
    ((12, 1), "cubin", "sm_121a"),
    ((8, 7), "ptx", "compute_80"),  # Orin: no cubin of its own
    ((11, 0), "ptx", "compute_90"), ((13, 0), "ptx", "compute_90"),  # newer than this build
    ((7, 5), "triton", None),  # below every target
])
def test_dispatch_by_capability_with_the_ptx_route(capability, backend_name, arch, monkeypatch):
    monkeypatch.setattr(backend, "device_info", lambda device: ("cuda", capability, "a GPU"))
    monkeypatch.setattr(backend, "driver", lambda: "a driver")
    decision = ops.decide_dense(*good_args())
    assert decision.backend == backend_name and (decision.entry.arch if decision.entry else None) == arch
    monkeypatch.setenv("KVGEN_PTX", "0")  # the PTX route off: Triton instead
    backend.clear_dispatch_cache()
    assert ops.decide_dense(*good_args()).backend == ("triton" if backend_name == "ptx" else backend_name)


def test_forcing_cubin_where_there_is_only_ptx_says_so(monkeypatch):
    monkeypatch.setattr(backend, "device_info", lambda device: ("cuda", (11, 0), "a GPU"))
    monkeypatch.setattr(backend, "driver", lambda: "a driver")
    monkeypatch.setenv("KVGEN_BACKEND", "cubin")
    with pytest.raises(kvgen.BackendUnavailable, match="no cubin \\(only PTX: KVGEN_BACKEND=ptx"):
        ops.decide_dense(*good_args())
    monkeypatch.setenv("KVGEN_BACKEND", "ptx")
    assert ops.decide_dense(*good_args()).entry.arch == "compute_90"


def test_every_arch_row_is_shipped_and_pdl_needs_sm_90():
    shipped = {e.arch for e in registry().entries}
    assert shipped == set(ARCHS)
    assert {ARCHS[a].flavour for a in FLAVOURS.values()} == set(FLAVOURS)
    assert not any(e.pdl for e in registry().entries if not ARCHS[e.arch].pdl)
    seed = next(e for e in registry().entries if e.arch == "sm_80" and e.family == "dqgk")
    from kvgen.families.dequant_gather.config import DequantGatherConfig

    config = DequantGatherConfig.from_dict({**seed.config, "format": seed.format})
    with pytest.raises(ConfigError, match="pdl=True needs griddepcontrol \\(sm_90 and newer\\); sm_80"):
        DequantGatherConfig.from_dict({**config.to_dict(), "pdl": True})


def _instructions(ptx: str) -> collections.Counter:
    """The kernel's instructions by opcode, register names and register-to-register
    moves left out (NVVM packs and unpacks register pairs differently per target)."""
    ops = collections.Counter()
    for line in ptx.splitlines():
        line = line.strip()
        if not line or line.startswith(("//", ".", "$", "{", "}", ")")) or line.endswith(":"):
            continue
        opcode = line.split()[0].rstrip(";")
        if opcode.startswith("@"):  # a predicated instruction
            opcode = line.split()[1]
        if opcode.startswith("mov."):
            continue
        ops[opcode] += 1
    return ops


# What decides the bytes: memory traffic, conversions, the arithmetic on values,
# shuffles, barriers, PDL. Index arithmetic (address and bound computations) may
# be scheduled differently per target and is listed, not required equal.
DATA_PATH = ("ld.", "st.", "cp.", "cvt.rn", "cvt.rni", "mul.rn", "fma.", "max.f32", "shfl.", "prmt.", "vset2",
             "griddepcontrol", "bar.", "red.", "atom.")


VERIFIED_TWIN = {"sm_100a": "sm_90a", "sm_103a": "sm_90a", "sm_120a": "sm_90a", "sm_121a": "sm_90a",
                 "compute_90": "sm_90a", "sm_80": "compute_80", "sm_86": "compute_80", "sm_89": "compute_80"}


@pytest.mark.parametrize("arch", sorted(VERIFIED_TWIN))
def test_unrun_cubins_carry_the_h100_verified_ptx(arch, capsys):
    """The cubins of GPUs not lent here are compiled only. Their PTX is compared
    with the PTX verified on the H100 (sm_90a's for the Hopper flavour, the
    JIT-run compute_80's for the integer one), opcode for opcode, register names
    and register moves set aside: the data path must be the same; every other
    difference (index arithmetic NVVM schedules per target) is printed."""
    pytest.importorskip("cutlass")
    from kvgen.build.compile import compile_module

    def key(e):
        return e.family, json.dumps({k: v for k, v in e.config.items() if k != "arch"}, sort_keys=True)

    twin_arch = VERIFIED_TWIN[arch]
    hopper = {key(e): e for e in registry().entries if e.arch == twin_arch}
    data_path, index_only, checked = [], [], 0
    for entry in [e for e in registry().entries if e.arch == arch][::2]:  # every other row: both families
        twin = hopper.get(key(entry))
        if twin is None:
            continue
        mine = _instructions(compile_module(generated_dir(), entry.name, arch).ptx)
        verified = _instructions(compile_module(generated_dir(), twin.name, twin_arch).ptx)
        checked += 1
        extra, missing = mine - verified, verified - mine
        if extra or missing:
            line = f"{entry.name}: +{dict(extra)} -{dict(missing)}"
            on_data = [op for op in (*extra, *missing) if op.startswith(DATA_PATH)]
            (data_path if on_data else index_only).append(line)
    with capsys.disabled():
        print(f"\n{arch}: {checked} kernels against {twin_arch}; {len(index_only)} differ in index arithmetic only"
              + "".join(f"\n  {line}" for line in index_only))
    assert checked >= 20 and not data_path, data_path


# ---------------------------------------------------------------- on the H100
@pytest.fixture(params=sorted(FLAVOURS.values()))
def ptx_only(request, tmp_path):
    """The shipped tree with only one PTX arch's rows: on the H100 every call takes the PTX route."""
    arch = request.param
    root = tmp_path / arch
    shutil.copytree(generated_dir(), root, ignore=shutil.ignore_patterns("__pycache__", "kvgen_kernels", "*.cubin"))
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["kernels"] = [row for row in manifest["kernels"] if row["arch"] == arch]
    (root / "manifest.json").write_text(json.dumps(manifest))
    reset_registry(root)
    yield arch
    reset_registry()


@pytest.mark.gpu
def test_ptx_route_readers_on_the_golden_corpus(ptx_only, monkeypatch):
    from tests.golden.corpus import public_mismatches

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wrong = public_mismatches("cuda", "ptx")
    assert not wrong, (ptx_only, wrong)
    assert any("JIT-compiles" in str(w.message) for w in caught)


@pytest.mark.gpu
def test_ptx_route_writers_on_the_golden_corpus(ptx_only):
    from tests.golden.writer_corpus import public_mismatches

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrong = public_mismatches("cuda", "ptx")
    assert not wrong, (ptx_only, wrong)


@pytest.mark.gpu
def test_ptx_route_readers_on_the_fuzz(ptx_only):
    from kvgen.families.dequant_gather.oracle import dequantize_and_gather_oracle, dequantize_and_gather_sparse_oracle
    from kvgen.testing import mismatches
    from tests.test_fuzz import fuzz_case

    for indexing in ("dense", "sparse"):
        for layout in ("dsv4_584", "v41_528"):
            for seed in range(40):
                f = fuzz_case(seed, indexing, layout)
                oracle = dequantize_and_gather_oracle if indexing == "dense" else dequantize_and_gather_sparse_oracle
                op = (kvgen.dequantize_and_gather_k_cache if indexing == "dense"
                      else kvgen.dequantize_and_gather_k_cache_sparse)
                expected = f.run(oracle)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    got = f.run(op, "cuda")
                assert mismatches(got, expected) == 0, (ptx_only, f.label)


def test_a_cubin_that_fails_to_load_falls_back_to_the_ptx_route_first(monkeypatch):
    """cubin -> PTX -> Triton/torch, each failure warned once; forced, an error."""
    from kvgen.runtime.loader import KvgenLoadError

    monkeypatch.setattr(backend, "device_info", lambda device: ("cuda", (10, 0), "NVIDIA B200"))
    monkeypatch.setattr(backend, "driver", lambda: "a driver")
    tried = []

    def launch(entry, names, values, grid, device, pdl):
        tried.append((entry.arch, pdl))
        raise KvgenLoadError(f"{entry.name}: the driver rejected it (a test)")

    monkeypatch.setattr(ops, "launch", launch)
    args = good_args()
    expected = args[0].clone()
    from kvgen.families.dequant_gather.reference import dequantize_and_gather_torch

    dequantize_and_gather_torch(*(expected, *args[1:]))
    with pytest.warns(RuntimeWarning) as caught:
        kvgen.dequantize_and_gather_k_cache(*args)
    assert [arch for arch, _ in tried] == ["sm_100a", "compute_90"]
    assert kvgen.last_backend() in ("triton", "torch")
    assert sum("falling back from cubin" in str(w.message) for w in caught) == 1
    assert sum("falling back from ptx" in str(w.message) for w in caught) == 1
    from kvgen.testing import mismatches

    assert mismatches(args[0], expected) == 0


def test_contradicting_switches_are_refused(monkeypatch):
    monkeypatch.setattr(backend, "device_info", lambda device: ("cuda", (9, 0), H100))
    monkeypatch.setattr(backend, "driver", lambda: "a driver")
    monkeypatch.setenv("KVGEN_BACKEND", "ptx")
    monkeypatch.setenv("KVGEN_PTX", "0")
    with pytest.raises(kvgen.BackendUnavailable, match="KVGEN_BACKEND=ptx contradicts KVGEN_PTX=0"):
        ops.decide_dense(*good_args())
    monkeypatch.setenv("KVGEN_BACKEND", "cubin")
    monkeypatch.setenv("KVGEN_PTX", "banana")
    with pytest.raises(ValueError, match="KVGEN_PTX='banana'"):
        ops.decide_dense(*good_args())


def test_jit_failures_are_load_failures():
    from kvgen.runtime.driver import IMAGE_ERRORS

    assert {221, 222, 223} <= set(IMAGE_ERRORS)  # no JIT compiler, PTX too new, JIT disabled


def test_every_op_hands_its_row_and_pdl_to_the_launch(monkeypatch):
    """The dense, sparse and writer ops on a (faked) H100: each launches the row
    dispatch chose, with that row's PDL, the ABI values complete."""
    from kvgen.families.quantize_insert import op as insert
    from kvgen.testing import make_sparse_case

    monkeypatch.setattr(backend, "device_info", lambda device: ("cuda", (9, 0), H100))
    monkeypatch.setattr(backend, "driver", lambda: "a driver")
    launched = []
    fake = lambda entry, names, values, grid, device, pdl: launched.append(  # noqa: E731
        (entry.family, entry.config.get("indexing"), entry.arch, pdl,
         len(names) == len(values) and set(names) == {n for n, _ in entry.params}))
    monkeypatch.setattr(ops, "launch", fake)
    monkeypatch.setattr(insert, "launch", fake)
    kvgen.dequantize_and_gather_k_cache(*good_args())
    kvgen.dequantize_and_gather_k_cache_sparse(*make_sparse_case(num_slots=40, valid=0.5, block_size=16).args())
    k = torch.zeros(4, 512, dtype=torch.bfloat16)
    kvgen.quantize_and_insert_k_cache(k, torch.zeros(2, 16, 584, dtype=torch.uint8),
                                      torch.tensor([0, 3, -1, 9]), 16)
    assert launched == [("dqgk", "dense", "sm_90a", True, True), ("dqgk", "sparse", "sm_90a", False, True),
                        ("qik", None, "sm_90a", True, True)]
