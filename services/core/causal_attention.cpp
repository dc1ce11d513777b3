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
//   CVV vectors of the head dimension (the value sum), its accumulators in
//   registers.
// - online softmax: each row keeps its running maximum m, denominator l and
//   unnormalized output O; a key block with a larger maximum rescales l and
//   O by e^(m_old - m_new) (Milakov & Gimelshein 2018). Here in log2 units
//   (scores times log2(e), 2^x for e^x), l kept in vector lanes and summed
//   across them once at the end, and m moved only where a score passes it by
//   kSlack (below): the softmax was a fifth of the kernel's time, now less
//   than a tenth.
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
constexpr int64_t MR = 4;   // rows per micro-tile: 16 accumulators + 4 key or value vectors of 32 registers
constexpr int64_t CV = 4;   // key vectors of a score micro-tile
constexpr int64_t CVV = 4;  // head-dimension vectors of a value micro-tile
#else
// 12 score accumulators + 3 key vectors + a query broadcast of 16 registers; values 8 + 2 + 1. Two rows
// against 4 vectors (8 accumulators, as many as an FMA's latency times its throughput) ran 8% slower.
constexpr int64_t MR = 4;
constexpr int64_t CV = 3;
constexpr int64_t CVV = 2;
#endif
constexpr int64_t BK = CV * L;  // keys per block: 64 with AVX-512, 24 with AVX2
constexpr int64_t BQ = 32;      // query positions per task
constexpr float kNoScore = -std::numeric_limits<float>::infinity();

// v, loaded once into a register: else GCC folds the load into each of the MR
// FMAs that use it, and the micro-tile waits on loads rather than on FMAs
inline vec in_register(vec v) {
  asm("" : "+v"(v));
  return v;
}

inline vec lane_index() {
  vec i;
  for (int64_t l = 0; l < L; ++l) i[l] = static_cast<float>(l);
  return i;
}

// 2^t for t <= kSlack (a shifted score in log2 units), t clamped at -126 (2^-126,
// the smallest normal float: a key that far under the row's maximum weighs
// nothing next to it): Cephes' exp2f (Moshier 1992; within about 1 ulp),
// t = n + f with n = round(t), f in [-0.5, 0.5], 2^f = 1 + f P(f) by FMAs, and
// 2^n through the exponent (VSCALEFPS with AVX-512). In log2 units the
// score's scale and the row's maximum fold into one FMA before it (as
// FlashAttention-2's kernels fold log2(e) into the softmax scale).
inline vec exp2_at_most_slack(vec t) {
  const auto k = [](float c) { return splat(c); };
  t = t < -126.0f ? k(-126.0f) : t;
  const vec n = (t + 12582912.0f) - 12582912.0f;  // round to nearest (1.5 * 2^23)
  const vec f = t - n;
  vec p = k(1.535336188319500e-4f);
  p = fma_lanes(p, f, k(1.339887440266574e-3f));
  p = fma_lanes(p, f, k(9.618437357674640e-3f));
  p = fma_lanes(p, f, k(5.550332471162809e-2f));
  p = fma_lanes(p, f, k(2.402264791363012e-1f));
  p = fma_lanes(p, f, k(6.931472028550421e-1f));
  p = fma_lanes(p, f, k(1.0f));
#if defined(__AVX512F__)
  return (vec)_mm512_scalef_ps((__m512)p, (__m512)n);
#else
  typedef int32_t vint __attribute__((vector_size(sizeof(vec))));
  const vint bits = (__builtin_convertvector(n, vint) + 127) << 23;
  vec scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
#endif
}

// Whether some lane of v is above t (v and t in log2 units).
inline bool any_above(vec v, float t) {
#if defined(__AVX512F__)
  return _mm512_cmp_ps_mask((__m512)v, _mm512_set1_ps(t), _CMP_GT_OQ) != 0;
#elif defined(__AVX__) && defined(__FMA__)
  return _mm256_movemask_ps(_mm256_cmp_ps((__m256)v, _mm256_set1_ps(t), _CMP_GT_OQ)) != 0;
#else
  for (int64_t l = 0; l < L; ++l) {
    if (v[l] > t) return true;
  }
  return false;
#endif
}

// How far a score may rise above its row's running maximum m before m moves
// (log2 units): the weights 2^(score - m) stay at most 2^8 (while |m| < 2^27,
// where m + kSlack is exact), far from float's range, and the result O / l
// is the same quotient whatever m is. Most key blocks then skip the row's
// maximum across lanes and the rescale of O and l (FlashAttention-4's
// conditional rescaling, Dao et al. 2025).
constexpr float kSlack = 8.0f;

// One row's online-softmax step over a key block, in log2 units: s [BK] raw
// scores (times `alpha` = the scores' scale times log2(e) to get log2 units),
// the first `valid` of them unmasked -> s holds 2^(alpha s - m) (0 past
// `valid`); the row's maximum m moved where a score passed it by kSlack, and
// its denominator's lanes l [L] rescaled and added to (summed across lanes
// once, at the end); returns the factor the row's output must be multiplied
// by (1 where the maximum stayed).
inline float softmax_step(float* s, float alpha, int64_t valid, float& m, float* l) {
  const vec lanes = lane_index(), none = splat(kNoScore);
  const float fvalid = static_cast<float>(valid);
  vec x[CV];
  vec top = none;
  for (int64_t c = 0; c < CV; ++c) {
    x[c] = load_vec(s + c * L);
    if (valid < BK) x[c] = lanes + static_cast<float>(c * L) < fvalid ? x[c] : none;
    top = x[c] > top ? x[c] : top;
  }
  float rescale = 1.0f;
  if (m == kNoScore || any_above(top * alpha, m + kSlack)) {
    const float m_new = std::max(m, alpha * reduce_lanes(top, [](auto a, auto b) { return a > b ? a : b; }));
    rescale = m == kNoScore ? 0.0f : std::exp2(m - m_new);
    m = m_new;
  }
  const vec by = splat(alpha), shift = splat(-m);
  vec total = load_vec(l) * rescale;
  for (int64_t c = 0; c < CV; ++c) {
    vec e = exp2_at_most_slack(fma_lanes(x[c], by, shift));
    if (valid < BK) e = lanes + static_cast<float>(c * L) < fvalid ? e : vec{};
    store_vec(s + c * L, e);
    total += e;
  }
  store_vec(l, total);
  return rescale;
}

// put(block t = g * blocks + b, key j of the block, dimension d, k[g, b * BK + j, d], v[...]) for every
// key of k and v [K, keys, hd], the key blocks split across threads (the layouts below pack with it)
template <typename T, typename Put>
void for_each_key(const torch::Tensor& k, const torch::Tensor& v, int64_t blocks, Put&& put) {
  const int64_t keys = k.size(1), hd = k.size(2);
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  parallel_chunks(k.size(0) * blocks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t g = t / blocks, b = t % blocks;
      for (int64_t j = 0; j < BK && b * BK + j < keys; ++j) {
        const T* kj = kp + g * k.stride(0) + (b * BK + j) * k.stride(1);
        const T* vj = vp + g * v.stride(0) + (b * BK + j) * v.stride(1);
        for (int64_t d = 0; d < hd; ++d) put(t, j, d, kj[d], vj[d]);
      }
    }
  });
}

// Keys and values widened to float32 (any dtype): keys [K, blocks, hd, BK],
// values [K, blocks * BK, hd]; queries widened and scaled as a task loads them.
template <typename T>
struct Widened {
  typedef float Q;  // a task's query rows
  int64_t hd, blocks;
  std::vector<float> kt, vp;

  Widened(const torch::Tensor& k, const torch::Tensor& v) : hd(k.size(2)), blocks((k.size(1) + BK - 1) / BK) {
    kt.assign(k.size(0) * blocks * hd * BK, 0.0f);
    vp.assign(k.size(0) * blocks * BK * hd, 0.0f);
    for_each_key<T>(k, v, blocks, [&](int64_t t, int64_t j, int64_t d, T kd, T vd) {
      kt[(t * hd + d) * BK + j] = static_cast<float>(kd);
      vp[(t * BK + j) * hd + d] = static_cast<float>(vd);
    });
  }

  static void load_q(const T* q, float qscale, int64_t hd, float* row) {  // q null: a padding row
    for (int64_t d = 0; d < hd; ++d) row[d] = q == nullptr ? 0.0f : static_cast<float>(q[d]) * qscale;
  }
  static float score_scale(float) { return 1.0f; }  // the queries are scaled

  // s [MR, BK] = q [MR, hd] . block b of head g's keys
  void scores(const float* q, int64_t g, int64_t b, float* s) const {
    const float* ktb = kt.data() + (g * blocks + b) * hd * BK;
    vec acc[MR][CV];
    for (int64_t r = 0; r < MR; ++r) {
      for (int64_t c = 0; c < CV; ++c) acc[r][c] = vec{};
    }
    for (int64_t d = 0; d < hd; ++d) {
      vec kv[CV];
      for (int64_t c = 0; c < CV; ++c) kv[c] = in_register(load_vec(ktb + d * BK + c * L));
      for (int64_t r = 0; r < MR; ++r) {
        const vec qd = splat(q[r * hd + d]);
        for (int64_t c = 0; c < CV; ++c) acc[r][c] = fma_lanes(qd, kv[c], acc[r][c]);
      }
    }
    for (int64_t r = 0; r < MR; ++r) {
      for (int64_t c = 0; c < CV; ++c) store_vec(s + r * BK + c * L, acc[r][c]);
    }
  }

  // o [MR, hd] += p [MR, BK] . block b of head g's values, its first `keys`
  void add_values(const float* p, int64_t g, int64_t b, int64_t keys, float* o) const {
    const float* vb = vp.data() + (g * blocks + b) * BK * hd;
    for (int64_t c0 = 0; c0 < hd; c0 += CVV * L) {
      vec acc[MR][CVV];
      for (int64_t r = 0; r < MR; ++r) {
        for (int64_t c = 0; c < CVV; ++c) acc[r][c] = load_vec(o + r * hd + c0 + c * L);
      }
      for (int64_t j = 0; j < keys; ++j) {
        vec vv[CVV];
        for (int64_t c = 0; c < CVV; ++c) vv[c] = in_register(load_vec(vb + j * hd + c0 + c * L));
        for (int64_t r = 0; r < MR; ++r) {
          const vec pj = splat(p[r * BK + j]);
          for (int64_t c = 0; c < CVV; ++c) acc[r][c] = fma_lanes(pj, vv[c], acc[r][c]);
        }
      }
      for (int64_t r = 0; r < MR; ++r) {
        for (int64_t c = 0; c < CVV; ++c) store_vec(o + r * hd + c0 + c * L, acc[r][c]);
      }
    }
  }
};

#if defined(__AVX512BF16__)
// bfloat16 multiplied in pairs (VDPBF16PS, as the row products do): a lane
// adds a[2l] b[2l] + a[2l+1] b[2l+1]. Scores pair two head dimensions: keys
// [K, blocks, hd / 2, BK, 2]; the value sum pairs two keys: values
// [K, blocks * BK / 2, hd, 2], and the probabilities are rounded to bfloat16
// for it, as PyTorch's flash attention rounds them for its bfloat16 product.
// Queries stay unscaled bfloat16; the scores are scaled in float32.
struct Pairs {
  typedef c10::BFloat16 T;
  typedef c10::BFloat16 Q;
  int64_t hd, blocks;
  std::vector<T> kt, vp;

  Pairs(const torch::Tensor& k, const torch::Tensor& v) : hd(k.size(2)), blocks((k.size(1) + BK - 1) / BK) {
    kt.assign(k.size(0) * blocks * hd * BK, T(0.0f));
    vp.assign(k.size(0) * blocks * BK * hd, T(0.0f));
    for_each_key<T>(k, v, blocks, [&](int64_t t, int64_t j, int64_t d, T kd, T vd) {
      kt[t * hd * BK + ((d / 2) * BK + j) * 2 + d % 2] = kd;
      vp[t * BK * hd + ((j / 2) * hd + d) * 2 + j % 2] = vd;
    });
  }

  static void load_q(const T* q, float, int64_t hd, T* row) {
    for (int64_t d = 0; d < hd; ++d) row[d] = q == nullptr ? T(0.0f) : q[d];
  }
  static float score_scale(float qscale) { return qscale; }

  void scores(const T* q, int64_t g, int64_t b, float* s) const {
    const T* ktb = kt.data() + (g * blocks + b) * hd * BK;
    vec acc[MR][CV];
    for (int64_t r = 0; r < MR; ++r) {
      for (int64_t c = 0; c < CV; ++c) acc[r][c] = vec{};
    }
    for (int64_t d = 0; d < hd; d += 2) {
      __m512bh kv[CV];
      for (int64_t c = 0; c < CV; ++c) {
        kv[c] = (__m512bh)in_register((vec)_mm512_loadu_si512(ktb + ((d / 2) * BK + c * L) * 2));
      }
      for (int64_t r = 0; r < MR; ++r) {
        int32_t pair;
        std::memcpy(&pair, q + r * hd + d, sizeof(pair));
        const __m512bh qd = (__m512bh)_mm512_set1_epi32(pair);
        for (int64_t c = 0; c < CV; ++c) acc[r][c] = (vec)_mm512_dpbf16_ps((__m512)acc[r][c], qd, kv[c]);
      }
    }
    for (int64_t r = 0; r < MR; ++r) {
      for (int64_t c = 0; c < CV; ++c) store_vec(s + r * BK + c * L, acc[r][c]);
    }
  }

  void add_values(const float* p, int64_t g, int64_t b, int64_t keys, float* o) const {
    const T* vb = vp.data() + (g * blocks + b) * BK * hd;
    alignas(64) uint16_t pb[MR][BK];  // the probabilities in bfloat16 (round to nearest even)
    for (int64_t r = 0; r < MR; ++r) {
      for (int64_t c = 0; c < BK / L; ++c) {
        const __m256bh h = _mm512_cvtneps_pbh((__m512)load_vec(p + r * BK + c * L));
        std::memcpy(&pb[r][c * L], &h, sizeof(h));
      }
    }
    for (int64_t c0 = 0; c0 < hd; c0 += CVV * L) {
      vec acc[MR][CVV];
      for (int64_t r = 0; r < MR; ++r) {
        for (int64_t c = 0; c < CVV; ++c) acc[r][c] = load_vec(o + r * hd + c0 + c * L);
      }
      for (int64_t j = 0; j < keys; j += 2) {
        __m512bh vv[CVV];
        for (int64_t c = 0; c < CVV; ++c) {
          vv[c] = (__m512bh)in_register((vec)_mm512_loadu_si512(vb + ((j / 2) * hd + c0 + c * L) * 2));
        }
        for (int64_t r = 0; r < MR; ++r) {
          int32_t pair;
          std::memcpy(&pair, &pb[r][j], sizeof(pair));
          const __m512bh pj = (__m512bh)_mm512_set1_epi32(pair);
          for (int64_t c = 0; c < CVV; ++c) acc[r][c] = (vec)_mm512_dpbf16_ps((__m512)acc[r][c], pj, vv[c]);
        }
      }
      for (int64_t r = 0; r < MR; ++r) {
        for (int64_t c = 0; c < CVV; ++c) store_vec(o + r * hd + c0 + c * L, acc[r][c]);
      }
    }
  }
};
#endif

template <typename T, typename Layout>
void attend(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, int64_t start, float qscale,
            torch::Tensor& out) {
  const int64_t H = q.size(0), n = q.size(1), hd = q.size(2), K = k.size(0), keys = k.size(1), G = H / K;
  const Layout packed(k, v);
  const T* qp = q.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const float alpha = Layout::score_scale(qscale) * 1.44269504088896341f;  // log2(e): softmax in log2 units
  const int64_t tiles = (n + BQ - 1) / BQ, tasks = K * tiles;
  const int64_t M = (G * BQ + MR - 1) / MR * MR;  // rows of a task, padded to whole micro-tiles
  // the largest tiles first: their causal triangles are the longest
  parallel_pieces(tasks, tasks, [&](int64_t lo, int64_t hi) {
    std::vector<typename Layout::Q> qt(M * hd);
    std::vector<float> o(M * hd), m(M), l(M * L), s(MR * BK);  // l: each row's denominator in L lanes
    std::vector<int64_t> limit(M);  // a row's last key
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t g = task % K, q0 = (tiles - 1 - task / K) * BQ, positions = std::min(BQ, n - q0);
      for (int64_t r = 0; r < M; ++r) {
        const int64_t p = std::min(r / G, positions - 1);
        limit[r] = start + q0 + p;
        m[r] = kNoScore;
        std::fill(l.begin() + r * L, l.begin() + (r + 1) * L, 0.0f);
        const T* qr = qp + (g * G + r % G) * q.stride(0) + (q0 + p) * q.stride(1);
        Layout::load_q(r < positions * G ? qr : nullptr, qscale, hd, qt.data() + r * hd);
      }
      std::fill(o.begin(), o.end(), 0.0f);
      const int64_t last_block = limit[M - 1] / BK;
      for (int64_t b = 0; b <= last_block; ++b) {
        const int64_t block_keys = std::min(BK, keys - b * BK);
        for (int64_t r0 = 0; r0 < M; r0 += MR) {
          if (limit[r0 + MR - 1] < b * BK) continue;  // every row of the micro-tile ends before this block
          packed.scores(qt.data() + r0 * hd, g, b, s.data());
          for (int64_t r = 0; r < MR; ++r) {
            const int64_t valid = std::min(BK, limit[r0 + r] - b * BK + 1);
            if (valid <= 0) {
              std::fill(s.begin() + r * BK, s.begin() + (r + 1) * BK, 0.0f);
              continue;
            }
            const float rescale = softmax_step(s.data() + r * BK, alpha, valid, m[r0 + r], l.data() + (r0 + r) * L);
            if (rescale != 1.0f) {
              for (int64_t d = 0; d < hd; ++d) o[(r0 + r) * hd + d] *= rescale;
            }
          }
          // the keys some row of the micro-tile attends (its last row's limit is the largest)
          const int64_t tile_keys = std::min(block_keys, limit[r0 + MR - 1] - b * BK + 1);
          packed.add_values(s.data(), g, b, tile_keys, o.data() + r0 * hd);
        }
      }
      for (int64_t r = 0; r < positions * G; ++r) {
        T* orow = op + ((q0 + r / G) * H + g * G + r % G) * hd;  // out is [n, H, hd] in memory
        const float inv = 1.0f / reduce_lanes(load_vec(l.data() + r * L), [](auto a, auto b) { return a + b; });
        for (int64_t d = 0; d < hd; ++d) orow[d] = static_cast<T>(o[r * hd + d] * inv);
      }
    }
  });
}

}  // namespace

int64_t causal_attention_width() { return CVV * L; }

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
  TORCH_CHECK(hd % (CVV * L) == 0, "head_dim must be a multiple of ", CVV * L);
  // [n, H, hd] in memory, returned as its [H, n, hd] view: the output projection reads it as [n, H * hd]
  auto out = torch::empty({n, H, hd}, q.options()).transpose(0, 1);
  if (n == 0) return out;
  ReleaseGil release;
#if defined(__AVX512BF16__)
  if (q.scalar_type() == at::kBFloat16) {
    attend<c10::BFloat16, Pairs>(q, k, v, start, static_cast<float>(scale), out);
    return out;
  }
#endif
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "causal_attention", [&] {
    attend<scalar_t, Widened<scalar_t>>(q, k, v, start, static_cast<float>(scale), out);
  });
  return out;
}

}  // namespace arserve
