"""Builds lora_ops._C: CppExtension on CPU-only machines, CUDAExtension when CUDA is usable.

LORA_OPS_CUDA=1 forces the CUDA build, LORA_OPS_CUDA=0 disables it; by default CUDA is built when the installed
torch is a CUDA build (torch.version.cuda) and nvcc is found.

Every build writes lora_ops/_build_info.py (the torch and CUDA versions the library is built against, checked at
import). A wheel also gets a local version label and an exact torch pin (0.1.0+torch2.13.cpu, torch==2.13.0);
an sdist or editable install keeps the plain version and torch>=2.11.
"""

import glob
import importlib.util
import os
import shutil
import sys
import tempfile

from setuptools import setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    forced = os.environ.get("LORA_OPS_CUDA")
    if forced is not None:
        return forced.strip() not in ("", "0", "false", "False")
    nvcc = shutil.which("nvcc") or (CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")))
    return torch.version.cuda is not None and bool(nvcc)


def _variant_module():
    """lora_ops/_variant.py, loaded by path: importing the package would load the library being built."""
    spec = importlib.util.spec_from_file_location("_lora_ops_variant", os.path.join(HERE, "lora_ops", "_variant.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _stack_functions() -> set:
    names, frame = set(), sys._getframe()
    while frame is not None:
        names.add(frame.f_code.co_name)
        frame = frame.f_back
    return names


def _write_if_changed(path: str, text: str) -> None:
    """Atomic (temp file + rename), and untouched when unchanged, so concurrent builds never see a partial file."""
    if os.path.exists(path):
        with open(path) as f:
            if f.read() == text:
                return
    fd, tmp = tempfile.mkstemp(prefix=".build_info.", suffix=".tmp", dir=os.path.dirname(path))
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; the wheel would install it so
    os.replace(tmp, path)


def _metadata(cuda: bool) -> dict:
    variant = _variant_module()
    torch_version, cuda_version = str(torch.__version__), (torch.version.cuda if cuda else None)
    if variant.building_wheel(_stack_functions(), sys.argv):
        version = variant.wheel_version(torch_version, cuda_version)
        requires = [variant.torch_requirement(torch_version), "numpy"]
    else:
        version, requires = variant.BASE_VERSION, [variant.SOURCE_TORCH_REQUIREMENT, "numpy"]
    _write_if_changed(os.path.join(HERE, "lora_ops", "_build_info.py"),
                      variant.build_info_source(version, torch_version, cuda_version))
    return {"version": version, "install_requires": requires}


def _extension(cuda: bool):
    sources = sorted(
        os.path.relpath(p, HERE)
        for p in glob.glob(os.path.join(HERE, "csrc", "**", "*.cpp"), recursive=True)
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
    if cuda:
        kwargs["sources"] += sorted(
            os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cu"))
        )
        kwargs["extra_compile_args"]["nvcc"] = ["-O3", "-lineinfo", "-DLORA_OPS_CUDA"]
        kwargs["extra_compile_args"]["cxx"].append("-DLORA_OPS_CUDA")
        return CUDAExtension(**kwargs)
    return CppExtension(**kwargs)


_CUDA = _want_cuda()
setup(
    **_metadata(_CUDA),
    ext_modules=[_extension(_CUDA)],
    cmdclass={"build_ext": BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
