// Shared helpers for the gptfast C++ ops: argument checks with clear messages, output poisoning.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>

namespace gptfast {

// When on (tests), freshly allocated outputs are filled with NaN before a kernel runs, so an
// element the kernel forgets to write shows up instead of passing by luck.
bool poison_outputs();
void set_poison_outputs(bool on);
void maybe_poison(at::Tensor& t);

// v, held in a register the compiler cannot see into: an addition after it is not contracted with the
// multiplication before it into one FMA. GCC contracts `a * b + c` wherever FMA is enabled - in some inlined copies
// of an epilogue and not in others (another tile shape, a function compiled for another target) - and an output's
// bits would then depend on the tile or the instruction path it went through.
inline float rounded(float v) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  asm("" : "+x"(v));
#elif defined(__GNUC__) && defined(__aarch64__)
  asm("" : "+w"(v));
#endif
  return v;
}

inline void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), name, " is undefined");
  TORCH_CHECK(t.is_floating_point(), name, " must be a floating-point tensor, got ", t.scalar_type());
}

inline void check_same(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  check_float(t, name);
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, " has dtype ", t.scalar_type(), " but ",
              ref_name, " has ", ref.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), name, " is on ", t.device(), " but ", ref_name, " is on ",
              ref.device());
}

inline void check_stat(const at::Tensor& t, const char* name, const at::Tensor& ref, at::ScalarType want) {
  TORCH_CHECK(t.scalar_type() == want, name, " must have dtype ", want, ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), name, " is on ", t.device(), " but x is on ", ref.device());
}

// Statistics (mean, rstd, logsumexp) are float32, or float64 for float64 inputs.
inline at::ScalarType stat_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Attention arguments, for every implementation: q (B, H, Tq, D); k, v (B, Hk, Tk, D) with Tk >= Tq
// (the queries are the last Tq positions) and Hk dividing H (grouped-query attention: query head h reads
// K/V head h / (H / Hk)); 1 <= D <= max_head_dim; `impl` names it in messages.
inline void check_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double dropout_p,
                                 const at::Tensor& seed, int64_t max_head_dim, const char* impl) {
  check_float(q, "q");
  TORCH_CHECK(q.dim() == 4, "q must have rank 4 (B, H, T, D), got shape ", q.sizes());
  check_same(k, "k", q, "q");
  check_same(v, "v", q, "q");
  TORCH_CHECK(k.dim() == 4 && k.size(0) == q.size(0) && k.size(1) >= 1 && q.size(1) % k.size(1) == 0 &&
                  k.size(3) == q.size(3),
              "k must have shape (B, Hk, Tk, D) matching q's B, D with Hk dividing q's H ", q.sizes(), ", got ",
              k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), "v must have k's shape ", k.sizes(), ", got ", v.sizes());
  TORCH_CHECK(k.size(2) >= q.size(2), "k must hold at least as many positions as q (the queries are the last ",
              q.size(2), " of ", k.size(2), " positions)");
  TORCH_CHECK(q.size(3) >= 1 && q.size(3) <= max_head_dim, "head dim D=", q.size(3), " is unsupported by the ", impl,
              " attention (1 to ", max_head_dim, ")");
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "dropout_p must be in [0, 1), got ", dropout_p);
  TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong,
              "seed must be a one-element int64 tensor, got ", seed.scalar_type(), " with ", seed.numel(),
              " elements");
}

// The backward's extra inputs: dout and o like q, lse (B, H, Tq) in q's statistics dtype.
inline void check_attention_bwd_args(const at::Tensor& dout, const at::Tensor& o, const at::Tensor& lse,
                                     const at::Tensor& q) {
  check_same(dout, "dout", q, "q");
  check_same(o, "o", q, "q");
  TORCH_CHECK(dout.sizes() == q.sizes(), "dout must have q's shape ", q.sizes(), ", got ", dout.sizes());
  TORCH_CHECK(o.sizes() == q.sizes(), "o must have q's shape ", q.sizes(), ", got ", o.sizes());
  TORCH_CHECK(lse.scalar_type() == stat_dtype(q.scalar_type()), "lse must have dtype ", stat_dtype(q.scalar_type()),
              ", got ", lse.scalar_type());
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == q.size(0) && lse.size(1) == q.size(1) && lse.size(2) == q.size(2),
              "lse must have shape (B, H, T) = (", q.size(0), ", ", q.size(1), ", ", q.size(2), "), got ",
              lse.sizes());
}

}  // namespace gptfast
