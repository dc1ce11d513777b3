// Causal attention over a prompt (prefill), or over a chunk of one that
// follows `start` cached positions, on the CPU: FlashAttention's tiling
// (Dao et al. 2022; Dao 2023, "FlashAttention-2") with grouped-query
// attention (Ainslie et al. 2023) folded into the rows.
//
// Why a kernel of our own: a 1,000-token prompt of SmolLM2-135M spent 0.36 s
// of its 1.45 s prefill in PyTorch's CPU flash attention, about 100 GFLOP/s,
// while the matrix products beside it ran at about 210 (decision 53). Here
// the two products of attention are register-tiled like a GEMM's
// micro-kernel, and the query heads that share a key/value head are rows of
// one tile, so each key and value is loaded once for all of them.
//
// Words used here:
// - a task: one key/value head g and BQ consecutive query positions; its rows
//   are (position p, query head i) pairs, row r = p * G + i (G query heads per
//   key/value head), so the rows' causal limits never decrease with r.
// - a key block: BK consecutive keys; the keys of one head are packed as
//   [blocks, hd, BK] (transposed: a score micro-tile reads BK keys' d-th
//   elements as CV vectors) and the values as [blocks * BK, hd], both float
//   and zero past the last key.
// - a micro-tile: MR rows against one key block (scores, MR x BK) or against
//   CV vectors of the head dimension (the value sum), its accumulators in
//   registers.
// - online softmax: each row keeps its running maximum m, denominator l and
//   unnormalized output O; a key block with a larger maximum rescales l and
//   O by e^(m_old - m_new) (Milakov & Gimelshein 2018).
//
// Query position p (0-based in the chunk) attends keys [0, start + p]. Every
// sum is in float32 in a fixed order; the result does not depend on the
// threads. It is not bit-equal to decoding's attention (decode_attention):
// prefill needs no bitwise agreement with decoding, since a greedy draft
// under verification attends as decoding does (attend_chain).

#include "kernels.h"

#include <ATen/Dispatch.h>

#include <cmath>
#include <limits>
#include <vector>

namespace arserve {
namespace {

#if defined(__AVX512F__)
constexpr int64_t MR = 4;  // rows per micro-tile: 16 accumulators + 4 key or value vectors of 32 registers
#else
constexpr int64_t MR = 2;  // 8 accumulators + 4 key or value vectors of 16 registers
#endif
constexpr int64_t CV = 4;       // vectors per micro-tile: keys (scores) or head dimensions (values)
constexpr int64_t BK = CV * L;  // keys per block: 64 with AVX-512, 32 with AVX2
constexpr int64_t BQ = 32;      // query positions per task
constexpr float kNoScore = -std::numeric_limits<float>::infinity();

// v, loaded once into a register: else GCC folds the load into each of the MR
// FMAs that use it, and the micro-tile waits on loads rather than on FMAs
inline vec in_register(vec v) {
  asm("" : "+v"(v));
  return v;
}

// s[r, 0:BK] = q[r, :] . kt[:, 0:BK] for MR rows: q [MR, hd] (scaled), kt [hd, BK], s [MR, BK]
inline void scores(const float* q, const float* kt, int64_t hd, float* s) {
  vec acc[MR][CV];
  for (int64_t r = 0; r < MR; ++r) {
    for (int64_t c = 0; c < CV; ++c) acc[r][c] = vec{};
  }
  for (int64_t d = 0; d < hd; ++d) {
    vec kv[CV];
    for (int64_t c = 0; c < CV; ++c) kv[c] = in_register(load_vec(kt + d * BK + c * L));
    for (int64_t r = 0; r < MR; ++r) {
      const vec qd = splat(q[r * hd + d]);
      for (int64_t c = 0; c < CV; ++c) acc[r][c] = fma_lanes(qd, kv[c], acc[r][c]);
    }
  }
  for (int64_t r = 0; r < MR; ++r) {
    for (int64_t c = 0; c < CV; ++c) store_vec(s + r * BK + c * L, acc[r][c]);
  }
}

// o[r, :] += sum_j p[r, j] v[j, :] over the first `keys` keys, for MR rows: p [MR, BK], v [BK, hd], o [MR, hd]
inline void add_values(const float* p, const float* v, int64_t keys, int64_t hd, float* o) {
  for (int64_t c0 = 0; c0 < hd; c0 += CV * L) {
    vec acc[MR][CV];
    for (int64_t r = 0; r < MR; ++r) {
      for (int64_t c = 0; c < CV; ++c) acc[r][c] = load_vec(o + r * hd + c0 + c * L);
    }
    for (int64_t j = 0; j < keys; ++j) {
      vec vv[CV];
      for (int64_t c = 0; c < CV; ++c) vv[c] = in_register(load_vec(v + j * hd + c0 + c * L));
      for (int64_t r = 0; r < MR; ++r) {
        const vec pj = splat(p[r * BK + j]);
        for (int64_t c = 0; c < CV; ++c) acc[r][c] = fma_lanes(pj, vv[c], acc[r][c]);
      }
    }
    for (int64_t r = 0; r < MR; ++r) {
      for (int64_t c = 0; c < CV; ++c) store_vec(o + r * hd + c0 + c * L, acc[r][c]);
    }
  }
}

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

inline vec lane_index() {
  vec i;
  for (int64_t l = 0; l < L; ++l) i[l] = static_cast<float>(l);
  return i;
}

// One row's online-softmax step over a key block: s [BK] scores, the first
// `valid` of them unmasked -> s holds e^(s - m_new) (0 past `valid`); m, l
// updated; returns the factor the row's output must be scaled by.
inline float softmax_step(float* s, int64_t valid, float& m, float& l) {
  const vec lanes = lane_index(), none = splat(kNoScore);
  const float fvalid = static_cast<float>(valid);
  vec x[CV];
  vec top = none;
  for (int64_t c = 0; c < CV; ++c) {
    x[c] = load_vec(s + c * L);
    if (valid < BK) x[c] = lanes + static_cast<float>(c * L) < fvalid ? x[c] : none;
    top = x[c] > top ? x[c] : top;
  }
  const float m_new = std::max(m, reduce_lanes(top, [](auto a, auto b) { return a > b ? a : b; }));
  const float scale = m == kNoScore ? 0.0f : std::exp(m - m_new);
  vec total = vec{};
  for (int64_t c = 0; c < CV; ++c) {
    vec e = exp_cephes(x[c] - m_new);
    if (valid < BK) e = lanes + static_cast<float>(c * L) < fvalid ? e : vec{};
    store_vec(s + c * L, e);
    total += e;
  }
  l = l * scale + reduce_lanes(total, [](auto a, auto b) { return a + b; });
  m = m_new;
  return scale;
}

template <typename T>
void attend(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, int64_t start, float qscale,
            torch::Tensor& out) {
  const int64_t H = q.size(0), n = q.size(1), hd = q.size(2), K = k.size(0), T_keys = k.size(1), G = H / K;
  const int64_t blocks = (T_keys + BK - 1) / BK;
  // keys transposed per block [K, blocks, hd, BK], values [K, blocks * BK, hd]; float, zero past the last key
  std::vector<float> kt(K * blocks * hd * BK, 0.0f), vp(K * blocks * BK * hd, 0.0f);
  const T* kp = k.data_ptr<T>();
  const T* vsrc = v.data_ptr<T>();
  const T* qp = q.data_ptr<T>();
  T* op = out.data_ptr<T>();
  parallel_chunks(K * blocks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t g = t / blocks, b = t % blocks;
      float* ktb = kt.data() + t * hd * BK;
      float* vb = vp.data() + (g * blocks + b) * BK * hd;
      for (int64_t j = 0; j < BK && b * BK + j < T_keys; ++j) {
        const T* kj = kp + g * k.stride(0) + (b * BK + j) * k.stride(1);
        const T* vj = vsrc + g * v.stride(0) + (b * BK + j) * v.stride(1);
        for (int64_t d = 0; d < hd; ++d) {
          ktb[d * BK + j] = static_cast<float>(kj[d]);
          vb[j * hd + d] = static_cast<float>(vj[d]);
        }
      }
    }
  });
  const int64_t tiles = (n + BQ - 1) / BQ, tasks = K * tiles;
  const int64_t M = (G * BQ + MR - 1) / MR * MR;  // rows of a task, padded to whole micro-tiles
  // the largest tiles first: their causal triangles are the longest
  parallel_pieces(tasks, tasks, [&](int64_t lo, int64_t hi) {
    std::vector<float> qt(M * hd), o(M * hd), m(M), l(M), s(MR * BK);
    std::vector<int64_t> limit(M);  // a row's last key
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t g = task % K, q0 = (tiles - 1 - task / K) * BQ, positions = std::min(BQ, n - q0);
      for (int64_t r = 0; r < M; ++r) {
        const int64_t p = std::min(r / G, positions - 1);
        limit[r] = start + q0 + p;
        m[r] = kNoScore;
        l[r] = 0.0f;
        const bool real = r < positions * G;
        const T* qr = qp + (g * G + r % G) * q.stride(0) + (q0 + p) * q.stride(1);
        for (int64_t d = 0; d < hd; ++d) qt[r * hd + d] = real ? static_cast<float>(qr[d]) * qscale : 0.0f;
      }
      std::fill(o.begin(), o.end(), 0.0f);
      const int64_t last_block = limit[M - 1] / BK;
      for (int64_t b = 0; b <= last_block; ++b) {
        const float* ktb = kt.data() + (g * blocks + b) * hd * BK;
        const float* vb = vp.data() + (g * blocks + b) * BK * hd;
        const int64_t keys = std::min(BK, T_keys - b * BK);
        for (int64_t r0 = 0; r0 < M; r0 += MR) {
          if (limit[r0 + MR - 1] < b * BK) continue;  // every row of the micro-tile ends before this block
          scores(qt.data() + r0 * hd, ktb, hd, s.data());
          for (int64_t r = 0; r < MR; ++r) {
            const int64_t valid = std::min(BK, limit[r0 + r] - b * BK + 1);
            if (valid <= 0) {
              std::fill(s.begin() + r * BK, s.begin() + (r + 1) * BK, 0.0f);
              continue;
            }
            const float scale = softmax_step(s.data() + r * BK, valid, m[r0 + r], l[r0 + r]);
            if (scale != 1.0f) {
              for (int64_t d = 0; d < hd; ++d) o[(r0 + r) * hd + d] *= scale;
            }
          }
          add_values(s.data(), vb, keys, hd, o.data() + r0 * hd);
        }
      }
      for (int64_t r = 0; r < positions * G; ++r) {
        T* orow = op + ((g * G + r % G) * n + q0 + r / G) * hd;
        const float inv = 1.0f / l[r];
        for (int64_t d = 0; d < hd; ++d) orow[d] = static_cast<T>(o[r * hd + d] * inv);
      }
    }
  });
}

}  // namespace

int64_t causal_attention_width() { return CV * L; }

// q [H, n, hd], k and v [K, start + n, hd] (any strides but the last), start,
// scale -> [H, n, hd]: query p attends keys [0, start + p].
torch::Tensor causal_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, int64_t start,
                               double scale) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "q, k, v must be on the CPU");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.sizes() == k.sizes(), "q must be [H, n, hd], k and v [K, keys, hd]");
  const int64_t H = q.size(0), n = q.size(1), hd = q.size(2), K = k.size(0);
  TORCH_CHECK(K > 0 && H % K == 0 && k.size(2) == hd, "q [H, n, hd] and k [K, keys, hd] disagree");
  TORCH_CHECK(start >= 0 && k.size(1) == start + n, "k and v must hold start + n keys");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1, "head_dim must be contiguous");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), "q, k, v must share a dtype");
  TORCH_CHECK(hd % (CV * L) == 0, "head_dim must be a multiple of ", CV * L);
  auto out = torch::empty({H, n, hd}, q.options());
  if (n == 0) return out;
  ReleaseGil release;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "causal_attention", [&] {
    attend<scalar_t>(q, k, v, start, static_cast<float>(scale), out);
  });
  return out;
}

}  // namespace arserve
