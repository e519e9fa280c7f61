"""Which torch the compiled library belongs to: a wheel's version label and torch pin, and the import-time check.

A compiled torch extension only loads under the torch release it was built against (C++ ABI), and a CUDA build
also needs a CUDA torch of the same CUDA major version (libcudart soname). setup.py loads this file by path (the
build has no compiled library to import yet), writes ``_build_info.py`` next to the library and, for a wheel, labels
its version and pins torch with it. ``lora_ops/__init__.py`` calls ``check_installed_torch`` before loading the
library, so a mismatch is an ImportError that says what to install instead of an undefined-symbol error (or a
library that loads against an ABI it was not built for).

Standard library only.
"""

from __future__ import annotations

import importlib
from typing import Optional

BASE_VERSION = "0.1.0"
SOURCE_TORCH_REQUIREMENT = "torch>=2.11"  # sdist and editable installs: built on the user's own torch


def public_version(version: str) -> str:
    """``'2.13.0+cpu'`` -> ``'2.13.0'``: the release without torch's own local label."""
    return version.split("+", 1)[0]


def backend_tag(cuda_version: Optional[str]) -> str:
    """``'cpu'`` for a CPU build, ``'cu130'`` for CUDA 13.0 (PyTorch's naming of its wheel variants)."""
    if not cuda_version:
        return "cpu"
    major, minor = cuda_version.split(".")[:2]
    return f"cu{major}{minor}"


def wheel_version(torch_version: str, cuda_version: Optional[str]) -> str:
    """``'0.1.0+torch2.13.cpu'``: the release plus a local label naming torch's minor release and the backend."""
    major, minor = public_version(torch_version).split(".")[:2]
    return f"{BASE_VERSION}+torch{major}.{minor}.{backend_tag(cuda_version)}"


def torch_requirement(torch_version: str) -> str:
    """``'torch==2.13.0'``; without a local label it matches every variant of that release (PEP 440)."""
    return f"torch=={public_version(torch_version)}"


def building_wheel(hooks: set, argv: list) -> bool:
    """Whether setup.py runs for a wheel (True) or for an sdist or editable install (False), given the function
    names on its call stack and sys.argv. Read from the PEP 517 hook rather than argv alone: pip first asks for the
    metadata (setuptools' dist_info command, which editable installs use too) and then builds the wheel from it, so
    both calls must agree. ``setup.py bdist_wheel`` run directly has no hook on the stack."""
    if hooks & {"build_editable", "prepare_metadata_for_build_editable", "build_sdist"}:
        return False
    return bool(hooks & {"build_wheel", "prepare_metadata_for_build_wheel"}) or "bdist_wheel" in argv


def build_info_source(version: str, torch_version: str, cuda_version: Optional[str]) -> str:
    """Text of ``lora_ops/_build_info.py``, which setup.py writes at build time."""
    return (
        '"""Written by setup.py: what the compiled library was built against. Not in version control."""\n\n'
        f"VERSION = {version!r}\nTORCH_VERSION = {torch_version!r}\nCUDA_VERSION = {cuda_version!r}\n"
    )


def _describe(torch_version: str, cuda_version: Optional[str]) -> str:
    return f"torch {torch_version} ({'CUDA ' + cuda_version if cuda_version else 'CPU'})"


def mismatch_message(version: str, built_torch: str, built_cuda: Optional[str], torch_version: str,
                     cuda_version: Optional[str]) -> Optional[str]:
    """Why lora_ops ``version``, built against (built_torch, built_cuda), cannot load under the installed torch;
    None when it can. A CPU build loads under a CUDA torch of the same release; a CUDA build needs a CUDA torch of
    the same release and CUDA major version."""
    same_release = public_version(built_torch) == public_version(torch_version)
    cuda_ok = not built_cuda or (cuda_version is not None
                                 and cuda_version.split(".")[0] == built_cuda.split(".")[0])
    if same_release and cuda_ok:
        return None
    which = f" (its CUDA {built_cuda.split('.')[0]} build)" if built_cuda else ""
    return (
        f"lora_ops {version} was built against {_describe(built_torch, built_cuda)}, but "
        f"{_describe(torch_version, cuda_version)} is installed; its compiled library only works with the torch it "
        f"was built against. Either install that torch: pip install \"{torch_requirement(built_torch)}\"{which}, "
        f"or install lora_ops built for your torch: pip install --force-reinstall --no-deps "
        f"\"lora_ops=={wheel_version(torch_version, cuda_version)}\" (or build it from source: "
        f"pip install --no-build-isolation .)"
    )


def check_installed_torch() -> None:
    """Raises ImportError when the compiled library was built against another torch than the one installed.
    Builds that predate ``_build_info.py`` (or the CMake build) are not checked."""
    try:
        info = importlib.import_module("lora_ops._build_info")
    except ImportError:
        return
    import torch

    message = mismatch_message(info.VERSION, info.TORCH_VERSION, info.CUDA_VERSION, str(torch.__version__),
                               torch.version.cuda)
    if message:
        raise ImportError(message)
