// The CPU kernels as one unit that is compiled once per instruction set (ISA): the AVX2 build
// lives in gptfast._C, the AVX-512 build in gptfast._C_avx512 (csrc/isa/). Both define the same
// functions; Python loads the module for the running CPU and calls its register_cpu_kernels()
// exactly once, so the dispatcher never sees two CPU kernels for one op, and code compiled for
// AVX-512 never runs (nor gets linked into a caller) on a CPU without it.
#pragma once
#include <torch/library.h>

namespace gptfast {

void register_attention_cpu(torch::Library& m);
void register_cross_entropy_cpu(torch::Library& m);
void register_decode_block_cpu(torch::Library& m);
void register_gelu_cpu(torch::Library& m);
void register_dropout_cpu(torch::Library& m);
void register_layer_norm_cpu(torch::Library& m);
void register_linear_cpu(torch::Library& m);

// Registers this build's CPU kernels for every gptfast op; raises if kernels are already
// registered by this module (a second call) - another module's second registration is caught by
// the Python loader, which registers one module only.
void register_cpu_kernels();
bool cpu_kernels_registered();
// The instruction set this unit was compiled for: "avx512", "avx2" or "generic".
const char* cpu_kernels_isa();

}  // namespace gptfast
