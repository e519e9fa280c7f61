"""Builds lora_ops._C: CppExtension on CPU-only machines, CUDAExtension when CUDA is usable.

LORA_OPS_CUDA=1 forces the CUDA build, LORA_OPS_CUDA=0 disables it; by default CUDA is built when the installed
torch is a CUDA build (torch.version.cuda) and nvcc is found.
"""

import glob
import os
import shutil

from setuptools import setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension


def _want_cuda() -> bool:
    forced = os.environ.get("LORA_OPS_CUDA")
    if forced is not None:
        return forced.strip() not in ("", "0", "false", "False")
    nvcc = shutil.which("nvcc") or (CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")))
    return torch.version.cuda is not None and bool(nvcc)


def _extension():
    here = os.path.dirname(os.path.abspath(__file__))
    sources = sorted(
        os.path.relpath(p, here)
        for p in glob.glob(os.path.join(here, "csrc", "**", "*.cpp"), recursive=True)
    )
    debug = os.environ.get("LORA_OPS_DEBUG", "0") == "1"
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    cxx += ["-fopenmp", "-DLORA_OPS_PYTHON_MODULE"]  # cpp_extension defines Py_LIMITED_API itself
    kwargs = dict(
        name="lora_ops._C",
        sources=sources,
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"],
        py_limited_api=True,
    )
    if _want_cuda():
        kwargs["sources"] += sorted(
            os.path.relpath(p, here) for p in glob.glob(os.path.join(here, "csrc", "cuda", "*.cu"))
        )
        kwargs["extra_compile_args"]["nvcc"] = ["-O3", "-lineinfo", "-DLORA_OPS_CUDA"]
        kwargs["extra_compile_args"]["cxx"].append("-DLORA_OPS_CUDA")
        return CUDAExtension(**kwargs)
    return CppExtension(**kwargs)


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
