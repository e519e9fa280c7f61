// The CUDA backend's launchers and kernels, compiled for the CPU harness: each csrc/cuda/*.cu as it is, with
// LORA_OPS_EMU making launch_utils.h hand launches to emu.h. Their ops register as lora_ops_emu::<op> for CPU
// tensors (schemas: lora_ops/_emu.py copies the real ops').
#include "emu.h"

#include "../../../csrc/cuda/arrow_route.cu"
#include "../../../csrc/cuda/grouped_lora.cu"
#include "../../../csrc/cuda/grouped_lora_backward.cu"
#include "../../../csrc/cuda/small_svd.cu"
