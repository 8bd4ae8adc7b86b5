"""Several GPUs in one process (issue 18; marker `gpu`, skipped with fewer
than two CUDA devices).

The loader loads each cubin once as a CUDA library (one handle for every
context) and launches in the primary context of the tensors' device, pushing
it when another context is current. These tests show that on two devices:
every family and format served on the device that is not the current one, on
the cubin, PTX and Triton paths (the golden corpora: every shipped format,
indexing mode and writer); calls from threads whose current devices differ;
first use of one kernel from eight threads over both devices (one load each);
CUDA graphs captured on each device; and a tensor on the other device named
in one line. The speed of a gather on each device is a benchmark:
`benchmarks/multi_gpu_speed.py`.
"""

import os
import subprocess
import sys
import textwrap
import threading
import warnings

import pytest
import torch

import kvgen
from kvgen.families.dequant_gather.reference import dequantize_and_gather_torch
from kvgen.testing import POISON_BF16, make_case, mismatches
from tests.golden import corpus, writer_corpus

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                 reason="needs two CUDA devices")]

BACKENDS = ("cubin", "ptx", "triton")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("current, target", [(0, 1), (1, 0)])
def test_every_family_on_the_device_that_is_not_current(current, target, backend, monkeypatch):
    monkeypatch.setenv("KVGEN_BACKEND", backend)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the PTX route's JIT notice
        with torch.cuda.device(current):
            device = f"cuda:{target}"
            wrong = corpus.public_mismatches(device, backend) + writer_corpus.public_mismatches(device, backend)
            assert torch.cuda.current_device() == current
    assert not wrong, wrong


def test_threads_whose_current_devices_differ(monkeypatch):
    """Four threads at once, each with its own current device, each gathering and
    writing on the other device."""
    monkeypatch.setenv("KVGEN_BACKEND", "cubin")
    barrier = threading.Barrier(4)
    results: dict[int, list[str]] = {}

    def worker(i: int) -> None:
        torch.cuda.set_device(i % 2)
        barrier.wait()
        target = f"cuda:{(i + 1) % 2}"
        results[i] = corpus.public_mismatches(target, "cubin") + writer_corpus.public_mismatches(target, "cubin")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert sorted(results) == [0, 1, 2, 3] and not any(results.values()), results


def test_first_use_from_eight_threads_over_two_devices():
    """In a fresh process: the same kernel's first use from eight threads, four a
    device, loads its cubin once and every launch gives the reference's bits."""
    script = textwrap.dedent("""
        import threading, torch, kvgen
        from kvgen.runtime import driver as drv
        from kvgen.testing import make_case, mismatches
        from kvgen.families.dequant_gather.reference import dequantize_and_gather_torch

        loads = []
        cuda = drv.driver()
        original = cuda.load_library
        def counting(image, what):
            loads.append(what)
            return original(image, what)
        cuda.load_library = counting

        case = make_case(seq_lens=[500, 3, 64], gather_lens=[400, 3, 10], block_size=64, seed=3)
        expected = case.out.clone()
        dequantize_and_gather_torch(*case.args(out=expected))
        barrier = threading.Barrier(8)
        results = []
        def worker(i):
            device = f"cuda:{i % 2}"
            out = case.out.to(device)
            args = case.args(device, out=out)
            barrier.wait()
            kvgen.dequantize_and_gather_k_cache(*args)
            torch.cuda.synchronize(device)
            results.append((kvgen.last_backend(), mismatches(out.cpu(), expected)))
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        [t.start() for t in threads]; [t.join() for t in threads]
        assert len(results) == 8 and all(r == ("cubin", 0) for r in results), results
        assert len(loads) == 1, loads
        print("ok", loads)
    """)
    env = dict(os.environ, KVGEN_BACKEND="cubin")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("device", [0, 1])
def test_a_cuda_graph_captured_on_each_device_replays(device, monkeypatch):
    monkeypatch.setenv("KVGEN_BACKEND", "cubin")
    case = make_case(seq_lens=[300, 7, 64], gather_lens=[200, 7, 10], block_size=64, seed=device)
    expected = case.out.clone()
    dequantize_and_gather_torch(*case.args(out=expected))
    with torch.cuda.device(device):
        out = case.out.to(f"cuda:{device}")
        args = case.args(f"cuda:{device}", out=out)
        kvgen.dequantize_and_gather_k_cache(*args)  # loads and decides outside capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
            kvgen.dequantize_and_gather_k_cache(*args)
        out.view(torch.int16).fill_(POISON_BF16)  # what the replay must overwrite
        graph.replay()
        torch.cuda.synchronize()
        assert mismatches(out.cpu(), expected) == 0


def test_a_tensor_on_the_other_device_is_named():
    case = make_case(seq_lens=[40, 7], block_size=16)
    args = list(case.args("cuda:0"))
    args[4] = args[4].to("cuda:1")  # block_table
    with pytest.raises(ValueError, match=r"^block_table: on cuda:1, but out is on cuda:0"):
        kvgen.dequantize_and_gather_k_cache(*args)
