"""lora_ops: fast multi-LoRA ops for PyTorch.

Importing the package loads the compiled library, which registers the ops under ``torch.ops.lora_ops``.
"""

import torch  # noqa: F401  (loads libtorch, which the compiled library links against)

from lora_ops._variant import BASE_VERSION, check_installed_torch

check_installed_torch()  # under another torch, _C fails with an undefined symbol or loads against an untested ABI

from lora_ops import _C  # noqa: E402,F401  (registers torch.ops.lora_ops.*)
from lora_ops.ops import arrow_prototypes, arrow_route, grouped_lora, merge_lowrank, randomized_svd  # noqa: E402

__all__ = ["grouped_lora", "merge_lowrank", "randomized_svd", "arrow_prototypes", "arrow_route", "cuda_built",
           "__version__"]
try:
    from lora_ops._build_info import VERSION as __version__  # a wheel's version carries its torch/backend label
except ImportError:
    __version__ = BASE_VERSION


def cuda_built() -> bool:
    """True when the compiled library has CUDA kernels (it was built against a CUDA torch with nvcc)."""
    return torch_has_cuda_kernel("grouped_lora")


def torch_has_cuda_kernel(op: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"lora_ops::{op}", "CUDA")
