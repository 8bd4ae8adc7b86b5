"""The CUDA driver API entry points the runtime uses, called through ctypes.

Each entry point is resolved once, by name, from the driver library. kvgen
does not use cuda-python's driver wrappers at run time: on first use they
resolve every driver symbol they know through cuGetProcAddress, and each one
this driver lacks is a failed API call -- compute-sanitizer reported 34
"CUDA_ERROR_INVALID_VALUE on cuGetProcAddress_v2" errors in a process that
only gathered through a cubin. A serving stack run under the sanitizer must
see no driver-API error caused by kvgen. Direct ctypes calls also cost a few
microseconds less per launch than the wrappers.

Types follow cuda.h (x86-64 and aarch64 Linux, Windows x64): handles are
pointers, CUdevice is an int, CUresult an int.
"""

from __future__ import annotations

import ctypes
import sys
import threading

# CUresult values kvgen tells apart (cuda.h).
CUDA_SUCCESS = 0
# A load that failed because of the image itself, whenever the driver notices
# (with lazy loading that can be the first launch): the cubin is unusable here.
IMAGE_ERRORS = {
    200: "CUDA_ERROR_INVALID_IMAGE",
    209: "CUDA_ERROR_NO_BINARY_FOR_GPU",
    218: "CUDA_ERROR_INVALID_PTX",
    221: "CUDA_ERROR_JIT_COMPILER_NOT_FOUND",  # PTX, and no JIT compiler in this driver install
    222: "CUDA_ERROR_UNSUPPORTED_PTX_VERSION",  # PTX newer than the driver
    223: "CUDA_ERROR_JIT_COMPILATION_DISABLED",
    500: "CUDA_ERROR_NOT_FOUND",
}
CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8
CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION = 6


class CudaError(RuntimeError):
    """A driver call that did not return CUDA_SUCCESS."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


class LaunchAttribute(ctypes.Structure):
    """CUlaunchAttribute: an id, padding to 8 bytes, a 64-byte value union."""

    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4),
                ("value", ctypes.c_uint), ("value_pad", ctypes.c_char * 60)]


class LaunchConfig(ctypes.Structure):
    """CUlaunchConfig: grid, block, dynamic smem, stream, attributes."""

    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("smem_bytes", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(LaunchAttribute)),
                ("num_attrs", ctypes.c_uint)]


_P = ctypes.c_void_p
_PP = ctypes.POINTER(ctypes.c_void_p)
_UINT = ctypes.c_uint
# name in the library: (argument types); every entry point returns CUresult.
# Versioned names are the ones cuda.h maps the plain names to.
_SIGNATURES = {
    "cuInit": (_UINT,),
    "cuGetErrorName": (ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)),
    "cuDeviceGet": (ctypes.POINTER(ctypes.c_int), ctypes.c_int),
    "cuDevicePrimaryCtxRetain": (_PP, ctypes.c_int),
    "cuCtxGetCurrent": (_PP,),
    "cuCtxPushCurrent_v2": (_P,),
    "cuCtxPopCurrent_v2": (_PP,),
    "cuLibraryLoadData": (_PP, ctypes.c_char_p, _P, _P, _UINT, _P, _P, _UINT),
    "cuLibraryGetKernel": (_PP, _P, ctypes.c_char_p),
    "cuKernelSetAttribute": (ctypes.c_int, ctypes.c_int, _P, ctypes.c_int),
    "cuLaunchKernel": (_P, _UINT, _UINT, _UINT, _UINT, _UINT, _UINT, _UINT, _P, _P, _P),
    "cuLaunchKernelEx": (ctypes.POINTER(LaunchConfig), _P, _P, _P),
}


# Entry points called at every launch, also bound without argtypes (as
# `<name>_unconverted`): called only with ctypes objects made once (a byref, a
# c_void_p), they skip ctypes' per-call argument conversion (~0.3 us a call).
_PER_LAUNCH = ("cuCtxGetCurrent", "cuLaunchKernelEx")


class Driver:
    """The driver library's entry points kvgen calls, checked."""

    def __init__(self, library: ctypes.CDLL):
        for name, argtypes in _SIGNATURES.items():
            function = getattr(library, name)
            function.argtypes = argtypes
            function.restype = ctypes.c_int
            setattr(self, name.removesuffix("_v2"), function)
        for name in _PER_LAUNCH:
            function = library[name]  # a second handle: its own (absent) argtypes
            function.restype = ctypes.c_int
            setattr(self, f"{name}_unconverted", function)
        self._initialised = False
        self._thread = threading.local()  # per thread: current_context's out-parameter

    def error_name(self, code: int) -> str:
        name = ctypes.c_char_p()
        if self.cuGetErrorName(code, ctypes.byref(name)) == CUDA_SUCCESS and name.value:
            return name.value.decode()
        return f"CUresult {code}"

    def check(self, code: int, what: str) -> None:
        if code != CUDA_SUCCESS:
            raise CudaError(f"{what} failed: {self.error_name(code)}", code)

    def init(self) -> None:
        if not self._initialised:
            self.check(self.cuInit(0), "cuInit")
            self._initialised = True

    def load_library(self, image: bytes, what: str) -> int:
        """cuLibraryLoadData: a cubin image as a CUlibrary, usable in every context."""
        self.init()
        library = ctypes.c_void_p()
        self.check(self.cuLibraryLoadData(ctypes.byref(library), image, None, None, 0, None, None, 0),
                   f"cuLibraryLoadData({what})")
        return library.value

    def get_kernel(self, library: int, symbol: str) -> int:
        kernel = ctypes.c_void_p()
        self.check(self.cuLibraryGetKernel(ctypes.byref(kernel), library, symbol.encode()),
                   f"cuLibraryGetKernel({symbol})")
        return kernel.value

    def set_max_dynamic_smem(self, kernel: int, smem_bytes: int, ordinal: int) -> None:
        self.check(self.cuKernelSetAttribute(CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem_bytes, kernel,
                                             self.device(ordinal)), "cuKernelSetAttribute")

    def device(self, ordinal: int) -> int:
        self.init()
        device = ctypes.c_int()
        self.check(self.cuDeviceGet(ctypes.byref(device), ordinal), "cuDeviceGet")
        return device.value

    def primary_context(self, ordinal: int) -> int:
        context = ctypes.c_void_p()
        self.check(self.cuDevicePrimaryCtxRetain(ctypes.byref(context), self.device(ordinal)),
                   "cuDevicePrimaryCtxRetain")
        return context.value

    def current_context(self) -> int | None:
        # Every launch asks: the out-parameter is made once per thread, the check runs only on failure.
        try:
            context, ref = self._thread.context
        except AttributeError:
            context = ctypes.c_void_p()
            context, ref = self._thread.context = context, ctypes.byref(context)
        err = self.cuCtxGetCurrent_unconverted(ref)
        if err:
            self.check(err, "cuCtxGetCurrent")
        return context.value

    def push_context(self, context: int) -> None:
        self.check(self.cuCtxPushCurrent(context), "cuCtxPushCurrent")

    def pop_context(self) -> None:
        popped = ctypes.c_void_p()
        self.check(self.cuCtxPopCurrent(ctypes.byref(popped)), "cuCtxPopCurrent")


_LIBRARY_NAMES = {"linux": "libcuda.so.1", "win32": "nvcuda.dll"}

_driver: Driver | None | bool = None  # False: looked for, not found
_driver_lock = threading.Lock()


def driver() -> Driver | None:
    """The driver, opened on first use; None where this machine has none."""
    global _driver
    if _driver is None:
        with _driver_lock:
            if _driver is None:
                _driver = _open() or False
    return _driver or None


def _open() -> Driver | None:
    name = next((n for platform, n in _LIBRARY_NAMES.items() if sys.platform.startswith(platform)), None)
    if name is None:
        return None
    try:
        return Driver(ctypes.CDLL(name))
    except (OSError, AttributeError):  # no library, or one too old for cuLibrary* (CUDA < 12.0)
        return None
