"""kvgen: specialised, prebuilt CuteDSL kernels for paged FP8 KV caches.

The runtime API needs torch and the NVIDIA driver (called through ctypes) only; the build tooling
(kvgen.render/compile/link/build) needs jinja2, CuteDSL and nvJitLink and is
imported only by `make generate` / `make build`.

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


if not _imported_by_the_cli():
    from .ops import (
        BackendUnavailable,
        dequantize_and_gather_k_cache,
        dequantize_and_gather_k_cache_sparse,
        last_backend,
        select_backend,
        select_backend_sparse,
    )


def __getattr__(name: str):
    if name in __all__:  # every public name comes from kvgen.ops
        from . import ops

        value = getattr(ops, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "BackendUnavailable",
    "dequantize_and_gather_k_cache",
    "dequantize_and_gather_k_cache_sparse",
    "last_backend",
    "select_backend",
    "select_backend_sparse",
]
__version__ = "0.1.0"
