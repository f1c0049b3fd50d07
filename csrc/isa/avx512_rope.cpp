// The AVX-512 build of csrc/cpu/rope.cpp (flags: gptfast/_build_meta.py ISA_FLAGS["avx512"]); its own
// file so its object does not collide with the AVX2 build's.
#include "../cpu/rope.cpp"
