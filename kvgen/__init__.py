"""kvgen: specialised, prebuilt CuteDSL kernels for paged FP8 KV caches.

The package is laid out by stage:
  kvgen/formats.py, config.py, spec.py   record formats, generator parameters, spec files (no torch)
  kvgen/build/        render -> compile -> link -> tree (jinja2, CuteDSL, nvJitLink; build time only)
  kvgen/runtime/      manifest -> load -> dispatch -> launch (torch and the NVIDIA driver only)
  kvgen/families/     one folder per kernel family: its config and ABI, op, reference, fallback, oracle
  kvgen/tools/        bench, tune (on a GPU, by hand)

`import kvgen` imports torch and registers the custom ops torch.ops.kvgen.*,
except where the package is imported to run the CLI (`python -m kvgen`, the
`kvgen` console script): there the public names below resolve on first use,
so that `--help` and argument errors answer without importing torch.
"""

import os as _os
import sys as _sys


def _imported_by_the_cli() -> bool:
    argv = _sys.argv
    if argv and argv[0] == "-m":
        # `python -m NAME args`: while runpy locates NAME.__main__, sys.argv[0]
        # is "-m" (documented); sys.orig_argv ends with NAME (or -mNAME), args.
        orig = getattr(_sys, "orig_argv", [])
        i = len(orig) - len(argv)
        name = orig[i] if 0 <= i < len(orig) else ""
        return (name[2:] if name.startswith("-m") else name) == "kvgen"
    # The console script (`from kvgen.cli import main; sys.exit(main())`) is __main__.
    main_file = getattr(_sys.modules.get("__main__"), "__file__", None) or ""
    return bool(argv) and main_file == argv[0] and \
        _os.path.splitext(_os.path.basename(main_file))[0] in ("kvgen", "kvgen-script")


# Every public name, and the module that defines it.
_PUBLIC = {
    "BackendUnavailable": "kvgen.runtime.backend",
    "last_backend": "kvgen.runtime.backend",
    "add_kernel_dir": "kvgen.runtime.loader",
    "dequantize_and_gather_k_cache": "kvgen.families.dequant_gather.op",
    "dequantize_and_gather_k_cache_sparse": "kvgen.families.dequant_gather.op",
    "cp_gather_and_upconvert_fp8_kv_cache": "kvgen.families.dequant_gather.op",
    "cp_gather_indexer_k_quant_cache": "kvgen.families.dequant_gather.op",
    "select_backend": "kvgen.families.dequant_gather.op",
    "select_backend_sparse": "kvgen.families.dequant_gather.op",
    "quantize_and_insert_k_cache": "kvgen.families.quantize_insert.op",
    "concat_and_cache_ds_mla": "kvgen.families.quantize_insert.op",
    "indexer_k_quant_and_cache": "kvgen.families.quantize_insert.op",
    "select_backend_insert": "kvgen.families.quantize_insert.op",
}
__all__ = list(_PUBLIC)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _PUBLIC:
        import importlib

        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))


if not _imported_by_the_cli():
    # Registers torch.ops.kvgen.* at once, as users of `import kvgen` expect.
    from .families.dequant_gather.op import (  # noqa: F401
        cp_gather_and_upconvert_fp8_kv_cache,
        cp_gather_indexer_k_quant_cache,
        dequantize_and_gather_k_cache,
        dequantize_and_gather_k_cache_sparse,
        select_backend,
        select_backend_sparse,
    )
    from .families.quantize_insert.op import (  # noqa: F401
        concat_and_cache_ds_mla,
        indexer_k_quant_and_cache,
        quantize_and_insert_k_cache,
        select_backend_insert,
    )
    from .runtime.backend import BackendUnavailable, last_backend  # noqa: F401
    from .runtime.loader import add_kernel_dir  # noqa: F401
