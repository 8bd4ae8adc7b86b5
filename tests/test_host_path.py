"""The per-call host path on the CPU: the switches read in one snapshot (and
still honoured at each call), the ops registered without custom_op (same
schemas, versions bumped, fakes registered), the launch's argument packing and
grid memo, and the host-cost benchmark with its faked driver."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kvgen
from kvgen import env
from kvgen.errors import UsageError
from kvgen.families.dequant_gather import op as ops
from kvgen.runtime import backend, switches
from kvgen.runtime.loader import LoadedKernel, registry
from kvgen.testing import make_case, make_packed_case, make_raw_packed_case, make_sparse_case

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ switches
def test_a_snapshot_sees_setenv_and_delenv_at_once(monkeypatch):
    read = env.reader(("KVGEN_TEST_A", "KVGEN_TEST_B"))
    monkeypatch.delenv("KVGEN_TEST_A", raising=False)
    monkeypatch.delenv("KVGEN_TEST_B", raising=False)
    assert read() == (None, None)
    monkeypatch.setenv("KVGEN_TEST_B", "On ")
    a, b = read()
    assert a is None and env.text(b) == "on"
    monkeypatch.delenv("KVGEN_TEST_B")
    assert read() == (None, None)


def test_the_snapshot_falls_back_to_os_environ_get(monkeypatch):
    """Where os.environ is not CPython's POSIX mapping (here: a plain dict), it is read by name."""
    read = env.reader(("KVGEN_TEST_A",))
    monkeypatch.setattr(os, "environ", {"KVGEN_TEST_A": "yes"})
    assert read() == ("yes",)
    assert env.flag("KVGEN_TEST_A", read()[0], False) is True


@pytest.mark.parametrize("raw", ["1", b"1", " TRUE ", b"on", "yes"])
def test_flags_parse_str_and_bytes_alike(raw):
    assert env.flag("KVGEN_X", raw, False) is True


def test_a_bad_flag_raises_at_every_read():
    for _ in range(2):  # not cached: the second read raises too
        with pytest.raises(UsageError, match="KVGEN_X='maybe': expected 1 or 0"):
            env.flag("KVGEN_X", b"maybe", True)
    assert env.flag("KVGEN_X", None, True) is True and env.flag("KVGEN_X", b"", False) is False


def test_switches_changed_between_calls_are_honoured_without_clearing_caches(monkeypatch):
    """The dispatch cache is keyed by the snapshot: each call sees the environment as it is then."""
    args = make_case(seq_lens=[70, 5], block_size=16).args()
    kvgen.dequantize_and_gather_k_cache(*args)
    assert kvgen.last_backend() == "torch"  # CPU tensors
    monkeypatch.setenv("KVGEN_BACKEND", "cubin")
    with pytest.raises(kvgen.BackendUnavailable, match="not a CUDA device"):
        kvgen.dequantize_and_gather_k_cache(*args)
    monkeypatch.setenv("KVGEN_PDL", "2")
    monkeypatch.setenv("KVGEN_BACKEND", "torch")
    for _ in range(2):  # a bad value is refused at every call, never cached
        with pytest.raises(ValueError, match="KVGEN_PDL='2': expected"):
            kvgen.dequantize_and_gather_k_cache(*args)
    monkeypatch.delenv("KVGEN_PDL")
    kvgen.dequantize_and_gather_k_cache(*args)
    assert kvgen.last_backend() == "torch"
    monkeypatch.setenv("KVGEN_CHECK", "sometimes")
    with pytest.raises(ValueError, match="KVGEN_CHECK='sometimes'"):
        kvgen.dequantize_and_gather_k_cache(*args)


def test_the_snapshot_names_every_switch_the_runtime_reads():
    assert switches.NAMES[switches.BACKEND] == "KVGEN_BACKEND"
    assert switches.NAMES[switches.PDL] == "KVGEN_PDL"
    assert switches.NAMES[switches.PTX] == "KVGEN_PTX"
    assert switches.NAMES[switches.CHECK] == "KVGEN_CHECK"
    assert switches.NAMES[switches.TRITON_INTERPRET] == "TRITON_INTERPRET"


# -------------------------------------------------------------- registration
SCHEMAS = {
    "dequantize_and_gather_k_cache": "kvgen::dequantize_and_gather_k_cache(Tensor(a0!) out, Tensor k_cache, "
    "Tensor seq_lens, Tensor? gather_lens, Tensor block_table, SymInt block_size, SymInt offset) -> ()",
    "dequantize_and_gather_k_cache_sparse": "kvgen::dequantize_and_gather_k_cache_sparse(Tensor(a0!) out, "
    "Tensor k_cache, Tensor slot_indices, SymInt block_size) -> ()",
    "cp_gather_and_upconvert_fp8_kv_cache": "kvgen::cp_gather_and_upconvert_fp8_kv_cache(Tensor src_cache, "
    "Tensor(a1!) dst, Tensor block_table, Tensor workspace_starts, SymInt batch_size, "
    "Tensor? seq_starts=None) -> ()",
    "cp_gather_indexer_k_quant_cache": "kvgen::cp_gather_indexer_k_quant_cache(Tensor kv_cache, Tensor(a1!) dst_k, "
    "Tensor(a2!) dst_scale, Tensor block_table, Tensor cu_seq_lens) -> ()",
    "quantize_and_insert_k_cache": "kvgen::quantize_and_insert_k_cache(Tensor k, Tensor(a1!) k_cache, "
    "Tensor slot_mapping, SymInt block_size, SymInt? record_bytes=None) -> ()",
    "concat_and_cache_ds_mla": "kvgen::concat_and_cache_ds_mla(Tensor kv_c, Tensor k_pe, Tensor(a2!) kv_cache, "
    "Tensor slot_mapping) -> ()",
    "indexer_k_quant_and_cache": "kvgen::indexer_k_quant_and_cache(Tensor k, Tensor(a1!) kv_cache, "
    "Tensor slot_mapping, SymInt quant_block_size, str? scale_fmt=None) -> ()",
}


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_ops_keep_their_schemas_and_tags(name):
    op = getattr(torch.ops.kvgen, name).default
    assert str(op._schema) == SCHEMAS[name]
    assert torch.Tag.pt2_compliant_tag in op.tags


def _writer_cases():
    from kvgen.testing import as_format

    g = torch.Generator().manual_seed(0)
    slots = torch.tensor([3, -1, 17, 20], dtype=torch.int64)
    v32, idx = as_format("v32_656"), as_format("indexer_132")
    ds_mla = (torch.randn(4, v32.values, generator=g).to(torch.bfloat16),
              torch.randn(4, v32.tail, generator=g).to(torch.bfloat16),
              torch.zeros(2, 16, v32.record_bytes, dtype=torch.uint8), slots)
    indexer = (torch.randn(4, idx.head_dim, generator=g).to(torch.bfloat16),
               torch.zeros(2, 16, idx.record_bytes, dtype=torch.uint8), slots, idx.scale_group, "ue8m0")
    return {"concat_and_cache_ds_mla": ds_mla, "indexer_k_quant_and_cache": indexer}


def _cases():
    """The arguments of each op not opchecked elsewhere."""
    return {
        "cp_gather_and_upconvert_fp8_kv_cache": make_packed_case(seq_lens=[8, 0, 5], block_size=16).args(),
        "cp_gather_indexer_k_quant_cache": make_raw_packed_case(seq_lens=[8, 5], block_size=16).args(),
        **_writer_cases(),
    }


@pytest.mark.parametrize("name", ["cp_gather_and_upconvert_fp8_kv_cache", "cp_gather_indexer_k_quant_cache",
                                  "concat_and_cache_ds_mla", "indexer_k_quant_and_cache"])
def test_ops_pass_opcheck(name, monkeypatch):
    monkeypatch.setenv("KVGEN_BACKEND", "torch")
    args = _cases()[name]
    torch.library.opcheck(getattr(torch.ops.kvgen, name).default, args, test_utils=("test_schema", "test_faketensor"))


def test_torch_ops_bump_the_versions_of_what_they_mutate(monkeypatch):
    """As custom_op's ADInplaceOrView kernel did: the mutated tensors' version
    counters move (autograd sees the write), the others' do not."""
    monkeypatch.setenv("KVGEN_BACKEND", "torch")
    monkeypatch.setattr(ops, "DENSE_PATHS", ops.DENSE_PATHS._replace(torch=lambda *args: None))  # no write of its own
    args = make_case(seq_lens=[70, 5], block_size=16).args()
    before = [a._version if isinstance(a, torch.Tensor) else None for a in args]
    torch.ops.kvgen.dequantize_and_gather_k_cache(*args)
    after = [a._version if isinstance(a, torch.Tensor) else None for a in args]
    assert after[0] == before[0] + 1 and after[1:] == before[1:]
    kvgen.dequantize_and_gather_k_cache(*args)  # the eager entry point: as before, no bump
    assert args[0]._version == after[0]


def test_ops_run_on_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    sparse = make_sparse_case(num_slots=8, valid=0.5, block_size=16).args()
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in sparse]
        assert torch.ops.kvgen.dequantize_and_gather_k_cache_sparse(*fake) is None


def test_errors_through_torch_ops_are_the_eager_ones():
    args = list(make_case(seq_lens=[70, 5], block_size=16).args())
    args[6] = -1
    for op in (kvgen.dequantize_and_gather_k_cache, torch.ops.kvgen.dequantize_and_gather_k_cache):
        with pytest.raises(ValueError, match="offset: must be >= 0, got -1"):
            op(*args)


# -------------------------------------------------------------------- launch
def _pdl_entry():
    return next(e for e in registry().entries if e.pdl and e.config.get("indexing") == "dense")


def test_values_are_packed_in_the_rows_abi_order_whatever_the_ops_order():
    entry = _pdl_entry()
    kernel = LoadedKernel(entry=entry, library=None, kernel=1, _prepared_devices={0})
    in_order = {name: i + 1 for i, (name, _) in enumerate(entry.params)}
    shuffled = dict(reversed(in_order.items()))
    recorded = []

    class RecordingDriver:
        """Records, at each launch, the packed 8-byte argument slots and the config's grid and stream."""

        def cuLaunchKernelEx_unconverted(self, config_ref, kernel_handle, pointers, extra):
            buffers = kernel._thread.buffers
            recorded.append((list(buffers.values), tuple(buffers.grid), buffers.config.stream))
            return 0

    for values in (in_order, shuffled, in_order):
        args = kernel.in_abi_order(tuple(values), tuple(values.values()))
        kernel.launch((3, 2, 1), args, stream=7, device=0, pdl=True, cuda=RecordingDriver())
    assert recorded == [(list(in_order.values()), (3, 2, 1), 7)] * 3
    del shuffled[entry.params[0][0]]
    with pytest.raises(KeyError, match=entry.params[0][0]):  # a row asking for a parameter the op does not give
        kernel.in_abi_order(tuple(shuffled), tuple(shuffled.values()))


def test_grids_are_computed_once_per_row_and_size():
    from kvgen.runtime.launch import memoised_grid

    entry, other = [e for e in registry().entries if e.config.get("indexing") == "dense"][:2]
    calls = []

    @memoised_grid
    def grid(e, *sizes):
        calls.append((e.name, sizes))
        return (sizes[0], 1, 1)

    assert grid(entry, 4, 100) == grid(entry, 4, 100) == (4, 1, 1)
    assert grid(entry, 5, 100) == grid(other, 5, 100) == (5, 1, 1)
    assert calls == [(entry.name, (4, 100)), (entry.name, (5, 100)), (other.name, (5, 100))]
    assert ops._grid(entry, 2, 300) == ops._grid.__wrapped__(entry, 2, 300)  # the op's own, memoised


# ---------------------------------------------------------------- benchmark
def test_host_cost_runs_with_the_faked_driver(tmp_path):
    """benchmarks/host_cost.py --fake-driver --miss: every op served by the cubin path, ratios and misses reported."""
    out = tmp_path / "host.json"
    done = subprocess.run([sys.executable, "benchmarks/host_cost.py", "--fake-driver", "--calls", "200",
                           "--repeats", "1", "--miss", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert set(report["ops"]) == set(SCHEMAS)
    for name, row in report["ops"].items():
        assert row["backend"] == "cubin", name
        assert row["direct_us"] > 0 and row["torch_ops_vs_direct"] > 0 and row["miss_us"] > 0
    assert "direct/copy_" in done.stdout


def test_serve_runs_a_fallback_without_a_launch(monkeypatch):
    monkeypatch.setenv("KVGEN_BACKEND", "torch")
    seen = []
    paths = backend.Paths(lambda *a: seen.append("cubin"), lambda *a: seen.append("triton"),
                          lambda *a: seen.append(("torch", a)))
    backend.serve(backend.Decision("torch"), torch.device("cpu"), paths, None, (1, 2))
    assert seen == [("torch", (1, 2))] and kvgen.last_backend() == "torch"


# --------------------------------------------------------------------- plans
class _LaunchRecorder:
    """A driver whose launches record their packed argument slots and grid; torch's context current."""

    def __init__(self):
        self.launches = []
        self.kernel = None

    def current_context(self):
        return 1

    def cuLaunchKernelEx_unconverted(self, *args):
        buffers = self.kernel._thread.buffers
        self.launches.append((list(buffers.values), tuple(buffers.grid)))
        return 0

    def cuLaunchKernel(self, kernel, gx, gy, gz, *rest):
        self.launches.append((list(self.kernel._thread.buffers.values), (gx, gy, gz)))
        return 0


@pytest.fixture
def faked_h100(monkeypatch):
    """CPU tensors served by the cubin path: an H100 faked, each launch recorded instead of made."""
    from kvgen.runtime import launch

    recorder = _LaunchRecorder()

    def loaded(entry):
        recorder.kernel = recorder.kernel if recorder.kernel and recorder.kernel.entry is entry else LoadedKernel(
            entry=entry, library=None, kernel=1, _prepared_devices={-1})
        return recorder.kernel

    monkeypatch.setattr(backend, "device_info", lambda device: ("cuda", (9, 0), "NVIDIA H100 80GB HBM3"))
    monkeypatch.setattr(backend, "driver", lambda: "a driver")
    monkeypatch.setattr(launch, "driver", lambda: recorder)
    monkeypatch.setattr(launch, "_raw_stream", lambda device: 0)
    monkeypatch.setitem(launch._primary_contexts, -1, 1)
    monkeypatch.setattr(registry(), "get", loaded)
    return recorder


def test_a_repeated_call_takes_its_plan_with_its_own_pointers(faked_h100):
    """The second call of a signature skips validation and dispatch; its
    pointers are its own; a changed shape, stride, scalar or switch is a new
    signature, planned afresh; a failing call is never planned."""
    case = make_case(seq_lens=[40, 17], block_size=16, offset=1)
    args = list(case.args())
    kvgen.dequantize_and_gather_k_cache(*args)
    assert kvgen.last_backend() == "cubin" and len(registry().plans) == 1
    first = faked_h100.launches[-1]
    other_out = args[0].clone()
    kvgen.dequantize_and_gather_k_cache(other_out, *args[1:])  # planned: the same signature
    assert len(registry().plans) == 1 and kvgen.last_backend() == "cubin"
    values, grid = faked_h100.launches[-1]
    assert values[0] == other_out.data_ptr() and values[1:] == first[0][1:] and grid == first[1]
    kvgen.dequantize_and_gather_k_cache(*args[:6], 2)  # another offset: another max_rows
    assert len(registry().plans) == 2 and faked_h100.launches[-1][0][-2:] == [2, args[0].shape[1] - 2]
    with pytest.raises(TypeError, match="offset: expected an int, got bool"):  # not 1's plan
        kvgen.dequantize_and_gather_k_cache(*args[:6], True)
    with pytest.raises(ValueError, match="offset: must be <= out.shape"):
        kvgen.dequantize_and_gather_k_cache(args[0][:, :0], *args[1:])
    assert len(registry().plans) == 2


def test_no_plan_under_kvgen_check_or_for_a_tensor_subclass(faked_h100, monkeypatch):
    args = list(make_case(seq_lens=[40, 17], block_size=16).args())
    monkeypatch.setenv("KVGEN_CHECK", "1")
    for _ in range(2):
        kvgen.dequantize_and_gather_k_cache(*args)
    assert not registry().plans and len(faked_h100.launches) == 2
    args[2] = args[2].clone()
    args[2][0] = 10**6  # past the block table: refused at every call
    with pytest.raises(ValueError, match="seq_lens: request 0"):
        kvgen.dequantize_and_gather_k_cache(*args)
    monkeypatch.delenv("KVGEN_CHECK")
    args = list(make_case(seq_lens=[40, 17], block_size=16).args())
    args[0] = torch.nn.Parameter(args[0], requires_grad=False)
    kvgen.dequantize_and_gather_k_cache(*args)
    assert not registry().plans and kvgen.last_backend() == "cubin"


def test_the_writer_plans_its_tail_inside_k(faked_h100):
    """Without a tail tensor the writer's tail pointer lies inside k's rows: a plan keeps that offset."""
    from kvgen.families.quantize_insert.op import PARAMS

    k_cache = torch.zeros(2, 16, 584, dtype=torch.uint8)
    slots = torch.tensor([0, 3, -1, 9])
    for k in (torch.zeros(4, 512, dtype=torch.bfloat16), torch.ones(4, 512, dtype=torch.bfloat16)):
        kvgen.quantize_and_insert_k_cache(k, k_cache, slots, 16)
        values = dict(zip(PARAMS, faked_h100.launches[-1][0]))
        assert values["k"] == k.data_ptr() and values["tail"] == k.data_ptr() + 2 * 448
    assert len(registry().plans) == 1
