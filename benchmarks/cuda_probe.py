"""Build and launch the CUDA C probes (page_run_probe.cu, raw_run_probe.cu): nvcc
on PATH, a GPU; each launch as kvgen launches its cubins, with PDL allowed."""

import subprocess
import tempfile
from pathlib import Path

import torch
from cuda.bindings import driver as cu


def load_kernels(source: Path, names) -> dict:
    """The kernels `names` of `source`, compiled for sm_90a and loaded into the primary context."""
    torch.zeros(1, device="cuda")  # the primary context, current: the module loads into it
    cubin = Path(tempfile.mkdtemp()) / source.with_suffix(".cubin").name
    subprocess.run(["nvcc", "-arch=sm_90a", "-cubin", "-O3", "-o", str(cubin), str(source)], check=True)
    err, module = cu.cuModuleLoadData(cubin.read_bytes())
    assert err == cu.CUresult.CUDA_SUCCESS, err
    kernels = {}
    for name in names:
        err, kernels[name] = cu.cuModuleGetFunction(module, name.encode())
        assert err == cu.CUresult.CUDA_SUCCESS, (name, err)
    return kernels


def launcher(kernel, grid: tuple[int, int], threads: int, smem: int, values: tuple, types: tuple):
    """A call that launches `kernel` on the current stream with PDL allowed."""
    def call():
        config = cu.CUlaunchConfig()
        config.gridDimX, config.gridDimY, config.gridDimZ = grid[0], grid[1], 1
        config.blockDimX, config.blockDimY, config.blockDimZ = threads, 1, 1
        config.sharedMemBytes = smem
        config.hStream = torch.cuda.current_stream().cuda_stream
        attr = cu.CUlaunchAttribute()
        attr.id = cu.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
        attr.value.programmaticStreamSerializationAllowed = 1
        config.attrs, config.numAttrs = [attr], 1
        err, = cu.cuLaunchKernelEx(config, kernel, (values, types), 0)
        assert err == cu.CUresult.CUDA_SUCCESS, err
    return call
