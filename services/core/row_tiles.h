// Row-tiled float32 products and the small helpers the image model's kernels share
// (diffusion_head.cpp, image_blocks.cpp).
//
// A product y[r] = x[r] wt + b runs R rows at a time (a tile, kTile at most) sharing every weight load, with
// as many output vectors as keep the FMA's latency hidden. Every output adds its bias, then k = 0, 1, ... in
// order, one FMA per term, whatever the tile: a row's bits do not depend on the rows beside it.
#pragma once

#include "kernels.h"

#include <array>
#include <cmath>
#include <utility>

namespace arserve::tiles {

constexpr int kTile = 8;  // rows of one product tile (sharing each weight load)
// Output vectors of a tile of R rows: enough independent accumulators (R x NV) to hide the FMA's latency,
// few enough to stay in registers (32 with AVX-512, 16 with AVX2).
constexpr int vecs_for(int R) { return L == 16 ? (R == 1 ? 8 : R <= 4 ? 4 : 2) : (R == 1 ? 4 : R == 2 ? 2 : 1); }

// y[r][o..] = b[o..] + sum_k x[r][k] wt[k][o..] for R rows and NV vectors of outputs.
template <int R, int NV>
inline void product_tile(const float* const* x, int64_t K, const float* wt, int64_t ld, const float* b,
                         float* const* y, int64_t o) {
  vec acc[R][NV];
  for (int j = 0; j < NV; ++j) {
    const vec bj = load_vec(b + o + j * L);
    for (int r = 0; r < R; ++r) acc[r][j] = bj;
  }
  for (int64_t k = 0; k < K; ++k) {
    const float* wk = wt + k * ld + o;
    vec wv[NV];
    for (int j = 0; j < NV; ++j) wv[j] = load_vec(wk + j * L);
    for (int r = 0; r < R; ++r) {
      const vec xk = splat(x[r][k]);
      for (int j = 0; j < NV; ++j) acc[r][j] = fma_lanes(xk, wv[j], acc[r][j]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NV; ++j) store_vec(y[r] + o + j * L, acc[r][j]);
}

template <int R>
void product_rows(const float* const* x, int64_t K, const float* wt, int64_t ld, const float* b, int64_t N,
                  float* const* y) {
  int64_t o = 0;
  constexpr int NV = vecs_for(R);
  for (; o + NV * L <= N; o += NV * L) product_tile<R, NV>(x, K, wt, ld, b, y, o);
  for (; o < N; o += L) product_tile<R, 1>(x, K, wt, ld, b, y, o);
}

using ProductFn = void (*)(const float* const*, int64_t, const float*, int64_t, const float*, int64_t,
                           float* const*);
template <int... R>
constexpr auto product_table(std::integer_sequence<int, R...>) {
  return std::array<ProductFn, sizeof...(R)>{product_rows<R + 1>...};
}
inline constexpr auto kProducts = product_table(std::make_integer_sequence<int, kTile>{});

// y[r] = x[r] wt + b for R rows: x[r] [K], wt [K, ld] (the N outputs taken from its first columns, N a
// multiple of L), b [N], y[r] [N].
inline void product(int64_t R, const float* const* x, int64_t K, const float* wt, int64_t ld, const float* b, int64_t N,
             float* const* y) {
  for (int64_t r = 0; r < R; r += kTile) {
    const int64_t t = std::min<int64_t>(kTile, R - r);
    kProducts[t - 1](x + r, K, wt, ld, b, N, y + r);
  }
}

inline float lane_sum(vec v) {
  float s = 0.0f;
  for (int64_t l = 0; l < L; ++l) s += v[l];
  return s;
}

// LayerNorm's statistics of h [n]: its mean and 1 / sqrt(var + eps), each sum in lanes, then across them.
inline std::pair<float, float> norm_stats(const float* h, int64_t n, float eps) {
  vec s = splat(0.0f);
  for (int64_t i = 0; i < n; i += L) s += load_vec(h + i);
  const float mean = lane_sum(s) / static_cast<float>(n);
  vec q = splat(0.0f);
  for (int64_t i = 0; i < n; i += L) {
    const vec c = load_vec(h + i) - mean;
    q = fma_lanes(c, c, q);
  }
  return {mean, 1.0f / std::sqrt(lane_sum(q) / static_cast<float>(n) + eps)};
}

inline void silu_inplace(float* u, int64_t w) {
  for (int64_t i = 0; i < w; i += L) {
    const vec a = load_vec(u + i);
    store_vec(u + i, a / (1.0f + exp_cephes(-a)));
  }
}

inline void check_f32(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32 && t.is_contiguous(), name,
              " must be a contiguous float32 CPU tensor");
}

}  // namespace arserve::tiles
