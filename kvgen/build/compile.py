"""Stage 2: generated CuteDSL module -> PTX. Build time only (needs CuteDSL, no GPU)."""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..config import ARCHS
from ..paths import KERNELS_PACKAGE, helpers_file

# CuteDSL (4.8.1) writes --keep-ptx output to <dump dir>/<host function>.<arch>.ptx
# and reads it back; the dump dir defaults to the working directory and every
# generated module's host function is `launch`. Seen here: two builds running
# at once were each handed the other's PTX. So each compile gets a private dump
# dir and a host function named after the kernel; kvgen's build key is the only
# cache (CuteDSL's own are off), and the entry symbol is checked.
os.environ["CUTE_DSL_DISABLE_FILE_CACHING"] = "1"
os.environ["CUTE_DSL_NO_CACHE"] = "1"

_ENTRY = re.compile(r"^\.visible \.entry (\w+)\(", re.MULTILINE)


@dataclass(frozen=True)
class CompiledPTX:
    ptx: str
    symbol: str
    params: tuple[tuple[str, str], ...]  # (name, C type), as the module declares them
    threads: int
    smem_bytes: int


def _fake_argument(ctype: str, align: int):
    import cutlass
    import cutlass.cute as cute
    from cutlass.cute.runtime import make_ptr

    pointee = {"__nv_bfloat16*": cutlass.BFloat16, "uint8_t*": cutlass.Uint8, "int32_t*": cutlass.Int32,
               "int64_t*": cutlass.Int64}
    scalar = {"int64_t": cutlass.Int64, "int32_t": cutlass.Int32}
    if ctype in pointee:
        # The address is never dereferenced: compilation only traces the kernel.
        return make_ptr(pointee[ctype], 1 << 20, cute.AddressSpace.gmem, assumed_align=align)
    return scalar[ctype](0)


def _exec_source(module_name: str, path: Path, package_path: Path | None = None) -> types.ModuleType:
    """Execute `path` as module `module_name` from its current text: no
    sys.modules entry, no __pycache__ bytecode (whose mtime/size check can miss
    an edit that keeps the file's size within one second) is reused."""
    module = types.ModuleType(module_name)
    module.__file__ = str(path)
    module.__package__ = KERNELS_PACKAGE
    if package_path is not None:
        module.__path__ = [str(package_path)]
    sys.modules[module_name] = module
    exec(compile(path.read_text(), str(path), "exec"), module.__dict__)
    return module


@contextlib.contextmanager
def import_generated(generated_dir: Path, name: str, arch: str) -> Iterator[types.ModuleType]:
    """The generated module `name` of this tree, loaded afresh (with this tree's
    helpers), registered in sys.modules while the block runs -- CuteDSL reads
    the kernel's source and globals as it traces -- and unregistered after, so
    that no later compile, of this tree or another, is handed it."""
    kernels = Path(generated_dir) / KERNELS_PACKAGE
    ours = lambda key: key == KERNELS_PACKAGE or key.startswith(KERNELS_PACKAGE + ".")  # noqa: E731
    saved = {key: module for key, module in sys.modules.items() if ours(key)}
    for key in saved:
        del sys.modules[key]
    try:
        _exec_source(KERNELS_PACKAGE, kernels / "__init__.py", package_path=kernels)
        helpers = helpers_file(ARCHS[arch].flavour)
        _exec_source(f"{KERNELS_PACKAGE}.{Path(helpers).stem}", kernels / helpers)
        yield _exec_source(f"{KERNELS_PACKAGE}.{name}", kernels / f"{name}.py")
    finally:
        for key in [key for key in sys.modules if ours(key)]:
            del sys.modules[key]
        sys.modules.update(saved)


def compile_module(generated_dir: Path, name: str, arch: str) -> CompiledPTX:
    """Trace and compile one generated module (the file as it is now) with
    CuteDSL for `arch`; return its PTX."""
    with import_generated(generated_dir, name, arch) as module:
        return _compile(module, name, arch)


def _compile(module: types.ModuleType, name: str, arch: str) -> CompiledPTX:
    import cutlass.cute as cute

    args = [_fake_argument(ctype, module.POINTER_ALIGN.get(pname, 0)) for pname, ctype in module.PARAMS]
    with tempfile.TemporaryDirectory(prefix="kvgen-dump-") as dump_dir:
        options = f"--gpu-arch {ARCHS[arch].gpu_arch} --keep-ptx --dump-dir {dump_dir}"
        compiled = cute.compile(module.launch, *args, options=options)
        ptx = compiled.artifacts.PTX
    # A kernel launched with PDL that does not wait would race the kernel before it.
    if module.CONFIG["pdl"] != ("griddepcontrol.wait;" in ptx):
        raise RuntimeError(f"{name}: config pdl={module.CONFIG['pdl']} but the PTX "
                           f"{'lacks' if module.CONFIG['pdl'] else 'has'} griddepcontrol.wait")
    entries = _ENTRY.findall(ptx)
    if len(entries) != 1 or not entries[0].startswith(name):
        raise RuntimeError(f"{name}: expected one kernel entry named after it in the PTX, found {entries}")
    return CompiledPTX(ptx=ptx, symbol=entries[0], params=tuple(module.PARAMS),
                       threads=module.THREADS, smem_bytes=module.SMEM_BYTES)
