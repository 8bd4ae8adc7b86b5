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
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

from .driver import (CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION, IMAGE_ERRORS, CudaError, Driver,
                     LaunchAttribute, LaunchConfig, driver)
from .dispatch import TunedTable, read_tuned_table
from .manifest import KernelEntry, load_entries
from .paths import MANIFEST_NAME, generated_dir


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
        self._format = "<" + _SLOT * len(self.entry.params)

    def launch(self, grid: tuple[int, int, int], args: list[int], stream: int, device: int,
               pdl: bool = False) -> None:
        """Launch on `stream` (a CUstream handle as int). `args` in ABI order.
        `pdl`: allow programmatic dependent launch -- this grid may be scheduled
        before the previous kernel in the stream finishes (the kernel waits on
        griddepcontrol before touching global memory); only for entries built so."""
        if pdl and not self.entry.pdl:
            raise ValueError(f"{self.entry.name}: this cubin does not wait on griddepcontrol; "
                             "launching it with programmatic dependent launch would race")
        cuda = _driver()
        if device not in self._prepared_devices:
            self._prepare(cuda, device)
        values, pointers, config = _launch_buffers(self)
        struct.pack_into(self._format, values, 0, *args)
        if pdl:
            config.grid[0], config.grid[1], config.grid[2] = grid
            config.stream = stream
            err = cuda.cuLaunchKernelEx(ctypes.byref(config), self.kernel, ctypes.addressof(pointers), None)
        else:
            block = self.entry.block
            err = cuda.cuLaunchKernel(self.kernel, grid[0], grid[1], grid[2], block[0], block[1], block[2],
                                      self.entry.smem_bytes, stream, ctypes.addressof(pointers), None)
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


_thread_state = threading.local()


def _launch_buffers(kernel: LoadedKernel):
    """Per thread and kernel: 8-byte value slots, the void* array pointing at
    them, and a CUlaunchConfig asking for programmatic stream serialization.
    The driver copies all of them at launch, so they are reused."""
    cache = getattr(_thread_state, "buffers", None)
    if cache is None:
        cache = _thread_state.buffers = {}
    buffers = cache.get(kernel.entry.name)
    if buffers is None:
        n = len(kernel.entry.params)
        values = (ctypes.c_uint64 * n)()
        base = ctypes.addressof(values)
        pointers = (ctypes.c_void_p * n)(*[base + 8 * i for i in range(n)])
        attribute = LaunchAttribute(id=CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION, value=1)
        config = LaunchConfig(block=(ctypes.c_uint * 3)(*kernel.entry.block), smem_bytes=kernel.entry.smem_bytes,
                               attrs=ctypes.pointer(attribute), num_attrs=1)
        config._attribute = attribute  # keep it alive with the config
        buffers = cache[kernel.entry.name] = (values, pointers, config)
    return buffers


class Registry:
    """The manifest's kernels, loaded on first use."""

    def __init__(self, root: Path | None = None):
        self.root = root or generated_dir()
        self._entries: list[KernelEntry] | None = None
        self._tuned: TunedTable | None = None
        self._loaded: dict[str, LoadedKernel] = {}
        self._lock = threading.Lock()

    @property
    def tuned(self) -> TunedTable:
        """This tree's tuned dispatch rules (its own dispatch.json, never another tree's)."""
        if self._tuned is None:
            with self._lock:
                if self._tuned is None:
                    self._tuned = read_tuned_table(self.root)
        return self._tuned

    @property
    def entries(self) -> list[KernelEntry]:
        if self._entries is None:
            with self._lock:
                if self._entries is None:
                    self._entries = load_entries(self.root / MANIFEST_NAME)
        return self._entries

    def get(self, entry: KernelEntry) -> LoadedKernel:
        loaded = self._loaded.get(entry.name)
        if loaded is None:
            with self._lock:
                loaded = self._loaded.get(entry.name)
                if loaded is None:
                    loaded = self._loaded[entry.name] = self._load(entry)
        return loaded

    def _load(self, entry: KernelEntry) -> LoadedKernel:
        path = self.root / entry.cubin
        try:
            image = path.read_bytes()
        except OSError as err:
            raise KvgenLoadError(f"{entry.name}: cannot read cubin {path}: {err}") from err
        digest = hashlib.sha256(image).hexdigest()
        if digest != entry.cubin_sha256:
            raise KvgenLoadError(f"{entry.name}: cubin {path} has sha256 {digest}, the manifest says "
                                 f"{entry.cubin_sha256}; refusing to launch it (rebuild with `make build`)")
        cuda = _driver()
        try:
            library = cuda.load_library(image, entry.name)
            kernel = cuda.get_kernel(library, entry.symbol)
        except CudaError as err:
            raise KvgenLoadError(f"{entry.name}: the driver rejected cubin {path}: {err}") from err
        return LoadedKernel(entry=entry, library=library, kernel=kernel, _prepared_devices=set())


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
    """Point the process at another generated tree (tests)."""
    global _registry
    from .ops import clear_dispatch_cache

    with _registry_lock:
        _registry = Registry(root)
    clear_dispatch_cache()
    return _registry
