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


class _LaunchAttribute(ctypes.Structure):
    """CUlaunchAttribute (cuda.h): an id, padding to 8 bytes, a 64-byte value union."""

    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4),
                ("value", ctypes.c_uint), ("value_pad", ctypes.c_char * 60)]


class _LaunchConfig(ctypes.Structure):
    """CUlaunchConfig (cuda.h): grid, block, dynamic smem, stream, attributes."""

    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("smem_bytes", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(_LaunchAttribute)),
                ("num_attrs", ctypes.c_uint)]


# Value of CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION (cuda.h).
_PROGRAMMATIC_STREAM_SERIALIZATION = 6


@dataclass(frozen=True)
class _DriverLaunch:
    launch: object  # cuLaunchKernel
    launch_ex: object  # cuLaunchKernelEx


def _libcuda():
    """The driver library through ctypes, for the per-call launch: cuda-python's
    wrapper costs ~4 us more per call on a slow host. None where not on Linux."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    launch = lib.cuLaunchKernel
    launch.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 7 + [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    launch.restype = ctypes.c_int
    launch_ex = lib.cuLaunchKernelEx
    launch_ex.argtypes = [ctypes.POINTER(_LaunchConfig), ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    launch_ex.restype = ctypes.c_int
    return _DriverLaunch(launch, launch_ex)


# The ctypes entry points, resolved on first launch; False where there are
# none (cuda-python's wrappers are used instead).
_driver_launch: _DriverLaunch | None | bool = None
_driver_launch_lock = threading.Lock()


def _ctypes_launcher():
    global _driver_launch
    if _driver_launch is None:
        with _driver_launch_lock:
            if _driver_launch is None:
                _driver_launch = _libcuda() or False
    return _driver_launch


@dataclass
class LoadedKernel:
    entry: KernelEntry
    library: object
    kernel: object  # CUkernel: launchable in any context
    _prepared_devices: set

    def __post_init__(self):
        self._handle = int(self.kernel)
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
        if device not in self._prepared_devices:
            self._prepare(device)
        values, pointers, config = _launch_buffers(self)
        struct.pack_into(self._format, values, 0, *args)
        block = self.entry.block
        driver_launch = _ctypes_launcher()
        if driver_launch and pdl:
            config.grid[0], config.grid[1], config.grid[2] = grid
            config.stream = stream
            err = driver_launch.launch_ex(ctypes.byref(config), self._handle, ctypes.addressof(pointers), None)
        elif driver_launch:
            err = driver_launch.launch(self._handle, grid[0], grid[1], grid[2], block[0], block[1], block[2],
                                       self.entry.smem_bytes, stream, ctypes.addressof(pointers), None)
        else:
            return self._launch_cuda_python(grid, pointers, stream, pdl)
        if err:
            _check((_driver().CUresult(err),), f"cuLaunchKernel{'Ex' if pdl else ''}({self.entry.name})")

    def _launch_cuda_python(self, grid, pointers, stream: int, pdl: bool) -> None:
        """The same launch through cuda-python's wrappers (no libcuda via ctypes)."""
        driver = _driver()
        block = self.entry.block
        if not pdl:
            _check(driver.cuLaunchKernel(self.kernel, *grid, *block, self.entry.smem_bytes, stream,
                                         ctypes.addressof(pointers), 0), f"cuLaunchKernel({self.entry.name})")
            return
        attribute = driver.CUlaunchAttribute()
        attribute.id = driver.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
        attribute.value.programmaticStreamSerializationAllowed = 1
        config = driver.CUlaunchConfig()
        config.gridDimX, config.gridDimY, config.gridDimZ = grid
        config.blockDimX, config.blockDimY, config.blockDimZ = block
        config.sharedMemBytes = self.entry.smem_bytes
        config.hStream = driver.CUstream(stream)
        config.attrs = [attribute]
        config.numAttrs = 1
        _check(driver.cuLaunchKernelEx(config, self.kernel, ctypes.addressof(pointers), 0),
               f"cuLaunchKernelEx({self.entry.name})")

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
        attribute = _LaunchAttribute(id=_PROGRAMMATIC_STREAM_SERIALIZATION, value=1)
        config = _LaunchConfig(block=(ctypes.c_uint * 3)(*kernel.entry.block), smem_bytes=kernel.entry.smem_bytes,
                               attrs=ctypes.pointer(attribute), num_attrs=1)
        config._attribute = attribute  # keep it alive with the config
        buffers = cache[kernel.entry.name] = (values, pointers, config)
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
