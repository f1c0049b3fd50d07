// The AVX-512 build of csrc/cpu/decode_block_llama.cpp (flags: gptfast/_build_meta.py ISA_FLAGS["avx512"]); its
// own file so its object does not collide with the AVX2 build's.
#include "../cpu/decode_block_llama.cpp"
