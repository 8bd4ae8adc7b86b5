import os

import pytest
import torch

# Without a GPU, the Triton fallback runs in Triton's CPU interpreter. The
# variable is read when kernels are decorated, so set it before kvgen imports Triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_dispatch(monkeypatch):
    """Tests choose backends explicitly: a KVGEN_BACKEND in the caller's shell must not
    leak in, nor a dispatch decision cached under another test's mocks."""
    from kvgen.runtime.backend import clear_dispatch_cache

    monkeypatch.delenv("KVGEN_BACKEND", raising=False)
    clear_dispatch_cache()
    yield
    clear_dispatch_cache()
