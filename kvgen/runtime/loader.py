"""Stage 5: manifest -> loaded cubins, launched through the CUDA driver API.

Needs only the CUDA driver (kvgen/driver.py, through ctypes) and the files
the build wrote: no CuteDSL, no compiler. A cubin is read, checked against its manifest sha256
and loaded lazily, once per process, under a lock; it is loaded as a CUDA
*library* (cuLibraryLoadData), which the driver makes available in every
context, so one handle serves every GPU of the process.
"""

from __future__ import annotations

import ctypes
import hashlib
import operator
import os
import struct
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from .driver import (CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION, IMAGE_ERRORS, CudaError, Driver,
                     LaunchAttribute, LaunchConfig, driver)
from ..config import ARCHS
from ..errors import UsageError
from ..formats import Format
from ..paths import generated_dir
from .dispatch import TunedTable, read_tuned_table
from .manifest import KernelEntry, Tree, read_tree


class KvgenLoadError(RuntimeError):
    """A cubin that must not or cannot be launched: missing, corrupt, no driver
    to load it, or rejected by the driver (when it is loaded or first launched)."""


def _driver() -> Driver:
    found = driver()
    if found is None:
        raise KvgenLoadError("the CUDA driver library (libcuda) could not be opened, or lacks cuLibraryLoadData")
    return found


# Each argument is copied by the driver from an 8-byte slot. Integers are
# packed little-endian as int64: an int32 parameter reads the low 4 bytes.
_SLOT = "q"


@dataclass
class LoadedKernel:
    entry: KernelEntry
    library: int  # CUlibrary
    kernel: int  # CUkernel: launchable in any context
    _prepared_devices: set

    def __post_init__(self):
        self._pack = struct.Struct("<" + _SLOT * len(self.entry.params)).pack_into
        # The row's parameter names in ABI order, interned: an op's names (literals, so
        # interned) then compare equal by identity, cheaply, at every launch.
        self.abi = tuple(sys.intern(name) for name, _ in self.entry.params)
        self._pdl_built = self.entry.pdl  # read per launch: a property of the entry, read once here
        self._thread = threading.local()  # per thread: its _LaunchBuffers
        self._arrangement = (None, None)  # in_abi_order's last names, and how they map to the ABI

    def in_abi_order(self, names: tuple[str, ...], values: tuple):
        """`values` (the parameters named `names`, in that order) in ABI order:
        as they are where the op names them in that order (as the ops do),
        else picked. `names` is an op's constant: the mapping from it is worked
        out at its first launch here and kept (by identity: no per-call hashing)."""
        seen, pick = self._arrangement
        if names is not seen:
            pick = _picker(names, self.abi)
            self._arrangement = (names, pick)  # one assignment: a thread reads both or neither
        return values if pick is None else pick(values)

    def launch(self, grid: tuple[int, int, int], args, stream: int, device: int, pdl: bool = False,
               cuda: Driver | None = None) -> None:
        """Launch on `stream` (a CUstream handle as int). `args` in ABI order.
        `pdl`: allow programmatic dependent launch -- this grid may be scheduled
        before the previous kernel in the stream finishes (the kernel waits on
        griddepcontrol before touching global memory); only for entries built
        so. `cuda`: the driver, where the caller has it."""
        if pdl and not self._pdl_built:
            raise ValueError(f"{self.entry.name}: this cubin does not wait on griddepcontrol; "
                             "launching it with programmatic dependent launch would race")
        if cuda is None:
            cuda = _driver()
        if device not in self._prepared_devices:
            self._prepare(cuda, device)
        try:
            buffers = self._thread.buffers
        except AttributeError:
            buffers = self._thread.buffers = _LaunchBuffers(self)
        self._pack(buffers.values, 0, *args)
        if pdl:
            buffers.grid[:] = grid
            buffers.config.stream = stream
            err = cuda.cuLaunchKernelEx_unconverted(*buffers.launch_ex_args)
        else:
            block = self.entry.block
            err = cuda.cuLaunchKernel(self.kernel, grid[0], grid[1], grid[2], block[0], block[1], block[2],
                                      self.entry.smem_bytes, stream, buffers.pointers_address, None)
        if err:
            what = f"cuLaunchKernel{'Ex' if pdl else ''}({self.entry.name})"
            if err in IMAGE_ERRORS:  # lazy loading: the driver looked at the image only now
                raise KvgenLoadError(f"{what}: the driver rejected the cubin: {IMAGE_ERRORS[err]}")
            cuda.check(err, what)

    def _prepare(self, cuda: Driver, device: int) -> None:
        # CuteDSL kernels take their shared memory dynamically; past 48 KiB a
        # kernel must be allowed more, per device.
        if self.entry.smem_bytes > 48 * 1024:
            cuda.set_max_dynamic_smem(self.kernel, self.entry.smem_bytes, device)
        self._prepared_devices.add(device)


def _picker(names: tuple[str, ...], abi: tuple[str, ...]):
    """None where `names` is `abi`'s order, else a function picking the ABI's
    values out of values named `names` (KeyError naming a parameter they lack)."""
    if names == abi:
        return None
    index = {name: i for i, name in enumerate(names)}
    missing = [name for name in abi if name not in index]
    if missing:
        raise KeyError(missing[0])
    pick = operator.itemgetter(*(index[name] for name in abi))
    return pick if len(abi) > 1 else (lambda values: (pick(values),))


class _LaunchBuffers:
    """One thread's memory for launching one kernel: 8-byte value slots, the
    void* array pointing at them, and a CUlaunchConfig asking for programmatic
    stream serialization; and cuLaunchKernelEx's arguments as ctypes objects,
    made once (a launch sets only the config's grid and stream). The driver
    copies all of them at launch, so they are reused."""

    def __init__(self, kernel: LoadedKernel):
        entry = kernel.entry
        n = len(entry.params)
        self.values = (ctypes.c_uint64 * n)()
        base = ctypes.addressof(self.values)
        self.pointers = (ctypes.c_void_p * n)(*[base + 8 * i for i in range(n)])
        self.pointers_address = ctypes.addressof(self.pointers)
        self.attribute = LaunchAttribute(id=CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION, value=1)
        self.config = LaunchConfig(block=(ctypes.c_uint * 3)(*entry.block), smem_bytes=entry.smem_bytes,
                                   attrs=ctypes.pointer(self.attribute), num_attrs=1)
        self.grid = self.config.grid  # a view of the config's grid field
        self.launch_ex_args = (ctypes.byref(self.config), ctypes.c_void_p(kernel.kernel),
                               ctypes.c_void_p(self.pointers_address), None)


KERNEL_DIRS_ENV = "KVGEN_KERNEL_DIRS"  # user trees, os.pathsep-separated, beside the shipped one


class TreeConflict(UsageError):
    """Two kernel trees that cannot be served side by side."""


class Registry:
    """The kernel trees of this process -- the shipped one, then the user's
    (KVGEN_KERNEL_DIRS, add_kernel_dir) -- their formats, their rows, their
    tuned rules; cubins loaded on first use. Dispatch decisions (and the
    launch plans made from them) are cached here, so a new registry starts with none."""

    def __init__(self, root: Path | None = None, user_roots: list[Path] | None = None):
        self.root = root or generated_dir()
        self.trees: list[Tree] = []
        self.formats: dict[str, Format] = {}  # by name
        self.by_record: dict[int, Format] = {}  # by record bytes: how calls tell formats apart
        self._entries: dict[str, KernelEntry] = {}
        self._tuned: list[TunedTable] = []
        self._loaded: dict[str, LoadedKernel] = {}
        self._failed: dict[str, KvgenLoadError] = {}
        self._lock = threading.RLock()
        self._pending = [self.root, *(user_roots if user_roots is not None else kernel_dirs_from_env())]
        self.decisions: dict[tuple, object] = {}  # dispatch's cache: call key -> decision
        self.plans: dict[tuple, object] = {}  # kvgen.runtime.plans: call signature -> launch plan
        self.warned: set[str] = set()  # rows whose fallback was warned about

    def _ensure(self) -> None:
        """Load the pending trees, under the lock: a concurrent first call waits
        for them, and a tree that fails to load stays pending (its error again
        on the next call, never a silently missing tree)."""
        if self._pending:
            with self._lock:
                while self._pending:
                    self._add(self._pending[0])
                    self._pending.pop(0)

    def add(self, root: Path) -> Tree:
        """Add a tree (a folder with a manifest); its formats and rows join at once."""
        self._ensure()
        with self._lock:
            tree = self._add(Path(root))
            self.decisions.clear()
            self.plans.clear()
        return tree

    def _add(self, root: Path) -> Tree:
        """Read, check, then register a tree: nothing changes unless all of it is good."""
        root = Path(root)
        if any(t.root.resolve() == root.resolve() for t in self.trees):
            return next(t for t in self.trees if t.root.resolve() == root.resolve())
        tree = read_tree(root)
        tuned = read_tuned_table(root)
        formats_here: dict[int, Format] = {}
        for fmt in tree.formats.values():
            for known in (self.formats.get(fmt.name), self.by_record.get(fmt.record_bytes),
                          formats_here.get(fmt.record_bytes)):
                if known is not None and known != fmt:
                    where = root if known is formats_here.get(fmt.record_bytes) else self._tree_of_format(known)
                    raise TreeConflict(
                        f"kernel trees {where} and {root} define different formats "
                        f"{known.name} and {fmt.name} ({known.record_bytes} and {fmt.record_bytes}-byte records): "
                        "calls could not tell them apart")
            formats_here[fmt.record_bytes] = fmt
        for entry in tree.entries:
            known = self._entries.get(entry.name)
            if known is not None and known.cubin_sha256 != entry.cubin_sha256:
                raise TreeConflict(f"kernel trees {known.root} and {root} both hold {entry.name}, with different "
                                   "cubins")
        self.trees.append(tree)
        for fmt in tree.formats.values():
            self.formats[fmt.name] = self.by_record[fmt.record_bytes] = fmt
        for entry in tree.entries:
            self._entries.setdefault(entry.name, entry)
        self._tuned.append(tuned)
        return tree

    def _tree_of_format(self, fmt: Format) -> Path:
        return next(t.root for t in self.trees if fmt in t.formats.values())

    @property
    def entries(self) -> list[KernelEntry]:
        self._ensure()
        return list(self._entries.values())

    def format_for_record(self, record_bytes: int) -> Format | None:
        if self._pending:  # asked at every call: the trees are loaded once
            self._ensure()
        return self.by_record.get(record_bytes)

    def tuned_rules(self, device_name: str | None) -> tuple[dict, ...]:
        """The tuned rules of every tree, for calls on the device named (each tree's
        rules steer only the device they were tuned on), the shipped tree's first."""
        self._ensure()
        return tuple(rule for table in self._tuned for rule in table.rules_for(device_name))

    def get(self, entry: KernelEntry) -> LoadedKernel:
        """The loaded kernel; a row that failed to load fails again at once (it is
        not re-read, re-hashed and offered to the driver on every call)."""
        loaded = self._loaded.get(entry.name)
        if loaded is None:
            with self._lock:
                loaded = self._loaded.get(entry.name)
                if loaded is None:
                    if entry.name in self._failed:
                        raise self._failed[entry.name]
                    try:
                        loaded = self._loaded[entry.name] = self._load(entry)
                    except KvgenLoadError as err:
                        self._failed[entry.name] = err
                        raise
        return loaded

    def _load(self, entry: KernelEntry) -> LoadedKernel:
        path = entry.cubin_path
        try:
            image = path.read_bytes()
        except OSError as err:
            raise KvgenLoadError(f"{entry.name}: cannot read {path}: {err}") from err
        digest = hashlib.sha256(image).hexdigest()
        if digest != entry.cubin_sha256:
            raise KvgenLoadError(f"{entry.name}: {path} has sha256 {digest}, the manifest says "
                                 f"{entry.cubin_sha256}; refusing to launch it (rebuild with `make build`)")
        cuda = _driver()
        if ARCHS[entry.arch].ptx:
            image += b"\0"  # the driver reads PTX as a NUL-terminated string
        try:
            library = cuda.load_library(image, entry.name)
            kernel = cuda.get_kernel(library, entry.symbol)
        except CudaError as err:
            raise KvgenLoadError(f"{entry.name}: the driver rejected {path}: {err}") from err
        return LoadedKernel(entry=entry, library=library, kernel=kernel, _prepared_devices=set())


def kernel_dirs_from_env() -> list[Path]:
    value = os.environ.get(KERNEL_DIRS_ENV, "")
    return [Path(p) for p in value.split(os.pathsep) if p]


_registry: Registry | None = None
_registry_lock = threading.Lock()


def registry() -> Registry:
    global _registry
    if _registry is None:
        with _registry_lock:
            if _registry is None:
                _registry = Registry()
    return _registry


def reset_registry(root: Path | None = None) -> Registry:
    """A fresh registry: the shipped tree at `root` (default: generated_dir()),
    the user trees of KVGEN_KERNEL_DIRS as it is now; no decision cached."""
    global _registry
    with _registry_lock:
        _registry = Registry(root)
    return _registry


def add_kernel_dir(path) -> None:
    """Serve the kernel tree at `path` (built with `python -m kvgen build --spec
    FILE --out DIR`) beside the shipped one: its formats become known to every
    op, its rows join dispatch, its cubins are sha256-checked like the shipped
    ones. A tree whose formats or kernels clash with a loaded tree's is an error
    naming both."""
    registry().add(Path(path))
