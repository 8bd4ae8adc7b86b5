"""Every backend against every golden case (torch and Triton on the CPU; the cubin path on the GPU)."""

import json
import os

import pytest
import torch

import kvgen
from kvgen.runtime.loader import registry
from kvgen.runtime.validate import format_of
from kvgen.testing import PackedCase, RawPackedCase, SparseCase
from tests.golden import corpus
from tests.golden.corpus import (CASES, DIGESTS, EXPECTED_DIR, FULL_TENSOR_CASES, build_case, canonical_digest,
                                 expected_text, oracle_output, reference_output, run_public)

DIGEST_TABLE = json.loads(DIGESTS.read_text())["cases"]


def test_corpus_is_complete_and_committed():
    assert len(CASES) >= 30
    assert set(DIGEST_TABLE) == set(CASES), "run `make golden` and commit tests/golden/"


def family(case) -> tuple[str, str, str, int]:
    """(format name, indexing, output, block size): the key of registry().entries' dqgk configs."""
    indexing = ("packed" if isinstance(case, (PackedCase, RawPackedCase)) else
                "sparse" if isinstance(case, SparseCase) else "dense")
    output = "raw" if isinstance(case, RawPackedCase) else "bf16"
    return format_of(case.k_cache).name, indexing, output, case.block_size


def test_corpus_covers_every_shipped_family_and_block_size():
    shipped = {(e.config["format"], e.config["indexing"], e.config.get("output", "bf16"), e.config["block_size"])
               for e in registry().entries if e.family == "dqgk"}
    covered = {family(build_case(name)) for name in CASES}
    assert shipped <= covered, sorted(shipped - covered)


@pytest.mark.parametrize("name", FULL_TENSOR_CASES)
def test_full_expected_tensors_match(name):
    assert (EXPECTED_DIR / f"{name}.txt").read_text() == expected_text(reference_output(build_case(name)))


@pytest.mark.parametrize("name", sorted(CASES))
def test_oracle_vouches_for_the_digest(name):
    """The digests come from the torch reference; the independent decoder (kvgen/oracle.py) must give them too."""
    assert canonical_digest(oracle_output(build_case(name))) == DIGEST_TABLE[name]["sha256"]


def test_a_disagreement_names_the_case_and_element_and_writes_nothing(monkeypatch, tmp_path, capsys):
    names = ["tiny_b16", "sparse_dsv4_584_b16"]
    monkeypatch.setattr(corpus, "CASES", {n: CASES[n] for n in names})
    digests, expected_dir = tmp_path / "digests.json", tmp_path / "expected"
    monkeypatch.setattr(corpus, "DIGESTS", digests)
    monkeypatch.setattr(corpus, "EXPECTED_DIR", expected_dir)
    good = reference_output(build_case("tiny_b16"))[1, 1, 17].view(torch.int16).item() & 0xFFFF
    assert good != 0x1234

    def corrupted(case):
        out = oracle_output(case)
        if out.dim() == 3 and out.shape[:2] == (2, 2):  # tiny_b16 only
            out[1, 1, 17] = torch.tensor(0x1234, dtype=torch.int16).view(torch.bfloat16)
        return out

    monkeypatch.setattr(corpus, "oracle_output", corrupted)
    for argv in ([], ["--update"]):
        assert corpus.main(argv) == 1
        printed = capsys.readouterr().out
        assert f"golden case 'tiny_b16': the torch reference and the oracle disagree: 1 element(s) differ; " \
               f"first at request 1, row 1, column 17: 0x{good:04x} vs 0x1234" in printed, printed
        assert "sparse_dsv4_584_b16" not in printed and "1 of 2 cases" in printed
        assert not digests.exists() and not expected_dir.exists()
    monkeypatch.setattr(corpus, "oracle_output", oracle_output)
    assert corpus.main([]) == 1  # the two agree again; both cases are new to the empty tmp digests
    assert "2 cases, reference and oracle agree on all; 2 differ" in capsys.readouterr().out


def _run(backend: str, name: str, device: str, monkeypatch) -> torch.Tensor:
    """The case's output after kvgen's public op on `backend` (a raw case's: raw_output(dst_k, dst_scale))."""
    monkeypatch.setenv("KVGEN_BACKEND", backend)
    out, launched = run_public(build_case(name), device)
    if launched:
        assert kvgen.last_backend() == backend
    return out


@pytest.mark.parametrize("name", sorted(CASES))
def test_torch_path(name, monkeypatch):
    assert canonical_digest(_run("torch", name, "cpu", monkeypatch)) == DIGEST_TABLE[name]["sha256"]


@pytest.mark.parametrize("name", sorted(CASES))
def test_triton_interpreter(name, monkeypatch):
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 (set by conftest without a GPU)")
    assert canonical_digest(_run("triton", name, "cpu", monkeypatch)) == DIGEST_TABLE[name]["sha256"]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cubin", "triton", "torch"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_gpu_backends(name, backend, monkeypatch):
    assert canonical_digest(_run(backend, name, "cuda", monkeypatch)) == DIGEST_TABLE[name]["sha256"]
