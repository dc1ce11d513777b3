// Fused CPU kernels for the decoder's elementwise chains (arserve.core.fused).
//
// Why: on a CPU, a batch-1 decode step of a small model spends most of its
// non-matmul time not computing but entering ops. Each matrix product streams
// megabytes of weights through the caches, and the next PyTorch op then runs
// "cold": its Python argument parsing, dispatcher and allocator paths miss the
// caches (measured on this project's Xeon: F.rms_norm on one row takes 9 us
// warm, 62-85 us right after a product; one call into this module, 13 us).
// So each chain between two products is one call here.
//
// Every kernel computes each row from that row alone, in a fixed order, so a
// row's bits do not depend on how many rows share the call (batch invariance:
// verification and plain decoding agree bit for bit). Rows are split across
// threads only in whole rows. Built with -ffp-contract=off: a * b + c rounds
// twice, as PyTorch's elementwise ops do.

#include <torch/extension.h>

#include "kernels.h"

#include <ATen/Dispatch.h>
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <cmath>
#include <tuple>
#include <vector>

using arserve::exp_cephes;

namespace {

constexpr int64_t kRowsPerTask = 16;         // rows one thread takes at a time
constexpr int64_t kReleaseGilElements = 1 << 16;  // hold the GIL for smaller calls (cheaper than a hand-over)

// body(lo, hi) over [0, rows): inline, holding the GIL, for a call that
// touches fewer than kReleaseGilElements elements; else with the GIL released
// and split across threads in chunks of at least `grain` rows.
template <typename F>
void for_rows(int64_t rows, int64_t elements, F&& body, int64_t grain = kRowsPerTask) {
  if (elements >= kReleaseGilElements) {
    arserve::ReleaseGil release;
    arserve::parallel_chunks(rows, grain, body);
  } else {
    body(0, rows);
  }
}

void check_weight(const torch::Tensor& w, const torch::Tensor& x) {
  TORCH_CHECK(w.is_contiguous() && w.numel() == x.size(1) && w.scalar_type() == x.scalar_type(),
              "w must be a contiguous [width] tensor of x's dtype");
}

void check_rows(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
  TORCH_CHECK(t.dim() == 2 && t.stride(1) == 1, name, " must be [rows, width] with contiguous rows");
}

// Root mean square normalization (Zhang & Sennrich 2019), as Llama applies it:
// y = w * (x / sqrt(mean(x^2) + eps)). The sum of squares is accumulated in
// double (each square exact, the sum of non-negative terms nearly so), so the
// result does not hinge on a summation order: it runs in kAccumulators vectors
// of doubles, element i in accumulator (i / DL) % kAccumulators, lane i % DL,
// then summed in a fixed order. One sum in order was a chain of D dependent
// adds: 0.29 ms for a 1,000-row prompt's norm, a fifth of it now.
constexpr int64_t DL = arserve::L / 2;  // doubles per vector
constexpr int64_t kAccumulators = 4;   // independent sums: an add's latency over its throughput
typedef double dvec __attribute__((vector_size(DL * sizeof(double))));

template <typename T>
void rms_norm_row(const T* x, const T* w, T* y, int64_t D, double eps) {
  dvec acc[kAccumulators] = {};
  int64_t i = 0;
  for (; i + kAccumulators * DL <= D; i += kAccumulators * DL) {
    for (int64_t a = 0; a < kAccumulators; ++a) {
      dvec v;
      for (int64_t l = 0; l < DL; ++l) v[l] = static_cast<float>(x[i + a * DL + l]);
      acc[a] += v * v;
    }
  }
  dvec sum = acc[0];
  for (int64_t a = 1; a < kAccumulators; ++a) sum += acc[a];
  double ss = 0.0;
  for (int64_t l = 0; l < DL; ++l) ss += sum[l];
  for (; i < D; ++i) {
    const double v = static_cast<float>(x[i]);
    ss += v * v;
  }
  const float inv = static_cast<float>(1.0 / std::sqrt(ss / D + eps));
  for (int64_t i = 0; i < D; ++i) {
    y[i] = static_cast<T>(static_cast<float>(w[i]) * (static_cast<float>(x[i]) * inv));
  }
}

}  // namespace

// x [R, D], w [D] -> [R, D]
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& w, double eps) {
  check_rows(x, "x");
  check_weight(w, x);
  auto y = torch::empty({x.size(0), x.size(1)}, x.options());
  const int64_t R = x.size(0), D = x.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    const int64_t xs = x.stride(0);
    for_rows(R, R * D, [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) rms_norm_row(xp + r * xs, wp, yp + r * D, D, eps);
    });
  });
  return y;
}

// The residual add and the next norm: x [R, D] + delta [R, D] -> (sum [R, D], rms_norm(sum) [R, D]).
std::tuple<torch::Tensor, torch::Tensor> add_rms_norm(const torch::Tensor& x, const torch::Tensor& delta,
                                                      const torch::Tensor& w, double eps) {
  check_rows(x, "x");
  check_rows(delta, "delta");
  TORCH_CHECK(x.sizes() == delta.sizes() && x.scalar_type() == delta.scalar_type(), "x and delta must match");
  check_weight(w, x);
  const int64_t R = x.size(0), D = x.size(1);
  auto sum = torch::empty({R, D}, x.options());
  auto y = torch::empty({R, D}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "add_rms_norm", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* dp = delta.data_ptr<scalar_t>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    scalar_t* sp = sum.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    const int64_t xs = x.stride(0), ds = delta.stride(0);
    for_rows(R, R * D, [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) {
        const scalar_t* xr = xp + r * xs;
        const scalar_t* dr = dp + r * ds;
        scalar_t* sr = sp + r * D;
        for (int64_t i = 0; i < D; ++i) sr[i] = xr[i] + dr[i];
        rms_norm_row(sr, wp, yp + r * D, D, eps);
      }
    });
  });
  return {sum, y};
}

// bfloat16 <-> float32 as c10::BFloat16 converts (round to nearest even, one
// quiet NaN), in arithmetic the compiler can put in vector lanes.
inline float bf16_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline uint16_t float_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  return f != f ? uint16_t{0x7FC0} : static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

// bfloat16 rounding in L lanes, bit for bit float_bf16: f -> its bfloat16's bits, in each lane's low half.
typedef uint32_t vbits __attribute__((vector_size(arserve::L * sizeof(uint32_t))));
typedef uint16_t vhalf __attribute__((vector_size(arserve::L * sizeof(uint16_t))));
inline vbits float_bf16_lanes(arserve::vec f) {
  vbits bits;
  std::memcpy(&bits, &f, sizeof(bits));
  const vbits rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  return f != f ? vbits{} + 0x7FC0u : rounded;
}
inline arserve::vec bf16_float_lanes(vbits h) {  // h's low halves as floats
  const vbits bits = h << 16;
  arserve::vec f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// SwiGLU's gate (Shazeer 2020): gate_up [R, 2I] (gate | up) -> silu(gate) * up [R, I].
// silu(a) = a / (1 + e^-a), e^x by exp_cephes (kernels.h), in vector lanes:
// L elements at a time as GCC vectors, the rest one by one in the same
// arithmetic. (A scalar loop under `omp simd` was left scalar by GCC without
// AVX-512: 5.7x slower there, a tenth of a 1,000-token prefill.)
torch::Tensor silu_mul(const torch::Tensor& gate_up) {
  using arserve::L;
  using arserve::vec;
  check_rows(gate_up, "gate_up");
  TORCH_CHECK(gate_up.size(1) % 2 == 0, "gate_up must have an even width (gate | up)");
  const int64_t R = gate_up.size(0), I = gate_up.size(1) / 2;
  auto y = torch::empty({R, I}, gate_up.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate_up.scalar_type(), "silu_mul", [&] {
    const scalar_t* gp = gate_up.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    const int64_t gs = gate_up.stride(0);
    for_rows(R, R * I, [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) {
        const scalar_t* g = gp + r * gs;
        const scalar_t* u = g + I;
        scalar_t* yr = yp + r * I;
        int64_t i = 0;
        if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {  // bit for bit c10's conversions, in lanes
          const uint16_t* gb = reinterpret_cast<const uint16_t*>(g);
          const uint16_t* ub = reinterpret_cast<const uint16_t*>(u);
          uint16_t* yb = reinterpret_cast<uint16_t*>(yr);
          for (; i + L <= I; i += L) {
            const vec a = arserve::load_vec(g + i);
            const vec s = bf16_float_lanes(float_bf16_lanes(a / (1.0f + exp_cephes(-a))));
            const vhalf out = __builtin_convertvector(float_bf16_lanes(s * arserve::load_vec(u + i)), vhalf);
            std::memcpy(yb + i, &out, sizeof(out));
          }
          for (; i < I; ++i) {
            const float a = bf16_float(gb[i]);
            const float s = bf16_float(float_bf16(a / (1.0f + exp_cephes(-a))));
            yb[i] = float_bf16(s * bf16_float(ub[i]));
          }
        } else {
          if constexpr (std::is_same_v<scalar_t, float>) {
            for (; i + L <= I; i += L) {
              const vec a = arserve::load_vec(g + i);
              arserve::store_vec(reinterpret_cast<float*>(yr + i), a / (1.0f + exp_cephes(-a)) * arserve::load_vec(u + i));
            }
          }
          for (; i < I; ++i) {
            const float a = static_cast<float>(g[i]);
            const float s = static_cast<float>(static_cast<scalar_t>(a / (1.0f + exp_cephes(-a))));
            yr[i] = static_cast<scalar_t>(s * static_cast<float>(u[i]));
          }
        }
      }
    });
  });
  return y;
}

// Rotary position embeddings (Su et al. 2021) on the fused q|k|v projection,
// heads split out: qkv [N, (H + 2K) * hd], cos and sin_folded [N, hd] (the
// rotate-half sign folded into sin's first half) -> (qk [H + K, N, hd]
// rotated, v [K, N, hd]). Per element: x * cos + roll(x, hd / 2) * sin.
std::tuple<torch::Tensor, torch::Tensor> rope_qkv(const torch::Tensor& qkv, const torch::Tensor& cos,
                                                  const torch::Tensor& sin, int64_t H, int64_t K) {
  check_rows(qkv, "qkv");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.dim() == 2 && cos.sizes() == sin.sizes() &&
                  cos.size(0) == qkv.size(0) && cos.scalar_type() == qkv.scalar_type() &&
                  sin.scalar_type() == qkv.scalar_type(),
              "cos and sin must be contiguous [rows, head_dim] of qkv's dtype");
  const int64_t N = qkv.size(0), hd = cos.size(1), half = hd / 2;
  TORCH_CHECK(hd % 2 == 0 && qkv.size(1) == (H + 2 * K) * hd, "qkv must be [rows, (H + 2K) * head_dim]");
  auto qk = torch::empty({H + K, N, hd}, qkv.options());
  auto v = torch::empty({K, N, hd}, qkv.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qkv.scalar_type(), "rope_qkv", [&] {
    const scalar_t* xp = qkv.data_ptr<scalar_t>();
    const scalar_t* cp = cos.data_ptr<scalar_t>();
    const scalar_t* sp = sin.data_ptr<scalar_t>();
    scalar_t* qp = qk.data_ptr<scalar_t>();
    scalar_t* vp = v.data_ptr<scalar_t>();
    const int64_t xs = qkv.stride(0);
    for_rows(N, N * qkv.size(1), [&](int64_t lo, int64_t hi) {
      for (int64_t n = lo; n < hi; ++n) {
        const scalar_t* row = xp + n * xs;
        const scalar_t* c = cp + n * hd;
        const scalar_t* s = sp + n * hd;
        for (int64_t h = 0; h < H + K; ++h) {
          const scalar_t* x = row + h * hd;
          scalar_t* out = qp + (h * N + n) * hd;
          for (int64_t i = 0; i < hd; ++i) {
            const scalar_t a = x[i] * c[i];
            const scalar_t b = x[i < half ? i + half : i - half] * s[i];
            out[i] = a + b;
          }
        }
        for (int64_t h = 0; h < K; ++h) {
          const scalar_t* x = row + (H + K + h) * hd;
          scalar_t* out = vp + (h * N + n) * hd;
          for (int64_t i = 0; i < hd; ++i) out[i] = x[i];
        }
      }
    });
  });
  return {qk, v};
}

// Attention of single queries (Vaswani et al. 2017), grouped-query (Ainslie
// et al. 2023: query head h reads key/value head h / (H / K)): q [B, H, hd],
// k and v [B, K, P, hd] (any strides but the last; a stride of 0 broadcasts a
// cache to many queries), lengths [B]: query b attends keys [0, lengths[b]).
// -> [B, H, hd]. Each (query, key/value head) pair is computed alone, in one
// fixed order whatever B or P: a decode row's bits are the same alone, in a
// batch of decode rows, or as a row of a draft chain under verification.
// tails (empty, or one per query): query b's last tails[b].size() keys are
// read from those positions instead, in that order. A draft tree's row reads
// its context, then its ancestors' slots and its own: the keys a chain of
// that path holds contiguously, read in the same order, so the same bits.
// bfloat16 keys and values are read a pair of elements at a time where a head
// is whole pair vectors (dots_pairs, weighted_sum_pairs; decision 75).
namespace {

// The CPU's own vector width (kernels.h: 16 floats with AVX-512, 8 with AVX2;
// a fixed 16 was lowered through the stack on AVX2, 3.5x slower), and the
// same fixed-order lane sum as prompt attention's.
using arserve::fma_lanes;
using arserve::load_vec;
using arserve::splat;
using arserve::vec;
constexpr int64_t kLanes = arserve::L;
inline float sum_lanes(vec v) { return arserve::reduce_lanes(v, [](auto a, auto b) { return a + b; }); }

// The scores of `keys` keys at once: out[t] = q . k[t] (q and each k[t]:
// vecs vectors), each summed lane by lane in q's order, then across its
// lanes in a fixed order, whatever `keys` is (so the same bits). One score
// alone is a chain of `vecs` dependent adds whose latency, not the CPU's
// throughput, sets its pace; four keys run four chains (decision 72).
template <int64_t keys, typename T>
void dots(const vec* q, const T* const* k, int64_t vecs, float* out) {
  vec acc[keys];
  for (int64_t t = 0; t < keys; ++t) acc[t] = q[0] * load_vec(k[t]);
  for (int64_t i = 1; i < vecs; ++i) {
    const vec qi = q[i];
    for (int64_t t = 0; t < keys; ++t) acc[t] += qi * load_vec(k[t] + i * kLanes);
  }
  for (int64_t t = 0; t < keys; ++t) out[t] = sum_lanes(acc[t]);
}
constexpr int64_t kKeys = 4;

// bfloat16 keys and values in pairs (decision 75; kernels.h's pair_words): two
// integer ops for 2L elements where widening took two per L.
using arserve::even_floats;
using arserve::load_pairs;
using arserve::odd_floats;
using arserve::pair_words;

// Scores of bfloat16 keys, a pair of elements at a time, for `pairs` vectors
// of 2L elements each: with VDPBF16PS (AVX-512 BF16) one instruction per
// pair against q's own bfloat16 bits, else q's even and odd elements
// (floats) times the key's, fused. Each score in one fixed order whatever
// `keys` is; times `scale` after the sum (q stays bfloat16).
#if defined(__AVX512BF16__)
typedef __m512bh qpairs;  // q's 2L bfloat16 elements of one pair vector, as loaded
#else
struct qpairs {
  vec even, odd;
};
#endif
inline qpairs load_q_pairs(const c10::BFloat16* q) {
#if defined(__AVX512BF16__)
  return (__m512bh)_mm512_loadu_si512(q);
#else
  const pair_words w = load_pairs(q);
  return {even_floats(w), odd_floats(w)};
#endif
}
template <int64_t keys>
void dots_pairs(const qpairs* q, const c10::BFloat16* const* k, int64_t pairs, float scale, float* out) {
  vec acc[keys];
  for (int64_t t = 0; t < keys; ++t) acc[t] = vec{};
  for (int64_t c = 0; c < pairs; ++c) {
    for (int64_t t = 0; t < keys; ++t) {
#if defined(__AVX512BF16__)
      acc[t] = (vec)_mm512_dpbf16_ps((__m512)acc[t], q[c], (__m512bh)_mm512_loadu_si512(k[t] + c * 2 * kLanes));
#else
      const pair_words w = load_pairs(k[t] + c * 2 * kLanes);
      acc[t] = fma_lanes(q[c].odd, odd_floats(w), fma_lanes(q[c].even, even_floats(w), acc[t]));
#endif
    }
  }
  for (int64_t t = 0; t < keys; ++t) out[t] = sum_lanes(acc[t]) * scale;
}

// o = sum_j p[j] v[at(j)] over j in [0, L), each lane summed in j order
// from 0 (so the same bits however the vectors are grouped). With V a
// constant the V accumulators stay in registers; a runtime V kept them in
// memory, a store and a load per vector per key (decision 72).
template <int64_t V, typename T, typename At>
void weighted_sum(const float* p, const T* vb, int64_t stride, int64_t L, At at, vec* o) {
  vec acc[V];
  for (int64_t c = 0; c < V; ++c) acc[c] = vec{};
  for (int64_t j = 0; j < L; ++j) {
    const T* vj = vb + at(j) * stride;
    const vec pj = splat(p[j]);
    for (int64_t c = 0; c < V; ++c) acc[c] += pj * load_vec(vj + c * kLanes);
  }
  for (int64_t c = 0; c < V; ++c) o[c] = acc[c];
}

// weighted_sum for bfloat16 values in pairs: P accumulators of even elements
// and P of odd ones, each lane summed in j order from 0 as there, so every
// output element has the bits it has there (only the loads differ); o:
// the 2 L P floats in element order.
template <int64_t P, typename At>
void weighted_sum_pairs(const float* p, const c10::BFloat16* vb, int64_t stride, int64_t L, At at, float* o) {
  vec acc[2 * P];
  for (int64_t c = 0; c < 2 * P; ++c) acc[c] = vec{};
  for (int64_t j = 0; j < L; ++j) {
    const c10::BFloat16* vj = vb + at(j) * stride;
    const vec pj = splat(p[j]);
    for (int64_t c = 0; c < P; ++c) {
      const pair_words w = load_pairs(vj + c * 2 * kLanes);
      acc[c] += pj * even_floats(w);
      acc[P + c] += pj * odd_floats(w);
    }
  }
  for (int64_t c = 0; c < P; ++c) {  // back in element order
    for (int64_t l = 0; l < kLanes; ++l) {
      o[c * 2 * kLanes + 2 * l] = acc[c][l];
      o[c * 2 * kLanes + 2 * l + 1] = acc[P + c][l];
    }
  }
}

// The same for any number of pair vectors, in slices of 4, 2 and 1; o: floats in element order.
template <typename At>
void weighted_sum_pairs(const float* p, const c10::BFloat16* vb, int64_t stride, int64_t L, At at, float* o,
                        int64_t pairs) {
  constexpr int64_t E = 2 * kLanes;  // elements per pair vector
  int64_t c = 0;
  for (; c + 4 <= pairs; c += 4) weighted_sum_pairs<4>(p, vb + c * E, stride, L, at, o + c * E);
  if (c + 2 <= pairs) weighted_sum_pairs<2>(p, vb + c * E, stride, L, at, o + c * E), c += 2;
  if (c < pairs) weighted_sum_pairs<1>(p, vb + c * E, stride, L, at, o + c * E);
}

// The same for any V, in slices of 8, 4, 2 and 1 vectors (each lane's sum is its own).
template <typename T, typename At>
void weighted_sum(const float* p, const T* vb, int64_t stride, int64_t L, At at, vec* o, int64_t V) {
  int64_t c = 0;
  for (; c + 8 <= V; c += 8) weighted_sum<8>(p, vb + c * kLanes, stride, L, at, o + c);
  if (c + 4 <= V) weighted_sum<4>(p, vb + c * kLanes, stride, L, at, o + c), c += 4;
  if (c + 2 <= V) weighted_sum<2>(p, vb + c * kLanes, stride, L, at, o + c), c += 2;
  if (c < V) weighted_sum<1>(p, vb + c * kLanes, stride, L, at, o + c);
}

}  // namespace

torch::Tensor decode_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                               const std::vector<int64_t>& lengths, double scale,
                               const std::vector<std::vector<int64_t>>& tails) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "q, k, v must be on the CPU");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 4 && v.sizes() == k.sizes(), "q must be [B, H, hd], k and v [B, K, P, hd]");
  const int64_t B = q.size(0), H = q.size(1), hd = q.size(2), K = k.size(1), P = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(3) == hd && K > 0 && H % K == 0, "q [B, H, hd] and k [B, K, P, hd] disagree");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "head_dim must be contiguous");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), "q, k, v must share a dtype");
  TORCH_CHECK(static_cast<int64_t>(lengths.size()) == B, "one length per query");
  TORCH_CHECK(tails.empty() || static_cast<int64_t>(tails.size()) == B, "tails: none, or one per query");
  int64_t longest = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n = lengths[b];
    TORCH_CHECK(n >= 1 && n <= P, "a query's length must be in [1, P]");
    longest = std::max(longest, n);
    if (tails.empty()) continue;
    TORCH_CHECK(static_cast<int64_t>(tails[b].size()) <= n, "a query's tail must not be longer than its length");
    for (int64_t t : tails[b]) TORCH_CHECK(t >= 0 && t < P, "a tail's position must be in [0, P)");
  }
  TORCH_CHECK(hd % kLanes == 0, "head_dim must be a multiple of ", kLanes);
  auto out = torch::empty({B, H, hd}, q.options());
  const int64_t G = H / K, V = hd / kLanes;  // query heads per key/value head; vectors per head
  const float fscale = static_cast<float>(scale);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "decode_attention", [&] {
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* kp = k.data_ptr<scalar_t>();
    const scalar_t* vp = v.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    // bfloat16 keys and values in pairs where a head is whole pair vectors (weighted_sum_pairs)
    const int64_t PV = std::is_same_v<scalar_t, c10::BFloat16> && hd % (2 * kLanes) == 0 ? hd / (2 * kLanes) : 0;
    auto pairs = [&](int64_t lo, int64_t hi) {
      std::vector<vec> qv(G * V), o(V);
      std::vector<qpairs> qp2(G * PV);
      std::vector<float> s(G * longest + kLanes);
      for (int64_t task = lo; task < hi; ++task) {
        const int64_t g = task / B, b = task % B, L = lengths[b];  // head-major: a thread reads one head's keys for many rows
        const int64_t* tail = tails.empty() ? nullptr : tails[b].data();
        const int64_t split = tails.empty() ? L : L - static_cast<int64_t>(tails[b].size());
        auto at = [&](int64_t j) { return j < split ? j : tail[j - split]; };  // key j's position
        for (int64_t i = 0; i < G; ++i) {
          const scalar_t* qh = qp + b * q.stride(0) + (g * G + i) * q.stride(1);
          if (PV) {  // (0 but for bfloat16: the casts below only run on bfloat16)
            for (int64_t c = 0; c < PV; ++c) qp2[i * PV + c] = load_q_pairs(reinterpret_cast<const c10::BFloat16*>(qh) + c * 2 * kLanes);
            continue;
          }
          for (int64_t c = 0; c < V; ++c) qv[i * V + c] = load_vec(qh + c * kLanes) * fscale;
        }
        const scalar_t* kb = kp + b * k.stride(0) + g * k.stride(1);
        const scalar_t* vb = vp + b * v.stride(0) + g * v.stride(1);
        // scores: kKeys keys at a time for the G query heads, then the rest one by one
        auto score = [&]<int64_t keys>(int64_t j) {
          const scalar_t* kj[keys];
          for (int64_t t = 0; t < keys; ++t) kj[t] = kb + at(j + t) * k.stride(2);
          for (int64_t i = 0; i < G; ++i) {
            if (PV) {
              dots_pairs<keys>(qp2.data() + i * PV, reinterpret_cast<const c10::BFloat16* const*>(kj), PV, fscale,
                               s.data() + i * L + j);
              continue;
            }
            dots<keys>(qv.data() + i * V, kj, V, s.data() + i * L + j);
          }
        };
        int64_t j = 0;
        for (; j + kKeys <= L; j += kKeys) score.template operator()<kKeys>(j);
        for (; j < L; ++j) score.template operator()<1>(j);
        for (int64_t i = 0; i < G; ++i) {  // softmax, then the probability-weighted sum of values
          float* si = s.data() + i * L;
          float m = si[0];  // the largest score: exact in any order (a sign of zero changes no s - m)
          {
            int64_t j = 0;
            const auto larger = [](auto a, auto b) { return a > b ? a : b; };  // lane by lane for vectors
            if (L >= kLanes) {
              vec mv = load_vec(si);
              for (j = kLanes; j + kLanes <= L; j += kLanes) mv = larger(mv, load_vec(si + j));
              m = arserve::reduce_lanes(mv, larger);
            }
            for (; j < L; ++j) m = std::max(m, si[j]);
          }
          vec denom = {};
          int64_t j = 0;
          for (; j + kLanes <= L; j += kLanes) {
            const vec e = exp_cephes(load_vec(si + j) - m);
            std::memcpy(si + j, &e, sizeof(e));
            denom += e;
          }
          if (j < L) {  // the last partial vector: its lanes past L neither stored nor summed
            vec x = splat(0.0f);
            for (int64_t l = 0; j + l < L; ++l) x[l] = si[j + l] - m;
            vec e = exp_cephes(x);
            for (int64_t l = 0; l < kLanes; ++l) {
              if (j + l < L) si[j + l] = e[l]; else e[l] = 0.0f;
            }
            denom += e;
          }
          const float total = sum_lanes(denom);
          if (PV) weighted_sum_pairs(si, reinterpret_cast<const c10::BFloat16*>(vb), v.stride(2), L, at,
                                     reinterpret_cast<float*>(o.data()), PV);
          else weighted_sum(si, vb, v.stride(2), L, at, o.data(), V);
          scalar_t* oh = op + (b * H + g * G + i) * hd;
          for (int64_t c = 0; c < V; ++c) {
            const vec r = o[c] / total;
            for (int64_t l = 0; l < kLanes; ++l) oh[c * kLanes + l] = static_cast<scalar_t>(r[l]);
          }
        }
      }
    };
    // one (row, key/value head) pair a chunk; counted in query-key products / 4,
    // since splitting pays later here than for an elementwise chain
    for_rows(B * K, B * H * longest * hd / 4, pairs, 1);
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "arserve's fused CPU kernels for the decoder's elementwise chains";
  m.def("rms_norm", &rms_norm, "x [R, D], w [D], eps -> [R, D]");
  m.def("add_rms_norm", &add_rms_norm, "x, delta [R, D], w [D], eps -> (x + delta, rms_norm(x + delta))");
  m.def("silu_mul", &silu_mul, "gate_up [R, 2I] -> silu(gate) * up [R, I]");
  m.def("decode_attention", &decode_attention, pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"),
        pybind11::arg("lengths"), pybind11::arg("scale"), pybind11::arg("tails") = std::vector<std::vector<int64_t>>{},
        "q [B, H, hd], k, v [B, K, P, hd], lengths [B], scale, tails ([] or [B] lists) -> [B, H, hd]: query b "
        "attends keys [0, lengths[b]), its last len(tails[b]) read from the positions tails[b]");
  m.def("causal_attention", &arserve::causal_attention,
        "q [H, n, hd], k, v [K, start + n, hd], start, scale -> [H, n, hd]: query p attends keys [0, start + p]");
  m.def("causal_attention_width", &arserve::causal_attention_width, "causal_attention's head_dim must be a multiple of it");
  m.def("pack_rows", &arserve::pack_rows, "w [N, K] -> the row product's layout [N_pad / NR, K / L, NR, L]");
  m.def("row_product", &arserve::row_product,
        "x [M, K], packed (pack_rows), N -> x @ w.T [M, N], each element in one fixed order whatever M");
  m.def("row_tile", &arserve::row_tile, pybind11::arg("bfloat16") = false,
        "(NR, S): output features per tile, elements of K per slice (bfloat16: 2L where the CPU multiplies pairs)");
  arserve::bind_decode_stack(m);
  arserve::bind_image_blocks(m);
  arserve::bind_diffusion_head(m);
  m.def("rope_qkv", &rope_qkv, "qkv [N, (H+2K)*hd], cos, sin_folded [N, hd], H, K -> (qk [H+K, N, hd], v [K, N, hd])");
}
