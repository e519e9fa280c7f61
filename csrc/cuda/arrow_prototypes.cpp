// arrow_prototypes on CUDA: the same ATen implementation as on CPU (cuSOLVER batched QR and SVD of the r x r
// cores). It runs once per library, not per token, so a custom kernel would not pay for its compile time; the
// host synchronisation cuSOLVER adds is acceptable there. A plain .cpp (no kernel): compiled in CUDA builds only.
#ifdef LORA_OPS_CUDA
#include <torch/library.h>

#include "../common/arrow_args.h"

TORCH_LIBRARY_IMPL(lora_ops, CUDA, m) { m.impl("arrow_prototypes", &lora_ops::arrow_prototypes_impl); }
#endif
