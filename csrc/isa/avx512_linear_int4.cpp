// The AVX-512 build of csrc/cpu/linear_int4.cpp (flags: gptfast/_build_meta.py ISA_FLAGS["avx512"]; its VNNI loops
// carry their own target attribute and run where the CPU has avx512_vnni); its own file so its object does not
// collide with the AVX2 build's.
#include "../cpu/linear_int4.cpp"
