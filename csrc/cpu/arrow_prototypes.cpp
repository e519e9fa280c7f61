// arrow_prototypes on CPU: the device-generic implementation in common/arrow_args.cpp (LAPACK QR and a tiny
// r x r SVD per adapter, batched by ATen over adapters and layers).
#include <torch/library.h>

#include "../common/arrow_args.h"

TORCH_LIBRARY_IMPL(lora_ops, CPU, m) { m.impl("arrow_prototypes", &lora_ops::arrow_prototypes_impl); }
