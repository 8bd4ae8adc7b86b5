"""Stage 2: generated CuteDSL module -> PTX. Build time only (needs CuteDSL, no GPU)."""

from __future__ import annotations

import importlib
import os
import re
import tempfile
import sys
from dataclasses import dataclass
from pathlib import Path

from .paths import KERNELS_PACKAGE

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

    pointee = {"__nv_bfloat16*": cutlass.BFloat16, "uint8_t*": cutlass.Uint8, "int32_t*": cutlass.Int32}
    scalar = {"int64_t": cutlass.Int64, "int32_t": cutlass.Int32}
    if ctype in pointee:
        # The address is never dereferenced: compilation only traces the kernel.
        return make_ptr(pointee[ctype], 1 << 20, cute.AddressSpace.gmem, assumed_align=align)
    return scalar[ctype](0)


def import_generated(generated_dir: Path, name: str):
    root = str(generated_dir)
    if root not in sys.path:
        sys.path.insert(0, root)
    return importlib.import_module(f"{KERNELS_PACKAGE}.{name}")


def compile_module(generated_dir: Path, name: str, arch: str) -> CompiledPTX:
    """Trace and compile one generated module with CuteDSL for `arch`; return its PTX."""
    import cutlass.cute as cute

    module = import_generated(generated_dir, name)
    args = [_fake_argument(ctype, module.POINTER_ALIGN.get(pname, 0)) for pname, ctype in module.PARAMS]
    with tempfile.TemporaryDirectory(prefix="kvgen-dump-") as dump_dir:
        options = f"--gpu-arch {arch} --keep-ptx --dump-dir {dump_dir}"
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
