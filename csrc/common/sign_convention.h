// One sign convention for the singular vectors the ops return. LAPACK, cuSOLVER and the Jacobi kernel are each
// free to flip a singular vector (u, v) -> (-u, -v), so without it the CPU and CUDA backends return different
// factors for the same input: each vector's component of largest magnitude is made positive (the first one on
// ties, as argmax picks; an all-zero vector keeps its sign).
#pragma once
#include <ATen/ATen.h>

namespace lora_ops {

// +1 or -1 for each vector along the last dim of v ([..., n] -> [..., 1], v's dtype): multiplying by it makes
// the vector's pivot positive.
inline at::Tensor pivot_sign(const at::Tensor& v) {
  const at::Tensor pivot = v.gather(-1, v.abs().argmax(-1, /*keepdim=*/true));
  return at::where(pivot < 0, -1.0, 1.0).to(v.scalar_type());
}

}  // namespace lora_ops
