// Standalone check of the CUDA kernels against CPU references (float32 inputs, double math on the
// CPU), printing relative errors and median times side by side, in the spirit of llm.c's dev/cuda.
// Exit status: 0 all within tolerance, 1 a mismatch or CUDA error, 77 no usable CUDA device (ctest
// reports that as skipped). Built by CMakeLists.txt as `gptfast_cuda_test`.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <memory>
#include <random>
#include <vector>

#include "../dropout_hash.h"
#include "attention.h"
#include "cross_entropy.h"
#include "dropout.h"
#include "gelu.h"
#include "kernels.h"
#include "layer_norm.h"
#include "linear.h"
#include "linear_int8_dot.h"
#include "rms_norm.h"
#include "rope.h"
#include "swiglu.h"
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstring>

using namespace gptfast::cuda;

namespace {

bool g_ok = true;

#define CUDA_OK(call)                                                                    \
  do {                                                                                   \
    cudaError_t e_ = (call);                                                             \
    if (e_ != cudaSuccess) {                                                             \
      std::printf("CUDA error %s at %s:%d\n", cudaGetErrorString(e_), __FILE__, __LINE__); \
      std::exit(1);                                                                      \
    }                                                                                    \
  } while (0)

std::vector<float> randn(size_t n, unsigned seed, float scale = 1.f, float shift = 0.f) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.f, 1.f);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(gen) * scale + shift;
  return v;
}

struct DeviceBuffer {
  void* ptr = nullptr;
  size_t bytes = 0;
  explicit DeviceBuffer(size_t n_bytes) : bytes(n_bytes) { CUDA_OK(cudaMalloc(&ptr, std::max<size_t>(bytes, 4))); }
  explicit DeviceBuffer(const std::vector<float>& host) : DeviceBuffer(host.size() * sizeof(float)) {
    CUDA_OK(cudaMemcpy(ptr, host.data(), bytes, cudaMemcpyHostToDevice));
  }
  DeviceBuffer(const void* host, size_t n_bytes) : DeviceBuffer(n_bytes) {
    CUDA_OK(cudaMemcpy(ptr, host, bytes, cudaMemcpyHostToDevice));
  }
  ~DeviceBuffer() { cudaFree(ptr); }
  float* f() { return static_cast<float*>(ptr); }
  std::vector<float> get() const {
    std::vector<float> h(bytes / sizeof(float));
    CUDA_OK(cudaMemcpy(h.data(), ptr, bytes, cudaMemcpyDeviceToHost));
    return h;
  }
};

double rel_error(const std::vector<float>& out, const std::vector<double>& ref) {
  double num = 0, den = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    num += (out[i] - ref[i]) * (out[i] - ref[i]);
    den += ref[i] * ref[i];
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

// float32 values <-> the 16-bit storage of float16 / bfloat16 (round to nearest even).
std::vector<uint16_t> to_bits16(const std::vector<float>& x, DType dt) {
  std::vector<uint16_t> out(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    if (dt == kF16) {
      const __half h = __float2half_rn(x[i]);
      std::memcpy(&out[i], &h, 2);
    } else {
      const __nv_bfloat16 b = __float2bfloat16_rn(x[i]);
      std::memcpy(&out[i], &b, 2);
    }
  }
  return out;
}

std::vector<float> from_bits16(const DeviceBuffer& buf, DType dt) {
  std::vector<uint16_t> bits(buf.bytes / 2);
  CUDA_OK(cudaMemcpy(bits.data(), buf.ptr, buf.bytes, cudaMemcpyDeviceToHost));
  std::vector<float> out(bits.size());
  for (size_t i = 0; i < bits.size(); ++i) {
    if (dt == kF16) {
      __half h;
      std::memcpy(&h, &bits[i], 2);
      out[i] = __half2float(h);
    } else {
      __nv_bfloat16 b;
      std::memcpy(&b, &bits[i], 2);
      out[i] = __bfloat162float(b);
    }
  }
  return out;
}

#ifdef GPTFAST_CUDA_EMULATION   // tests/cuda_emulation: CPU threads stand in for the GPU, timings mean nothing
constexpr int kReps = 1, kWarmup = 0;
#else
constexpr int kReps = 20, kWarmup = 3;
#endif

double median_ms(const std::function<int()>& launch, int reps = kReps) {
  cudaEvent_t a, b;
  CUDA_OK(cudaEventCreate(&a));
  CUDA_OK(cudaEventCreate(&b));
  std::vector<float> times;
  for (int r = 0; r < reps + kWarmup; ++r) {
    CUDA_OK(cudaEventRecord(a));
    if (launch() != 0) g_ok = false;
    CUDA_OK(cudaEventRecord(b));
    CUDA_OK(cudaEventSynchronize(b));
    float ms;
    CUDA_OK(cudaEventElapsedTime(&ms, a, b));
    if (r >= kWarmup) times.push_back(ms);
  }
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

void report(const char* name, double err, double tol, double ms, double bytes_or_flops, const char* unit) {
  const bool pass = err < tol;
  g_ok = g_ok && pass;
  std::printf("%-60s rel err %.2e (tol %.0e) %s | %8.4f ms | %8.1f %s\n", name, err, tol, pass ? "ok  " : "FAIL", ms,
              bytes_or_flops / ms / 1e6, unit);
}

void test_layer_norm(int64_t rows, int64_t C) {
  auto x = randn(rows * C, 1, 2.f, 3.f), w = randn(C, 2), b = randn(C, 3), dy = randn(rows * C, 4);
  std::vector<double> y(rows * C), dx(rows * C), dw(C, 0.0), db(C, 0.0), mean(rows), rstd(rows);
  for (int64_t r = 0; r < rows; ++r) {
    double m = 0, v = 0;
    for (int64_t c = 0; c < C; ++c) m += x[r * C + c];
    m /= C;
    for (int64_t c = 0; c < C; ++c) v += (x[r * C + c] - m) * (x[r * C + c] - m);
    const double rs = 1.0 / std::sqrt(v / C + 1e-5);
    mean[r] = m, rstd[r] = rs;
    double sg = 0, sgx = 0;
    for (int64_t c = 0; c < C; ++c) {
      const double xh = (x[r * C + c] - m) * rs, g = dy[r * C + c] * w[c];
      y[r * C + c] = xh * w[c] + b[c];
      sg += g, sgx += g * xh;
      dw[c] += dy[r * C + c] * xh, db[c] += dy[r * C + c];
    }
    for (int64_t c = 0; c < C; ++c) {
      const double xh = (x[r * C + c] - m) * rs;
      dx[r * C + c] = rs * (dy[r * C + c] * w[c] - sg / C - xh * sgx / C);
    }
  }
  DeviceBuffer dx_(x), dw_(w), db_(b), ddy(dy), dy_out(rows * C * 4), dmean(rows * 4), drstd(rows * 4),
      ddx(rows * C * 4), ddw(C * 4), ddb(C * 4), scratch(2 * layer_norm_bwd_scratch_floats(rows, C) * 4);
  char name[64];
  std::snprintf(name, sizeof name, "layer_norm_fwd %lldx%lld", (long long)rows, (long long)C);
  const double ms = median_ms([&] {
    return layer_norm_fwd(kF32, dx_.ptr, dw_.ptr, db_.ptr, dy_out.ptr, dmean.f(), drstd.f(), rows, C, 1e-5f, nullptr);
  });
  report(name, rel_error(dy_out.get(), y), 1e-5, ms, 2.0 * rows * C * 4, "GB/s");
  std::snprintf(name, sizeof name, "layer_norm_bwd %lldx%lld", (long long)rows, (long long)C);
  const double ms_b = median_ms([&] {
    return layer_norm_bwd(kF32, ddy.ptr, dx_.ptr, dw_.ptr, dmean.f(), drstd.f(), ddx.ptr, ddw.ptr, ddb.ptr, scratch.f(),
                          rows, C, nullptr);
  });
  const double err = std::max({rel_error(ddx.get(), dx), rel_error(ddw.get(), dw), rel_error(ddb.get(), db)});
  report(name, err, 1e-5, ms_b, 3.0 * rows * C * 4, "GB/s");
}

void test_rms_norm(int64_t rows, int64_t C) {
  auto x = randn(rows * C, 11, 2.f, 0.5f), w = randn(C, 12, 0.5f, 1.f), dy = randn(rows * C, 13);
  std::vector<double> y(rows * C), dx(rows * C), dw(C, 0.0);
  for (int64_t r = 0; r < rows; ++r) {
    double ss = 0;
    for (int64_t c = 0; c < C; ++c) ss += double(x[r * C + c]) * x[r * C + c];
    const double rs = 1.0 / std::sqrt(ss / C + 1e-6);
    double sgx = 0;
    for (int64_t c = 0; c < C; ++c) {
      const double xh = x[r * C + c] * rs;
      y[r * C + c] = xh * w[c];
      sgx += dy[r * C + c] * w[c] * xh;
      dw[c] += dy[r * C + c] * xh;
    }
    for (int64_t c = 0; c < C; ++c) dx[r * C + c] = rs * (dy[r * C + c] * w[c] - x[r * C + c] * rs * sgx / C);
  }
  DeviceBuffer dx_(x), dw_(w), ddy(dy), dy_out(rows * C * 4), drstd(rows * 4), ddx(rows * C * 4), ddw(C * 4),
      scratch(std::max<int64_t>(rms_norm_bwd_scratch_floats(rows, C), 1) * 4);
  char name[64];
  std::snprintf(name, sizeof name, "rms_norm_fwd %lldx%lld", (long long)rows, (long long)C);
  const double ms = median_ms([&] {
    return rms_norm_fwd(kF32, dx_.ptr, dw_.ptr, dy_out.ptr, drstd.f(), rows, C, 1e-6f, nullptr);
  });
  report(name, rel_error(dy_out.get(), y), 1e-5, ms, 2.0 * rows * C * 4, "GB/s");
  std::snprintf(name, sizeof name, "rms_norm_bwd %lldx%lld", (long long)rows, (long long)C);
  const double ms_b = median_ms([&] {
    return rms_norm_bwd(kF32, ddy.ptr, dx_.ptr, dw_.ptr, drstd.f(), ddx.ptr, ddw.ptr, scratch.f(), rows, C, nullptr);
  });
  report(name, std::max(rel_error(ddx.get(), dx), rel_error(ddw.get(), dw)), 1e-5, ms_b, 3.0 * rows * C * 4, "GB/s");
}

void test_gelu(int64_t n) {
  auto x = randn(n, 5, 3.f), dy = randn(n, 6);
  std::vector<double> y(n), dx(n);
  const double k0 = std::sqrt(2.0 / M_PI), k1 = 0.044715;
  for (int64_t i = 0; i < n; ++i) {
    const double v = x[i], t = std::tanh(k0 * (v + k1 * v * v * v));
    y[i] = 0.5 * v * (1 + t);
    dx[i] = dy[i] * (0.5 * (1 + t) + 0.5 * v * (1 - t * t) * k0 * (1 + 3 * k1 * v * v));
  }
  DeviceBuffer dxin(x), ddy(dy), dout(n * 4), ddx(n * 4);
  char name[64];
  std::snprintf(name, sizeof name, "gelu_fwd n=%lld", (long long)n);
  report(name, rel_error(dout.get(), y), 1e-5,
         median_ms([&] { return gelu_fwd(kF32, dxin.ptr, dout.ptr, n, nullptr); }), 2.0 * n * 4, "GB/s");
  const double ms = median_ms([&] { return gelu_bwd(kF32, ddy.ptr, dxin.ptr, ddx.ptr, n, nullptr); });
  std::snprintf(name, sizeof name, "gelu_bwd n=%lld", (long long)n);
  report(name, rel_error(ddx.get(), dx), 1e-5, ms, 3.0 * n * 4, "GB/s");
}

// Dropout fused with the residual add (float32): the mask from the shared hash on the host, per (row, col);
// also the backward form (no residual). A dropped element must come out exactly the residual.
void test_swiglu(int64_t n) {
  auto g = randn(n, 21, 3.f), u = randn(n, 22), dy = randn(n, 23);
  std::vector<double> y(n), dg(n), du(n);
  for (int64_t i = 0; i < n; ++i) {
    const double s = 1.0 / (1.0 + std::exp(-double(g[i])));
    y[i] = g[i] * s * u[i];
    dg[i] = dy[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
    du[i] = dy[i] * g[i] * s;
  }
  DeviceBuffer dg_in(g), du_in(u), ddy(dy), dy_out(n * 4), ddg(n * 4), ddu(n * 4);
  char name[64];
  std::snprintf(name, sizeof name, "swiglu_fwd %lld", (long long)n);
  const double ms = median_ms([&] { return swiglu_fwd(kF32, dg_in.ptr, du_in.ptr, dy_out.ptr, n, nullptr); });
  report(name, rel_error(dy_out.get(), y), 1e-5, ms, 3.0 * n * 4, "GB/s");
  std::snprintf(name, sizeof name, "swiglu_bwd %lld", (long long)n);
  const double ms_b = median_ms([&] {
    return swiglu_bwd(kF32, ddy.ptr, dg_in.ptr, du_in.ptr, ddg.ptr, ddu.ptr, n, nullptr);
  });
  report(name, std::max(rel_error(ddg.get(), dg), rel_error(ddu.get(), du)), 1e-5, ms_b, 5.0 * n * 4, "GB/s");
}

// q-like x (B, H, T, D) stored as (B, T, H, D) (a transposed projection), rotated forward then back.
void test_rope(int64_t B, int64_t H, int64_t T, int64_t D) {
  const int64_t half = D / 2, n = B * H * T * D;
  auto x = randn(n, 31);
  std::vector<float> cos(T * half), sin(T * half);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t i = 0; i < half; ++i) {
      const double a = (t + 3) * std::pow(1e6, -2.0 * i / D);
      cos[t * half + i] = float(std::cos(a)), sin[t * half + i] = float(std::sin(a));
    }
  std::vector<double> y(n), back(n);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t t = 0; t < T; ++t)
        for (int64_t i = 0; i < half; ++i) {
          const float* xr = &x[((b * T + t) * H + h) * D];
          const double c = cos[t * half + i], s = sin[t * half + i];
          const int64_t o = ((b * H + h) * T + t) * D;
          y[o + i] = xr[i] * c - xr[half + i] * s, y[o + half + i] = xr[half + i] * c + xr[i] * s;
          back[o + i] = xr[i] * c + xr[half + i] * s, back[o + half + i] = xr[half + i] * c - xr[i] * s;
        }
  DeviceBuffer dx(x), dcos(cos), dsin(sin), dy(n * 4), dback(n * 4);
  char name[64];
  for (bool bwd : {false, true}) {
    std::snprintf(name, sizeof name, "rope_%s B%lld H%lld T%lld D%lld", bwd ? "bwd" : "fwd", (long long)B, (long long)H,
                  (long long)T, (long long)D);
    DeviceBuffer& out = bwd ? dback : dy;
    const double ms = median_ms([&] {
      return rope_rotate(kF32, dx.ptr, out.ptr, dcos.f(), dsin.f(), B, H, T, D, T * H * D, D, H * D, bwd, nullptr);
    });
    report(name, rel_error(out.get(), bwd ? back : y), 1e-6, ms, 2.0 * n * 4, "GB/s");
  }
}

void test_dropout_add(int64_t rows, int64_t C, float p) {
  const int64_t n = rows * C;
  auto x = randn(n, 31), res = randn(n, 32);
  std::vector<double> y(n), dx(n);
  const uint32_t head = gptfast::dropout_head_key(987654321ull, 0), thr = gptfast::dropout_threshold(p);
  for (int64_t i = 0; i < n; ++i) {
    const bool keep = gptfast::dropout_keep(gptfast::dropout_row_key(head, static_cast<uint32_t>(i / C)),
                                           static_cast<uint32_t>(i % C), thr);
    dx[i] = keep ? double(x[i]) / (1.0 - p) : 0.0;
    y[i] = res[i] + dx[i];
  }
  DeviceBuffer dxin(x), dres(res), dout(n * 4), dgrad(n * 4);
  char name[64];
  std::snprintf(name, sizeof name, "dropout_add %lldx%lld p=%.2f", (long long)rows, (long long)C, p);
  report(name, rel_error(dout.get(), y), 1e-6, median_ms([&] {
    return dropout_add(kF32, kF32, dxin.ptr, dres.ptr, dout.ptr, n, C, 987654321ull, p, nullptr); }), 3.0 * n * 4, "GB/s");
  std::snprintf(name, sizeof name, "dropout_bwd %lldx%lld p=%.2f", (long long)rows, (long long)C, p);
  report(name, rel_error(dgrad.get(), dx), 1e-6, median_ms([&] {
    return dropout_add(kF32, kF32, dxin.ptr, nullptr, dgrad.ptr, n, C, 987654321ull, p, nullptr); }), 2.0 * n * 4, "GB/s");
}

// The linear layer of decoding: M rows of float32 x against an (N, K) weight of float32, bfloat16 or
// int8 (with per-row scales), plus a bias; reference in double on the same (rounded) weights.
void test_linear(int64_t M, int64_t N, int64_t K, WDType wt) {
  auto x = randn(M * K, 21), w = randn(N * K, 22, 0.05f), bias = randn(N, 23), scales = randn(N, 24, 0.01f, 0.03f);
  std::vector<uint8_t> wbytes;
  std::vector<double> wref(N * K);
  if (wt == kWI8) {
    wbytes.resize(N * K);
    for (int64_t i = 0; i < N * K; ++i) {
      const int q = std::max(-127, std::min(127, static_cast<int>(std::lround(w[i] * 2000))));
      wbytes[i] = static_cast<uint8_t>(static_cast<int8_t>(q));
      wref[i] = double(q) * scales[i / K];
    }
  } else if (wt == kWBF16) {
    auto bits = to_bits16(w, kBF16);
    wbytes.resize(N * K * 2);
    std::memcpy(wbytes.data(), bits.data(), wbytes.size());
    for (int64_t i = 0; i < N * K; ++i) {          // a bfloat16 is the top half of a float32
      const uint32_t word = static_cast<uint32_t>(bits[i]) << 16;
      float f;
      std::memcpy(&f, &word, 4);
      wref[i] = f;
    }
  } else {
    wbytes.resize(N * K * 4);
    std::memcpy(wbytes.data(), w.data(), wbytes.size());
    for (int64_t i = 0; i < N * K; ++i) wref[i] = w[i];
  }
  std::vector<double> y(M * N);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      double s = 0;
      for (int64_t k = 0; k < K; ++k) s += double(x[m * K + k]) * wref[n * K + k];
      y[m * N + n] = s + bias[n];
    }
  DeviceBuffer dx(x), dw(wbytes.data(), wbytes.size()), db(bias), ds(scales), dy(M * N * 4);
  const float* sp = wt == kWI8 ? ds.f() : nullptr;
  const double ms = median_ms([&] { return linear_fwd(kF32, wt, dx.ptr, K, dw.ptr, sp, db.ptr, dy.ptr, M, N, K, nullptr); });
  char name[96];
  static const char* kinds[] = {"float32", "bfloat16", "int8"};
  std::snprintf(name, sizeof name, "linear M=%lld N=%lld K=%lld %s w", (long long)M, (long long)N, (long long)K, kinds[wt]);
  report(name, rel_error(dy.get(), y), 1e-5, ms, double(wbytes.size()), "GB/s");
}

// The double-precision reference of attention with dropout p (the shared counter-based mask of
// dropout_hash.h) for BH heads: o and the gradients dq, dk, dv of sum(o * go). Tk > T: the T queries are the
// last of Tk positions (a KV cache).
struct AttentionReference {
  std::vector<double> o, dq, dk, dv;
};

AttentionReference attention_reference(const std::vector<float>& q, const std::vector<float>& k,
                                       const std::vector<float>& v, const std::vector<float>& go, int64_t BH,
                                       int64_t T, int64_t Tk, int64_t D, bool causal, float p, uint64_t seed) {
  const int64_t off = Tk - T;
  const double scale = 1.0 / std::sqrt(double(D)), keep_scale = p > 0 ? 1.0 / (1.0 - p) : 1.0;
  const uint32_t threshold = gptfast::dropout_threshold(p);
  AttentionReference r{std::vector<double>(BH * T * D), std::vector<double>(BH * T * D),
                       std::vector<double>(BH * Tk * D), std::vector<double>(BH * Tk * D)};
  std::vector<double> P(Tk), Z(Tk), dZ(Tk);
  for (int64_t h = 0; h < BH; ++h) {
    const float *Q = &q[h * T * D], *K = &k[h * Tk * D], *V = &v[h * Tk * D], *G = &go[h * T * D];
    const uint32_t head = gptfast::dropout_head_key(seed, static_cast<uint32_t>(h));
    for (int64_t i = 0; i < T; ++i) {
      const int64_t end = causal ? i + off + 1 : Tk;   // query i sits at position i + off
      const uint32_t row_key = gptfast::dropout_row_key(head, static_cast<uint32_t>(i + off));
      double m = -1e300, s = 0;
      for (int64_t j = 0; j < end; ++j) {
        double dot = 0;
        for (int64_t d = 0; d < D; ++d) dot += double(Q[i * D + d]) * K[j * D + d];
        P[j] = dot * scale;
        m = std::max(m, P[j]);
      }
      for (int64_t j = 0; j < end; ++j) s += (P[j] = std::exp(P[j] - m));
      double rowsum = 0;                         // sum_j dZ_ij Z_ij = rowsum(dO * O)
      for (int64_t j = 0; j < end; ++j) {
        P[j] /= s;
        const bool keep = p == 0 || gptfast::dropout_keep(row_key, static_cast<uint32_t>(j), threshold);
        Z[j] = keep ? P[j] * keep_scale : 0.0;
        double dz = 0;
        for (int64_t d = 0; d < D; ++d) dz += double(G[i * D + d]) * V[j * D + d];
        dZ[j] = keep ? dz * keep_scale : 0.0;    // the gradient reaching P through the dropout
        rowsum += dz * Z[j];
        for (int64_t d = 0; d < D; ++d) r.o[(h * T + i) * D + d] += Z[j] * V[j * D + d];
      }
      for (int64_t j = 0; j < end; ++j) {
        const double ds = P[j] * (dZ[j] - rowsum) * scale;
        for (int64_t d = 0; d < D; ++d) {
          r.dq[(h * T + i) * D + d] += ds * K[j * D + d];
          r.dk[(h * Tk + j) * D + d] += ds * Q[i * D + d];
          r.dv[(h * Tk + j) * D + d] += Z[j] * G[i * D + d];
        }
      }
    }
  }
  return r;
}

// Causal or full attention with dropout p against its reference, in every dtype.
void test_attention(int64_t BH, int64_t T, int64_t D, bool causal = true, float p = 0.f, int64_t Tk = 0) {
  Tk = Tk ? Tk : T;
  const int64_t off = Tk - T, nq = BH * T * D, nk = BH * Tk * D;
  auto q = randn(nq, 7), k = randn(nk, 8), v = randn(nk, 9), go = randn(nq, 10);
  const double scale = 1.0 / std::sqrt(double(D));
  const uint64_t seed = 1234567;
  const AttentionReference ref = attention_reference(q, k, v, go, BH, T, Tk, D, causal, p, seed);
  const double flops = 4.0 * BH * T * Tk * D * (causal && off == 0 ? 0.5 : 1.0);
  const char* dtype_names[] = {"fp32", "fp16", "bf16"};
  for (DType dt : {kF32, kF16, kBF16}) {
    // fp16/bf16 with D % 16 == 0 run on the tensor-core kernels (attention_tc.cu) unless
    // GPTFAST_CUDA_ATTENTION=simt; inputs are rounded, math is fp32: a looser bar than fp32's.
    const double tol = dt == kF32 ? 1e-4 : dt == kF16 ? 5e-3 : 3e-2;
    const size_t es = dt == kF32 ? 4 : 2;
    auto upload = [&](const std::vector<float>& x) {
      if (dt == kF32) return std::make_unique<DeviceBuffer>(x);
      const auto bits = to_bits16(x, dt);
      return std::make_unique<DeviceBuffer>(bits.data(), x.size() * 2);
    };
    auto download = [&](const DeviceBuffer& b) { return dt == kF32 ? b.get() : from_bits16(b, dt); };
    auto dq_ = upload(q), dk_ = upload(k), dv_ = upload(v), dgo = upload(go);
    DeviceBuffer dout(nq * es), dlse(BH * T * 4), ddelta(BH * T * 4), gq(nq * es), gk(nk * es), gv(nk * es);
    char name[112], what[48];
    std::snprintf(what, sizeof what, "%s%s%s", causal ? "" : " full", p > 0 ? " drop" : "", off ? " cached" : "");
    std::snprintf(name, sizeof name, "attention_fwd %s BH=%lld T=%lld Tk=%lld D=%lld%s", dtype_names[dt],
                  (long long)BH, (long long)T, (long long)Tk, (long long)D, what);
    const double ms = median_ms([&] {
      return attention_fwd(dt, dq_->ptr, dk_->ptr, dv_->ptr, dout.ptr, dlse.f(), BH, T, Tk, D, causal, float(scale), p,
                           seed, nullptr);
    });
    report(name, rel_error(download(dout), ref.o), tol, ms, flops, "GFLOP/s");
    std::snprintf(name, sizeof name, "attention_bwd %s BH=%lld T=%lld Tk=%lld D=%lld%s", dtype_names[dt],
                  (long long)BH, (long long)T, (long long)Tk, (long long)D, what);
    const double ms_b = median_ms([&] {
      return attention_bwd(dt, dgo->ptr, dq_->ptr, dk_->ptr, dv_->ptr, dout.ptr, dlse.f(), ddelta.f(), gq.ptr, gk.ptr,
                           gv.ptr, BH, T, Tk, D, causal, float(scale), p, seed, nullptr);
    });
    const double err = std::max({rel_error(download(gq), ref.dq), rel_error(download(gk), ref.dk),
                                 rel_error(download(gv), ref.dv)});
    report(name, err, tol, ms_b, 2.5 * flops, "GFLOP/s");
  }
}

// Grouped-query attention: BHk K/V heads, each read by `group` query heads. The reference is the MHA one on K and
// V repeated per group, its dK and dV summed over each group (what the kernels must give without the copies).
void test_attention_gqa(int64_t BHk, int64_t group, int64_t T, int64_t D, float p = 0.f) {
  const int64_t BH = BHk * group, nq = BH * T * D, nk = BHk * T * D;
  auto q = randn(nq, 17), k = randn(nk, 18), v = randn(nk, 19), go = randn(nq, 20);
  std::vector<float> kr(nq), vr(nq);                           // K, V repeated: head bh holds K/V head bh / group
  for (int64_t bh = 0; bh < BH; ++bh)
    for (int64_t i = 0; i < T * D; ++i) {
      kr[bh * T * D + i] = k[(bh / group) * T * D + i];
      vr[bh * T * D + i] = v[(bh / group) * T * D + i];
    }
  const uint64_t seed = 7654321;
  const double scale = 1.0 / std::sqrt(double(D));
  const AttentionReference ref = attention_reference(q, kr, vr, go, BH, T, T, D, true, p, seed);
  std::vector<double> dk(nk, 0.0), dv(nk, 0.0);
  for (int64_t bh = 0; bh < BH; ++bh)
    for (int64_t i = 0; i < T * D; ++i) {
      dk[(bh / group) * T * D + i] += ref.dk[bh * T * D + i];
      dv[(bh / group) * T * D + i] += ref.dv[bh * T * D + i];
    }
  for (DType dt : {kF32, kBF16}) {
    const double tol = dt == kF32 ? 1e-4 : 3e-2;
    const size_t es = dt == kF32 ? 4 : 2;
    auto upload = [&](const std::vector<float>& x) {
      if (dt == kF32) return std::make_unique<DeviceBuffer>(x);
      const auto bits = to_bits16(x, dt);
      return std::make_unique<DeviceBuffer>(bits.data(), x.size() * 2);
    };
    auto download = [&](const DeviceBuffer& b) { return dt == kF32 ? b.get() : from_bits16(b, dt); };
    auto dq_ = upload(q), dk_ = upload(k), dv_ = upload(v), dgo = upload(go);
    DeviceBuffer dout(nq * es), dlse(BH * T * 4), ddelta(BH * T * 4), gq(nq * es), gk(nk * es), gv(nk * es);
    char name[112];
    std::snprintf(name, sizeof name, "attention %s GQA BHk=%lld x%lld T=%lld D=%lld%s",
                  dt == kF32 ? "fp32" : "bf16", (long long)BHk, (long long)group, (long long)T, (long long)D,
                  p > 0 ? " drop" : "");
    const double ms = median_ms([&] {
      const int fwd = attention_fwd(dt, dq_->ptr, dk_->ptr, dv_->ptr, dout.ptr, dlse.f(), BH, T, T, D, true,
                                    float(scale), p, seed, nullptr, group);
      return fwd ? fwd : attention_bwd(dt, dgo->ptr, dq_->ptr, dk_->ptr, dv_->ptr, dout.ptr, dlse.f(), ddelta.f(),
                                       gq.ptr, gk.ptr, gv.ptr, BH, T, T, D, true, float(scale), p, seed, nullptr, group);
    });
    const double err = std::max({rel_error(download(dout), ref.o), rel_error(download(gq), ref.dq),
                                 rel_error(download(gk), dk), rel_error(download(gv), dv)});
    report(name, err, tol, ms, 3.5 * 2.0 * BH * T * T * D, "GFLOP/s");
  }
}

void test_cross_entropy(int64_t N, int64_t V) {
  auto x = randn(N * V, 11, 2.f);
  std::vector<int64_t> t(N);
  for (int64_t r = 0; r < N; ++r) t[r] = (r * 7919) % V;
  std::vector<double> loss(N), grad(N * V);
  for (int64_t r = 0; r < N; ++r) {
    double m = -1e300, s = 0;
    for (int64_t i = 0; i < V; ++i) m = std::max(m, double(x[r * V + i]));
    for (int64_t i = 0; i < V; ++i) s += std::exp(x[r * V + i] - m);
    const double lse = m + std::log(s);
    loss[r] = lse - x[r * V + t[r]];
    for (int64_t i = 0; i < V; ++i) grad[r * V + i] = std::exp(x[r * V + i] - lse) - (i == t[r] ? 1 : 0);
  }
  DeviceBuffer dx(x), dt(N * 8), dloss(N * 4), dlse(N * 4), dgrad(N * V * 4);
  CUDA_OK(cudaMemcpy(dt.ptr, t.data(), N * 8, cudaMemcpyHostToDevice));
  char name[64];
  std::snprintf(name, sizeof name, "cross_entropy_fwd N=%lld V=%lld", (long long)N, (long long)V);
  const double ms = median_ms([&] {
    return cross_entropy_fwd(kF32, dx.ptr, static_cast<int64_t*>(dt.ptr), dloss.f(), dlse.f(), dgrad.ptr, N, V, -100,
                             true, nullptr);
  });
  report(name, std::max(rel_error(dloss.get(), loss), rel_error(dgrad.get(), grad)), 1e-5, ms, 2.0 * N * V * 4, "GB/s");
}

// x's rows quantized on the host as the CPU kernels do (127.f / amax, nearbyint, clamp): the kernels' q must match
// these bits exactly; returns Kp.
int64_t host_quantize(const std::vector<float>& x, int64_t M, int64_t K, std::vector<int8_t>& q, std::vector<float>& sx) {
  const int64_t Kp = (K + 63) / 64 * 64;
  q.assign(M * Kp, 0);
  sx.assign(M, 0.f);
  for (int64_t m = 0; m < M; ++m) {
    float amax = 0.f;
    for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(x[m * K + k]));
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    sx[m] = amax / 127.f;
    for (int64_t k = 0; k < K; ++k)
      q[m * Kp + k] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, std::nearbyint(x[m * K + k] * inv))));
  }
  return Kp;
}

// The rows of x to int8 on the device: q and sx bit for bit the host's. Returns the buffers' error count (0 or more).
double quantize_on_device(const std::vector<float>& x, int64_t M, int64_t K, DeviceBuffer& dq, DeviceBuffer& dsx) {
  std::vector<int8_t> q;
  std::vector<float> sx;
  const int64_t Kp = host_quantize(x, M, K, q, sx);
  DeviceBuffer dx(x);
  CUDA_OK(static_cast<cudaError_t>(quantize_rows_int8(dx.f(), K, M, K, static_cast<int8_t*>(dq.ptr), Kp, dsx.f(), nullptr)));
  std::vector<int8_t> got(M * Kp);
  CUDA_OK(cudaMemcpy(got.data(), dq.ptr, got.size(), cudaMemcpyDeviceToHost));
  double wrong = std::memcmp(got.data(), q.data(), got.size()) != 0;
  const auto gsx = dsx.get();
  for (int64_t m = 0; m < M; ++m) wrong += gsx[m] != sx[m];
  return wrong;
}

// int8 x int8 (linear_w8a8): exact sums, the host's q and sx, against float64.
void test_linear_w8a8(int64_t M, int64_t N, int64_t K) {
  auto x = randn(M * K, 31), bias = randn(N, 32), scales = randn(N, 33, 0.001f, 0.003f), wf = randn(N * K, 34, 40.f);
  std::vector<int8_t> w(N * K), q;
  for (int64_t i = 0; i < N * K; ++i) w[i] = static_cast<int8_t>(std::max(-127.f, std::min(127.f, std::round(wf[i]))));
  std::vector<float> sx;
  const int64_t Kp = host_quantize(x, M, K, q, sx);
  std::vector<double> y(M * N);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      double acc = 0;
      for (int64_t k = 0; k < K; ++k) acc += double(q[m * Kp + k]) * w[n * K + k];
      y[m * N + n] = acc * sx[m] * scales[n] + bias[n];
    }
  DeviceBuffer dq(M * Kp), dsx(M * 4), dw(w.data(), w.size()), ds(scales), db(bias), dy(M * N * 4);
  const double wrong_q = quantize_on_device(x, M, K, dq, dsx);
  const double ms = median_ms([&] {
    return linear_w8a8_fwd(static_cast<int8_t*>(dq.ptr), Kp, dsx.f(), static_cast<int8_t*>(dw.ptr), ds.f(), db.f(),
                           dy.f(), M, N, K, nullptr);
  });
  char name[96];
  std::snprintf(name, sizeof name, "linear_w8a8 M=%lld N=%lld K=%lld", (long long)M, (long long)N, (long long)K);
  report(name, wrong_q > 0 ? 1.0 : rel_error(dy.get(), y), 1e-5, ms, double(N * K), "GB/s");
}

// 4-bit weights (linear_int4), groups of `group`: nibbles u = w + 8 packed as pack_int4 does, against float64.
void test_linear_int4(int64_t M, int64_t N, int64_t K, int group) {
  auto x = randn(M * K, 41), bias = randn(N, 42), uf = randn(N * K, 43, 4.f, 8.f);
  std::vector<int8_t> q;
  std::vector<float> sx;
  const int64_t Kp = host_quantize(x, M, K, q, sx), G = Kp / group;
  auto scales = randn(N * G, 44, 0.001f, 0.003f);
  std::vector<int> u(N * Kp, 8);                       // padding: weight 0
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) u[n * Kp + k] = std::max(0, std::min(15, static_cast<int>(std::lround(uf[n * K + k]))));
  std::vector<uint8_t> packed(N * Kp / 2);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t b = 0; b < Kp / 64; ++b)
      for (int j = 0; j < 32; ++j)
        packed[n * Kp / 2 + b * 32 + j] = static_cast<uint8_t>(u[n * Kp + b * 64 + j] | (u[n * Kp + b * 64 + 32 + j] << 4));
  std::vector<double> y(M * N);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      double acc = 0;
      for (int64_t k = 0; k < Kp; ++k) acc += double(q[m * Kp + k]) * (u[n * Kp + k] - 8) * scales[n * G + k / group];
      y[m * N + n] = acc * sx[m] + bias[n];
    }
  DeviceBuffer dq(M * Kp), dsx(M * 4), dw(packed.data(), packed.size()), ds(scales), db(bias), dy(M * N * 4);
  const double wrong_q = quantize_on_device(x, M, K, dq, dsx);
  const double ms = median_ms([&] {
    return linear_int4_fwd(static_cast<int8_t*>(dq.ptr), Kp, dsx.f(), static_cast<uint8_t*>(dw.ptr), ds.f(), G, db.f(),
                           dy.f(), M, N, nullptr);
  });
  char name[96];
  std::snprintf(name, sizeof name, "linear_int4 g%d M=%lld N=%lld K=%lld", group, (long long)M, (long long)N, (long long)K);
  report(name, wrong_q > 0 ? 1.0 : rel_error(dy.get(), y), 1e-5, ms, double(packed.size() + scales.size() * 4), "GB/s");
}

}  // namespace

// Every code path, at sizes a CPU emulation (tests/cuda_emulation) gets through in seconds.
void emulated_checks() {
  test_layer_norm(300, 768);      // enough rows for several column blocks of the dweight/dbias reduction
  test_layer_norm(37, 1023);
  test_layer_norm(5, 1600);
  test_rms_norm(300, 1024);       // several chunks of the dweight reduction
  test_rms_norm(7, 1023);
  test_rms_norm(5, 80);
  test_gelu(4096 * 8 + 8);
  test_gelu(1001);
  test_swiglu(3 * 1024 + 5);
  test_rope(2, 3, 7, 64);
  test_rope(1, 2, 5, 34);
  test_attention(2, 129, 64);
  test_attention(1, 70, 80);
  test_attention(1, 1, 16);
  test_attention(1, 7, 32);
  test_attention(1, 100, 64, true, 0.2f);
  test_attention(1, 65, 32, false, 0.f);
  test_attention(1, 40, 128, false, 0.1f);
  test_attention(2, 1, 64, true, 0.f, 77);       // one new token against a KV cache
  test_attention(1, 20, 80, true, 0.1f, 150);    // a chunk of new tokens, dropout at their positions
  test_attention_gqa(2, 3, 70, 64);              // grouped-query: 6 query heads on 2 K/V heads (SIMT and tensor cores)
  test_attention_gqa(1, 4, 33, 32, 0.1f);
  test_cross_entropy(6, 50257);
  test_dropout_add(7, 1023, 0.1f);
  test_dropout_add(3, 80, 0.5f);
  for (WDType wt : {kWF32, kWBF16, kWI8}) {
    test_linear(1, 37, 768, wt);       // packed rows
    test_linear(5, 9, 100, wt);        // unaligned rows: one element at a time
    test_linear(16, 6, 64, wt);
  }
  test_linear_w8a8(1, 9, 768);         // 16-byte packs
  test_linear_w8a8(5, 7, 100);         // K off the pack: one element at a time
  test_linear_w8a8(16, 5, 33);
  test_linear_int4(1, 9, 768, 32);
  test_linear_int4(3, 7, 130, 64);     // K padded to 192
  test_linear_int4(16, 5, 64, 32);
}

// The GPU's run: GPT-2 and Qwen3 shapes, timed, and the unaligned paths.
void gpu_checks() {
  test_layer_norm(8 * 1024, 768);
  test_layer_norm(37, 1023);      // generic (unaligned) path
  test_layer_norm(16, 1600);
  test_rms_norm(8 * 512, 1024);
  test_rms_norm(8 * 512 * 16, 128);   // Qwen3's per-head q/k norm
  test_rms_norm(37, 1023);
  test_gelu(8 * 1024 * 3072);
  test_gelu(1001);
  test_swiglu(8 * 512 * 3072);
  test_swiglu(1001);
  test_rope(4, 16, 512, 128);
  test_rope(1, 3, 7, 34);
  test_attention(4, 257, 64);
  test_attention(2, 129, 80);
  test_attention(1, 1, 16);
  test_attention(2, 1000, 128);
  test_attention(3, 7, 32);
  test_attention(2, 300, 64, true, 0.1f);
  test_attention(2, 200, 80, false, 0.f);
  test_attention(8, 1, 64, true, 0.f, 1000);
  test_attention_gqa(8, 2, 512, 128);            // Qwen3-0.6B: 16 query heads on 8 K/V heads
  test_cross_entropy(64, 50257);
  test_dropout_add(8 * 1024, 768, 0.1f);
  test_dropout_add(7, 1023, 0.5f);
  for (WDType wt : {kWF32, kWBF16, kWI8}) {
    test_linear(1, 50257, 768, wt);    // GPT-2's LM head, one token
    test_linear(1, 3072, 768, wt);
    test_linear(8, 50257, 768, wt);
    test_linear(3, 77, 1001, wt);      // unaligned rows
  }
  for (int64_t M : {1, 8}) {           // decoding: GPT-2's MLP and LM head, int8 and 4-bit
    test_linear_w8a8(M, 3072, 768);
    test_linear_w8a8(M, 50257, 768);
    test_linear_int4(M, 3072, 768, 32);
    test_linear_int4(M, 3072, 768, 64);
  }
  test_linear_w8a8(3, 77, 1001);       // K off the 16-byte pack
}

int main() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    std::printf("no usable CUDA device: skipping the kernel checks\n");
    return 77;
  }
  cudaDeviceProp prop;
  CUDA_OK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s (sm_%d%d)\n", prop.name, prop.major, prop.minor);
#ifdef GPTFAST_CUDA_EMULATION
  emulated_checks();
#else
  gpu_checks();
#endif
  std::printf("%s\n", g_ok ? "all kernels within tolerance" : "SOME KERNELS FAILED");
  return g_ok ? 0 : 1;
}
