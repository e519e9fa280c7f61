"""lora_ops: fast multi-LoRA ops for PyTorch.

Importing the package loads the compiled library, which registers the ops under ``torch.ops.lora_ops``.
"""

import torch  # noqa: F401  (loads libtorch, which the compiled library links against)

from lora_ops import _C  # noqa: F401  (registers torch.ops.lora_ops.*)
from lora_ops.ops import arrow_prototypes, arrow_route, grouped_lora, merge_lowrank, randomized_svd

__all__ = ["grouped_lora", "merge_lowrank", "randomized_svd", "arrow_prototypes", "arrow_route", "cuda_built",
           "__version__"]
__version__ = "0.1.0"


def cuda_built() -> bool:
    """True when the compiled library has CUDA kernels (it was built against a CUDA torch with nvcc)."""
    return torch_has_cuda_kernel("grouped_lora")


def torch_has_cuda_kernel(op: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"lora_ops::{op}", "CUDA")
