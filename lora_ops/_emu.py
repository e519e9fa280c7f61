"""Test-only: the CUDA backend's own source run on the CPU (tests/cuda_emu/harness, docs/architecture.md).

`load()` builds (once; torch's extension cache keeps the build) an extension from csrc/cuda/*.cu and the kernel
headers with the fiber harness, and registers `torch.ops.lora_ops_emu.<op>` for CPU tensors with the real ops'
schemas. Needs a source checkout and the CUDA toolkit's headers (for __half / __nv_bfloat16); no GPU.
With sanitize=True (or LORA_OPS_EMU_SANITIZE=1) it is built with -fsanitize=address,undefined: the process must
then have libasan and libstdc++ preloaded (LD_PRELOAD="$(gcc -print-file-name=libasan.so)
$(gcc -print-file-name=libstdc++.so)"), as .ci/run's cuda_emu stage does.
"""

from __future__ import annotations

import ctypes
import os
import shutil

import torch

import lora_ops  # noqa: F401  (the real ops, whose schemas are copied)

OPS = ("grouped_lora", "grouped_lora_backward", "arrow_route", "merge_lowrank", "randomized_svd", "_jacobi_svd")
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_HARNESS = os.path.join(_ROOT, "tests", "cuda_emu", "harness")
_state: dict = {}


def cuda_include_dir() -> str | None:
    """The CUDA toolkit's include folder (cuda_fp16.h), or None."""
    candidates = [os.environ.get("CUDA_HOME", "")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        with open(nvcc, "rb") as f:  # a wrapper script naming the real nvcc
            for word in f.read(4096).decode(errors="ignore").split():
                if word.endswith("/bin/nvcc"):
                    candidates.append(os.path.dirname(os.path.dirname(word)))
    candidates += ["/usr/local/cuda", "/opt/cuda"]
    for c in candidates:
        if c and os.path.exists(os.path.join(c, "include", "cuda_fp16.h")):
            return os.path.join(c, "include")
    return None


def sanitized() -> bool:
    return os.environ.get("LORA_OPS_EMU_SANITIZE", "0") == "1"


def load(sanitize: bool | None = None, verbose: bool = False):
    """Builds or loads the harness extension and defines torch.ops.lora_ops_emu.*; returns the ctypes library."""
    sanitize = sanitized() if sanitize is None else sanitize
    if "lib" in _state:
        return _state["lib"]
    include = cuda_include_dir()
    if include is None:
        raise RuntimeError("the CUDA harness needs the CUDA toolkit's headers (cuda_fp16.h): set CUDA_HOME")
    if not os.path.exists(os.path.join(_HARNESS, "emu.cpp")):
        raise RuntimeError("the CUDA harness needs a source checkout of lora_ops (tests/cuda_emu/harness)")
    from torch.utils import cpp_extension

    flags = ["-O1", "-g", "-DLORA_OPS_EMU", "-Wno-unknown-pragmas", "-fno-omit-frame-pointer"]
    ldflags = []
    if sanitize:
        flags += ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"]
        ldflags += ["-fsanitize=address,undefined"]
    common = os.path.join(_ROOT, "csrc", "common")
    sources = [os.path.join(_HARNESS, f) for f in ("emu.cpp", "emu_ops.cpp", "selftest.cpp")]
    sources += [os.path.join(common, f) for f in ("lowrank.cpp", "grouped_lora_args.cpp", "arrow_args.cpp")]
    lib = torch.library.Library("lora_ops_emu", "DEF")
    for op in OPS:
        schema = str(getattr(torch.ops.lora_ops, op).default._schema)
        lib.define(schema.split("::", 1)[1])
    lib.define("_selftest(Tensor(a!) out, int case) -> ()")  # tests/cuda_emu/harness/selftest.cpp
    preload = os.environ.pop("LD_PRELOAD", None)  # the compiler and ninja run without the ASan runtime
    try:
        path = cpp_extension.load(  # loads the library (its registrations run) and returns its path
            name="lora_ops_emu_asan" if sanitize else "lora_ops_emu", sources=sources, extra_cflags=flags,
            extra_ldflags=ldflags, extra_include_paths=[include, _HARNESS], is_python_module=False, verbose=verbose)
    finally:
        if preload is not None:
            os.environ["LD_PRELOAD"] = preload
    c = ctypes.CDLL(path)
    c.lora_ops_emu_configure.argtypes = [ctypes.c_int64, ctypes.c_int]
    c.lora_ops_emu_take_launches.argtypes = [ctypes.c_char_p, ctypes.c_int64]
    c.lora_ops_emu_take_launches.restype = ctypes.c_int64
    _state.update(lib=c, library=lib)
    return c


def configure(sm_count: int = 132, reverse: bool = False) -> None:
    """SM count the launchers see (it picks the d_in split), and whether blocks and threads run in reverse order."""
    load().lora_ops_emu_configure(sm_count, int(reverse))


def take_launches() -> list[str]:
    """The launches since the last call: 'kernel<args> grid=(x, y, z) block=(x, y, z) smem=bytes'."""
    buf = ctypes.create_string_buffer(1 << 22)
    load().lora_ops_emu_take_launches(buf, len(buf))
    return [line for line in buf.value.decode().splitlines() if line]
