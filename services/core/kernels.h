// What arserve's CPU kernels (fused.cpp, row_product.cpp, causal_attention.cpp, decode_stack.cpp,
// image_blocks.cpp, diffusion_head.cpp) share: one module, arserve.core.fused, built by torch's
// cpp_extension for the CPU it runs on.
#pragma once

#include <torch/extension.h>

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) || defined(__FMA__)
#include <immintrin.h>
#endif

namespace arserve {

// body(lo, hi) over [0, n), split in whole chunks of at least `grain` across
// the calling thread's OpenMP threads. Not at::parallel_for: its inline
// lazy_init_num_threads has a thread_local flag of its own in this library,
// so on the server's compute thread it would re-read torch's process default
// (1, compute.start) and leave that thread, and every product after, on one
// thread. omp_get_max_threads() is the calling thread's own count.
template <typename F>
inline void parallel_chunks(int64_t n, int64_t grain, F&& body) {
  const int64_t threads = std::min<int64_t>(omp_get_max_threads(), (n + grain - 1) / grain);
  if (threads <= 1 || omp_in_parallel()) {
    body(0, n);
    return;
  }
  const int64_t chunk = (n + threads - 1) / threads;
#pragma omp parallel num_threads(static_cast<int>(threads))
  {
    const int64_t lo = omp_get_thread_num() * chunk, hi = std::min(n, lo + chunk);
    if (lo < hi) body(lo, hi);
  }
}

// body(lo, hi) over [0, n) in `pieces` contiguous pieces per thread, each
// taken by whichever thread is free first (OpenMP's dynamic schedule): on a
// shared host, a thread slowed by a neighbour takes fewer pieces instead of
// holding every other thread at the barrier.
template <typename F>
inline void parallel_pieces(int64_t n, int64_t pieces, F&& body) {
  const int64_t threads = std::min<int64_t>(omp_get_max_threads(), n);
  if (threads <= 1 || omp_in_parallel()) {
    body(0, n);
    return;
  }
  const int64_t parts = std::min(n, threads * pieces), chunk = (n + parts - 1) / parts;
#pragma omp parallel for schedule(dynamic, 1) num_threads(static_cast<int>(threads))
  for (int64_t p = 0; p < parts; ++p) {
    const int64_t lo = p * chunk, hi = std::min(n, lo + chunk);
    if (lo < hi) body(lo, hi);
  }
}

// One vector register of floats: L lanes (16 with AVX-512, 8 with AVX2), as a
// GCC/Clang vector, so that arithmetic on it reads as arithmetic.
#if defined(__AVX512F__)
constexpr int64_t L = 16;
#else
constexpr int64_t L = 8;
#endif
typedef float vec __attribute__((vector_size(L * sizeof(float))));

// a * b + c rounded once where the CPU has FMA, else twice (-ffp-contract=off);
// either way the same instruction for every element of every product.
inline vec fma_lanes(vec a, vec b, vec c) {
#if defined(__AVX512F__)
  return (vec)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif defined(__FMA__)
  return (vec)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
  return a * b + c;
#endif
}

inline vec splat(float x) {  // x in every lane (one broadcast; a loop over lanes inserts them one by one)
#if defined(__AVX512F__)
  return (vec)_mm512_set1_ps(x);
#elif defined(__AVX__)
  return (vec)_mm256_set1_ps(x);
#else
  return vec{} + x;
#endif
}

inline void store_vec(float* p, vec v) { std::memcpy(p, &v, sizeof(v)); }

template <typename T>
inline vec load_vec(const T* p) {  // L elements as floats
  vec r;
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(&r, p, sizeof(r));
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {  // a bfloat16 is a float's upper half
    typedef uint16_t vh __attribute__((vector_size(L * sizeof(uint16_t))));
    typedef uint32_t vu __attribute__((vector_size(L * sizeof(uint32_t))));
    vh h;
    std::memcpy(&h, p, sizeof(h));
    const vu u = __builtin_convertvector(h, vu) << 16;
    std::memcpy(&r, &u, sizeof(r));
  } else {
    for (int64_t l = 0; l < L; ++l) r[l] = static_cast<float>(p[l]);
  }
  return r;
}

// bfloat16 in pairs: a 32-bit word holds elements 2l (its low half) and 2l + 1
// (its high half), so 2L bfloat16 load as L words, and each half is a float
// with one integer op: the even element shifted up, the odd one masked.
typedef int32_t pair_words __attribute__((vector_size(L * sizeof(int32_t))));  // L pairs
inline pair_words load_pairs(const void* p) {  // 2L bfloat16
  pair_words w;
  std::memcpy(&w, p, sizeof(w));
  return w;
}
inline vec even_floats(pair_words w) { return (vec)(w << 16); }
inline vec odd_floats(pair_words w) { return (vec)(w & static_cast<int32_t>(0xFFFF0000u)); }


// lanes reduced in a fixed order: halves combined, then halves of those
template <typename F>
inline float reduce_lanes(vec v, F&& op) {
#if defined(__AVX512F__)
  typedef float v8 __attribute__((vector_size(8 * sizeof(float))));
  const v8 a = op(__builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7), __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15));
#else
  const vec a = v;
#endif
  typedef float v4 __attribute__((vector_size(4 * sizeof(float))));
  const v4 b = op(__builtin_shufflevector(a, a, 0, 1, 2, 3), __builtin_shufflevector(a, a, 4, 5, 6, 7));
  typedef float v2 __attribute__((vector_size(2 * sizeof(float))));
  const v2 c = op(__builtin_shufflevector(b, b, 0, 1), __builtin_shufflevector(b, b, 2, 3));
  return op(c, __builtin_shufflevector(c, c, 1, 0))[0];
}

// e^x by Cephes' expf (Moshier 1992; within about 1 ulp) in straight-line
// arithmetic that stays in vector lanes: V is float (a loop the compiler
// vectorizes; libm's expf is a scalar call per element) or a GCC vector of
// floats. Range reduction x = n ln2 + r with n = round(x / ln2), ln2 in two
// parts; a degree-5 polynomial in r; 2^n through the exponent bits. x is
// clamped to [-87, 88] (e^x from 1.6e-38 to 1.7e38): softmax's shifted scores
// (x <= 0) underflow to about 0 anyway, and SiLU's a / (1 + e^-a) does not mind.
// Each multiply-add is rounded twice (-ffp-contract=off): the bits SiLU and
// the decode softmax have always had.
template <typename V>
inline V exp_cephes(V x) {
  const auto k = [](float c) { return V{} + c; };
  x = x < -87.0f ? k(-87.0f) : x;
  x = x > 88.0f ? k(88.0f) : x;
  const V n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest (1.5 * 2^23)
  // (x - n ln2_hi) - n ln2_lo, ln2_lo < 0; the product with the first part is exact
  const V r = n * k(2.12194440e-4f) + (n * k(-0.693359375f) + x);
  V p = k(1.9875691500e-4f);
  p = p * r + k(1.3981999507e-3f);
  p = p * r + k(8.3334519073e-3f);
  p = p * r + k(4.1665795894e-2f);
  p = p * r + k(1.6666665459e-1f);
  p = p * r + k(5.0000001201e-1f);
  p = p * (r * r) + r + 1.0f;
  V scale;
  if constexpr (std::is_same_v<V, float>) {
    const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n, n in [-126, 127]
    std::memcpy(&scale, &bits, sizeof(scale));
  } else {
    typedef int32_t vint __attribute__((vector_size(sizeof(V))));
    const vint bits = (__builtin_convertvector(n, vint) + 127) << 23;
    std::memcpy(&scale, &bits, sizeof(scale));
  }
  return p * scale;
}

// Releases the GIL for its scope where the calling thread holds it (a call
// from Python); within a call that released it already (a DecodeStack step),
// it does nothing, so the kernels below nest.
class ReleaseGil {
 public:
  ReleaseGil() : state_(PyGILState_Check() ? PyEval_SaveThread() : nullptr) {}
  ~ReleaseGil() {
    if (state_ != nullptr) PyEval_RestoreThread(state_);
  }
  ReleaseGil(const ReleaseGil&) = delete;
  ReleaseGil& operator=(const ReleaseGil&) = delete;

 private:
  PyThreadState* state_;
};

// Batch-invariant matrix products (row_product.cpp).
torch::Tensor pack_rows(const torch::Tensor& w);
torch::Tensor row_product(const torch::Tensor& x, const torch::Tensor& packed, int64_t out_features);
std::vector<int64_t> row_tile(bool bfloat16);

// Causal attention over a prompt or a chunk of one (causal_attention.cpp).
torch::Tensor causal_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, int64_t start,
                               double scale);
int64_t causal_attention_width();  // head_dim must be a multiple of it

// The decode step's layers in one call (decode_stack.cpp).
void bind_decode_stack(pybind11::module& m);

// The image model's backbone blocks (image_blocks.cpp) and diffusion-head steps (diffusion_head.cpp), one call each.
void bind_image_blocks(pybind11::module& m);
void bind_diffusion_head(pybind11::module& m);

}  // namespace arserve

// The elementwise chains and decode attention (fused.cpp), each row alone in a fixed order.
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& w, double eps);
std::tuple<torch::Tensor, torch::Tensor> add_rms_norm(const torch::Tensor& x, const torch::Tensor& delta,
                                                      const torch::Tensor& w, double eps);
torch::Tensor silu_mul(const torch::Tensor& gate_up);
std::tuple<torch::Tensor, torch::Tensor> rope_qkv(const torch::Tensor& qkv, const torch::Tensor& cos,
                                                  const torch::Tensor& sin, int64_t H, int64_t K);
torch::Tensor decode_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                               const std::vector<int64_t>& lengths, double scale,
                               const std::vector<std::vector<int64_t>>& tails = {});
