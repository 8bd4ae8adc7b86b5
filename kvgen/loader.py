"""Stage 5: manifest -> loaded cubins, launched through the CUDA driver API.

Needs only cuda-python (cuda.bindings) and the files the build wrote: no
CuteDSL, no compiler. A cubin is read, checked against its manifest sha256
and loaded lazily, once per process, under a lock; it is loaded as a CUDA
*library* (cuLibraryLoadData), which the driver makes available in every
context, so one handle serves every GPU of the process.
"""

from __future__ import annotations

import ctypes
import hashlib
import struct
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from .manifest import KernelEntry, load_entries
from .paths import MANIFEST_NAME, generated_dir


class KvgenLoadError(RuntimeError):
    """A cubin that must not be launched: missing, corrupt, or rejected by the driver."""


class CudaError(RuntimeError):
    pass


def _driver():
    from cuda.bindings import driver

    return driver


def _check(result, what: str):
    driver = _driver()
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != driver.CUresult.CUDA_SUCCESS:
        _, name = driver.cuGetErrorName(err)
        raise CudaError(f"{what} failed: {name.decode() if name else err}")
    return values[0] if len(values) == 1 else values


# Each argument is copied by the driver from an 8-byte slot. Integers are
# packed little-endian as int64: an int32 parameter reads the low 4 bytes.
_SLOT = "q"


def _libcuda():
    """The driver library through ctypes, for the per-call launch: cuda-python's
    wrapper costs ~4 us more per call on a slow host. None where not on Linux."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    fn = lib.cuLaunchKernel
    fn.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 7 + [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    fn.restype = ctypes.c_int
    return fn


_launch_fn = None
_launch_fn_lock = threading.Lock()


@dataclass
class LoadedKernel:
    entry: KernelEntry
    library: object
    kernel: object  # CUkernel: launchable in any context
    _prepared_devices: set

    def __post_init__(self):
        self._handle = int(self.kernel)
        self._format = "<" + _SLOT * len(self.entry.params)

    def launch(self, grid: tuple[int, int, int], args: list[int], stream: int, device: int) -> None:
        """Launch on `stream` (a CUstream handle as int). `args` in ABI order."""
        global _launch_fn
        if device not in self._prepared_devices:
            self._prepare(device)
        values, pointers = _param_buffers(self)
        struct.pack_into(self._format, values, 0, *args)
        block = self.entry.block
        if _launch_fn is None:
            with _launch_fn_lock:
                _launch_fn = _launch_fn or _libcuda() or False
        if _launch_fn:
            err = _launch_fn(self._handle, grid[0], grid[1], grid[2], block[0], block[1], block[2],
                             self.entry.smem_bytes, stream, ctypes.addressof(pointers), None)
            if err:
                _check((_driver().CUresult(err),), f"cuLaunchKernel({self.entry.name})")
        else:
            driver = _driver()
            _check(driver.cuLaunchKernel(self.kernel, grid[0], grid[1], grid[2], block[0], block[1], block[2],
                                         self.entry.smem_bytes, stream, ctypes.addressof(pointers), 0),
                   f"cuLaunchKernel({self.entry.name})")

    def _prepare(self, device: int) -> None:
        driver = _driver()
        # CuteDSL kernels take their shared memory dynamically; past 48 KiB a
        # kernel must be allowed more, per device.
        if self.entry.smem_bytes > 48 * 1024:
            _check(driver.cuKernelSetAttribute(
                driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                self.entry.smem_bytes, self.kernel, device), "cuKernelSetAttribute")
        self._prepared_devices.add(device)


_thread_state = threading.local()


def _param_buffers(kernel: LoadedKernel):
    """Per thread and kernel: 8-byte value slots and the void* array pointing at them.
    cuLaunchKernel copies the values at launch, so the buffers are reused."""
    cache = getattr(_thread_state, "buffers", None)
    if cache is None:
        cache = _thread_state.buffers = {}
    buffers = cache.get(kernel.entry.name)
    if buffers is None:
        n = len(kernel.entry.params)
        values = (ctypes.c_uint64 * n)()
        base = ctypes.addressof(values)
        pointers = (ctypes.c_void_p * n)(*[base + 8 * i for i in range(n)])
        buffers = cache[kernel.entry.name] = (values, pointers)
    return buffers


class Registry:
    """The manifest's kernels, loaded on first use."""

    def __init__(self, root: Path | None = None):
        self.root = root or generated_dir()
        self._entries: list[KernelEntry] | None = None
        self._loaded: dict[str, LoadedKernel] = {}
        self._lock = threading.Lock()

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
        driver = _driver()
        _check(driver.cuInit(0), "cuInit")
        library = _check(driver.cuLibraryLoadData(image, None, None, 0, None, None, 0),
                         f"cuLibraryLoadData({entry.name})")
        kernel = _check(driver.cuLibraryGetKernel(library, entry.symbol.encode()),
                        f"cuLibraryGetKernel({entry.symbol})")
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
