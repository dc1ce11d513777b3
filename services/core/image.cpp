// The image model's steps in one call each (arserve.core.image_model, arserve.core.diffusion_head): the
// backbone's blocks over a KV cache (``image_forward``), and the diffusion head's denoising loop (``denoise``,
// ``eps_at``).
//
// The head.
// MAR's head (Li et al. 2024, ``SimpleMLPAdaLN``) is a residual MLP of width w
// (128 for the digits models) run once per denoising step, 50 steps a token.
// At one row a step is some 75 PyTorch ops of a few microseconds' arithmetic
// each, so PyTorch spends a token entering ops (9 ms at one row on this
// project's EPYC); here a whole token's steps are one call.
//
// Per step and model row (``DiffusionHead.forward``, the same arithmetic):
//   a   = silu(t_embed[s] + cond(z))                        [w]
//   mod = ada(a)                                            [(3 blocks + 2) w]
//   h   = input_proj(x)                                     [w]
//   per block: y = shift + (1 + scale) LayerNorm_b(h);  h += gate fc2(silu(fc1(y)))
//   eps = final(shift_f + (1 + scale_f) LayerNorm(h))       [d]
// With guidance the image's two model rows (its class, then "no class") share
// x, and eps = e_u + cfg (e_c - e_u). The step then moves x (``denoise``).
//
// The rows of a group are computed layer by layer, each product in tiles of
// kTile rows that share every weight load, so a step reads the head's weights
// (2 MB at w = 128, mostly the adaLN matrix) once per group from L2 or L3.
//
// A row's bits do not depend on which rows share the call: every product sums
// its bias, then k = 0, 1, ... in order, one FMA per term, whatever the tile or
// group; rows are split across threads in whole images. So a request's images
// are the same alone or joined with other requests' rows (the head service
// joins them).

#include <torch/extension.h>

#include "kernels.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <initializer_list>
#include <utility>
#include <vector>

namespace arserve {
namespace {

constexpr int kTile = 8;  // rows of one product tile (sharing each weight load)
// Output vectors of a tile of R rows: enough independent accumulators (R x NV) to hide the FMA's latency,
// few enough to stay in registers (32 with AVX-512, 16 with AVX2).
constexpr int vecs_for(int R) { return L == 16 ? (R == 1 ? 8 : R <= 4 ? 4 : 2) : (R == 1 ? 4 : R == 2 ? 2 : 1); }
constexpr int64_t kGroupRows = 32;  // model rows a thread carries through a step together
constexpr int64_t kMaxDim = 8;      // token_dim at most

// Weights of one head, float32 and contiguous (DiffusionHead._fused_weights).
struct Head {
  int64_t d, zd, w, blocks;
  const float* in_t;    // [d, w] input projection, transposed (in, out)
  const float* in_b;    // [w]
  const float* cond_t;  // [zd, w] z's projection, transposed
  const float* cond_b;  // [w]
  const float* ada_t;   // [w, (3 blocks + 2) w] adaLN modulation, transposed
  const float* ada_b;   // [(3 blocks + 2) w]
  const float* gamma;   // [blocks, w] each block's LayerNorm affine
  const float* beta;    // [blocks, w]
  const float* fc1_t;   // [blocks, w, w] each block's first linear, transposed
  const float* fc1_b;   // [blocks, w]
  const float* fc2_t;   // [blocks, w, w]
  const float* fc2_b;   // [blocks, w]
  const float* out_w;   // [d, w] final linear (out, in)
  const float* out_b;   // [d]
  int64_t mods() const { return (3 * blocks + 2) * w; }
};

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
constexpr auto kProducts = product_table(std::make_integer_sequence<int, kTile>{});

// y[r] = x[r] wt + b for R rows: x[r] [K], wt [K, ld] (the N outputs taken from its first columns, N a
// multiple of L), b [N], y[r] [N].
void product(int64_t R, const float* const* x, int64_t K, const float* wt, int64_t ld, const float* b, int64_t N,
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

// y = shift + scale1 * (gamma * LN(h) + beta) (gamma, beta null: no affine), LN(h) = (h - mean) / sqrt(var + 1e-6).
inline void modulated_norm(const float* h, const float* shift, const float* scale1, const float* gamma,
                           const float* beta, int64_t w, float* y) {
  vec s = splat(0.0f);
  for (int64_t i = 0; i < w; i += L) s += load_vec(h + i);
  const float mean = lane_sum(s) / static_cast<float>(w);
  vec q = splat(0.0f);
  for (int64_t i = 0; i < w; i += L) {
    const vec c = load_vec(h + i) - mean;
    q = fma_lanes(c, c, q);
  }
  const float rstd = 1.0f / std::sqrt(lane_sum(q) / static_cast<float>(w) + 1e-6f);
  for (int64_t i = 0; i < w; i += L) {
    vec n = (load_vec(h + i) - mean) * rstd;
    if (gamma != nullptr) n = fma_lanes(load_vec(gamma + i), n, load_vec(beta + i));
    store_vec(y + i, fma_lanes(load_vec(scale1 + i), n, load_vec(shift + i)));
  }
}

inline void silu_inplace(float* u, int64_t w) {
  for (int64_t i = 0; i < w; i += L) {
    const vec a = load_vec(u + i);
    store_vec(u + i, a / (1.0f + exp_cephes(-a)));
  }
}

// A group's working memory: the modulation of up to `mod_rows` (row, step) pairs (adaLN's input a [w] and
// its output [(3 blocks + 2) w] each), and h, y, u [w] of up to `rows` model rows.
struct Scratch {
  std::vector<float> buf;
  std::vector<float*> a, mod, h, y, u;
  void fit(int64_t rows, int64_t mod_rows, const Head& H) {
    const int64_t need = mod_rows * (H.w + H.mods()) + rows * 3 * H.w;
    if (static_cast<int64_t>(buf.size()) < need) buf.assign(need, 0.0f);
    a.resize(mod_rows), mod.resize(mod_rows), h.resize(rows), y.resize(rows), u.resize(rows);
    float* p = buf.data();
    for (int64_t r = 0; r < mod_rows; ++r, p += H.w + H.mods()) a[r] = p, mod[r] = p + H.w;
    for (int64_t r = 0; r < rows; ++r, p += 3 * H.w) h[r] = p, y[r] = p + H.w, u[r] = p + 2 * H.w;
  }
};

// The adaLN modulation of R (row, step) pairs, which depends on t and z only: mod[r] = ada(silu(t[r] + zc[r]))
// into S.mod[0..R). Rows of several steps share one product, so the adaLN matrix (most of the head's
// weights) is read once per tile of kTile pairs, not once per step.
void modulate(const Head& H, int64_t R, const float* const* t, const float* const* zc, Scratch& S) {
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t i = 0; i < H.w; i += L) store_vec(S.a[r] + i, load_vec(t[r] + i) + load_vec(zc[r] + i));
    silu_inplace(S.a[r], H.w);
  }
  product(R, S.a.data(), H.w, H.ada_t, H.mods(), H.ada_b, H.mods(), S.mod.data());
}

// eps_hat of R model rows, layer by layer: x[r] [d] noisy tokens, mod[r] [(3 blocks + 2) w] their
// modulation -> eps[r] [d].
void eps_rows(const Head& H, int64_t R, const float* const* x, const float* const* mod, Scratch& S,
              float* const* eps) {
  const int64_t w = H.w, d = H.d;
  product(R, x, d, H.in_t, w, H.in_b, w, S.h.data());
  for (int64_t b = 0; b <= H.blocks; ++b) {  // the blocks, then the final layer
    const bool last = b == H.blocks;
    for (int64_t r = 0; r < R; ++r) {  // scale1 = 1 + scale, into u
      const float* m = mod[r] + 3 * b * w;
      for (int64_t i = 0; i < w; i += L) store_vec(S.u[r] + i, load_vec(m + w + i) + 1.0f);
      modulated_norm(S.h[r], m, S.u[r], last ? nullptr : H.gamma + b * w, last ? nullptr : H.beta + b * w, w,
                     S.y[r]);
    }
    if (last) break;
    product(R, S.y.data(), w, H.fc1_t + b * w * w, w, H.fc1_b + b * w, w, S.u.data());
    for (int64_t r = 0; r < R; ++r) silu_inplace(S.u[r], w);
    product(R, S.u.data(), w, H.fc2_t + b * w * w, w, H.fc2_b + b * w, w, S.y.data());
    for (int64_t r = 0; r < R; ++r) {
      const float* gate = mod[r] + (3 * b + 2) * w;
      for (int64_t i = 0; i < w; i += L)
        store_vec(S.h[r] + i, fma_lanes(load_vec(gate + i), load_vec(S.y[r] + i), load_vec(S.h[r] + i)));
    }
  }
  for (int64_t r = 0; r < R; ++r)
    for (int64_t j = 0; j < d; ++j) {  // the final linear: d outputs, each a dot product over w
      const float* wj = H.out_w + j * w;
      vec s = splat(0.0f);
      for (int64_t i = 0; i < w; i += L) s = fma_lanes(load_vec(wj + i), load_vec(S.y[r] + i), s);
      eps[r][j] = H.out_b[j] + lane_sum(s);
    }
}

// cond(z) of m rows: z [m, zd] -> zc [m, w].
torch::Tensor conditions(const Head& H, const torch::Tensor& z) {
  const int64_t m = z.size(0);
  auto zc = torch::empty({m, H.w}, z.options());
  std::vector<const float*> x(m);
  std::vector<float*> y(m);
  for (int64_t r = 0; r < m; ++r) x[r] = z.data_ptr<float>() + r * H.zd, y[r] = zc.data_ptr<float>() + r * H.w;
  product(m, x.data(), H.zd, H.cond_t, H.w, H.cond_b, H.w, y.data());
  return zc;
}

// One image at one step: its noisy token x [d], its step's timestep embedding t [w], its image index i.
struct Item {
  const float* x;
  const float* t;
  int64_t i;
};

// Items of one call: each item's model rows are image i and, guided, i + n ("no class", the same x).
struct Items {
  const Head& H;
  int64_t n;
  bool guided;
  const float* zc;  // [m, w] cond(z) of the model rows
  const float* cfg;
  bool cfg_rows;
  int64_t per() const { return guided ? 2 : 1; }
  const float* z_of(const Item& it, int64_t g) const { return zc + (it.i + g * n) * H.w; }

  // The guided eps_hat of `count` items, given their rows' modulation mod[k * per + g] -> e[k] [d] =
  // e_u + cfg (e_c - e_u) (guided) or e_c.
  void eps(const Item* items, int64_t count, Scratch& S, float* const* mod, float (*e)[kMaxDim]) const {
    const int64_t R = count * per();
    std::vector<const float*> xs(R);
    std::vector<float> eb(R * kMaxDim);
    std::vector<float*> es(R);
    for (int64_t k = 0; k < count; ++k)
      for (int64_t g = 0; g < per(); ++g) {
        xs[k * per() + g] = items[k].x;
        es[k * per() + g] = eb.data() + (k * per() + g) * kMaxDim;
      }
    eps_rows(H, R, xs.data(), mod, S, es.data());
    for (int64_t k = 0; k < count; ++k) {
      const float* ec = es[k * per()];
      const float w = cfg[cfg_rows ? items[k].i : 0];
      for (int64_t j = 0; j < H.d; ++j) {
        const float eu = guided ? es[k * per() + 1][j] : 0.0f;
        e[k][j] = guided ? eu + w * (ec[j] - eu) : ec[j];
      }
    }
  }

  // The modulation of `count` items' model rows into S.mod, item k's row g at k * per + g.
  void modulate_items(const Item* items, int64_t count, Scratch& S) const {
    const int64_t R = count * per();
    std::vector<const float*> ts(R), zs(R);
    for (int64_t k = 0; k < count; ++k)
      for (int64_t g = 0; g < per(); ++g) ts[k * per() + g] = items[k].t, zs[k * per() + g] = z_of(items[k], g);
    modulate(H, R, ts.data(), zs.data(), S);
  }
};

Head head_of(const std::vector<torch::Tensor>& wts, int64_t d, int64_t zd) {
  TORCH_CHECK(wts.size() == 14, "weights: in_t, in_b, cond_t, cond_b, ada_t, ada_b, gamma, beta, fc1_t, fc1_b, "
              "fc2_t, fc2_b, out_w, out_b");
  for (const auto& t : wts)
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32 && t.is_contiguous(),
                "head weights must be contiguous float32 CPU tensors");
  const int64_t w = wts[1].numel(), blocks = wts[7].numel() / std::max<int64_t>(w, 1);
  TORCH_CHECK(w % L == 0, "head width must be a multiple of ", L);
  TORCH_CHECK(d <= kMaxDim && wts[0].numel() == d * w && wts[2].numel() == zd * w && wts[3].numel() == w &&
                  wts[4].numel() == w * (3 * blocks + 2) * w && wts[5].numel() == (3 * blocks + 2) * w &&
                  wts[6].numel() == blocks * w && wts[8].numel() == blocks * w * w && wts[9].numel() == blocks * w &&
                  wts[10].numel() == blocks * w * w && wts[11].numel() == blocks * w && wts[12].numel() == d * w &&
                  wts[13].numel() == d,
              "head weights' shapes disagree (token_dim at most ", kMaxDim, ")");
  const auto p = [&](int i) { return wts[i].data_ptr<float>(); };
  return Head{d, zd, w, blocks, p(0), p(1), p(2), p(3), p(4), p(5), p(6), p(7), p(8), p(9), p(10), p(11), p(12),
              p(13)};
}

void check_f32(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32 && t.is_contiguous(), name,
              " must be a contiguous float32 CPU tensor");
}

// Images per group: at most kGroupRows model rows, and at least two groups where two threads can share them.
int64_t images_per_group(int64_t n, bool guided) {
  const int64_t most = kGroupRows / (guided ? 2 : 1), threads = omp_get_max_threads();
  return std::max<int64_t>(1, std::min(most, (n + threads - 1) / threads));
}

// The S denoising steps of n images, in place on x [n, d]:
//   x0 = clip(a_s x - b_s eps, -1, 1);  x = c0_s x0 + c1_s x + scale[s][i] noise[s][i]
// noise [S, n, d]: each step's draw; scale [S, n or 1]: temperature * sigma; t_embed [S, w]; z [m, zd]
// (m = n, or 2n guided: the conditional rows, then the unconditional); coef [S, 4]: (a, b, c0, c1);
// cfg [n or 1]; states [S, n, d] (x after each step) or empty.
void denoise(torch::Tensor x, const torch::Tensor& noise, const torch::Tensor& scale, const torch::Tensor& t_embed,
             const torch::Tensor& z, const std::vector<torch::Tensor>& weights, const torch::Tensor& coef,
             const torch::Tensor& cfg, torch::Tensor states) {
  for (const torch::Tensor* t : std::initializer_list<const torch::Tensor*>{&x, &noise, &scale, &t_embed, &z, &coef,
                                                                          &cfg})
    check_f32(*t, "denoise's tensors");
  const int64_t n = x.size(0), d = x.size(1), steps = noise.size(0), m = z.size(0);
  const Head H = head_of(weights, d, z.size(1));
  TORCH_CHECK(noise.size(1) == n && noise.size(2) == d && (m == n || m == 2 * n) && t_embed.size(0) == steps &&
                  t_embed.size(1) == H.w && coef.size(0) == steps && coef.size(1) == 4 && scale.size(0) == steps &&
                  (scale.size(1) == n || scale.size(1) == 1) && (cfg.numel() == n || cfg.numel() == 1),
              "denoise: shapes disagree");
  const bool keep = states.numel() > 0;
  if (keep) {
    check_f32(states, "states");
    TORCH_CHECK(states.size(0) == steps && states.size(1) == n && states.size(2) == d, "states must be [S, n, d]");
  }
  const bool guided = m == 2 * n;
  const int64_t sw = scale.size(1), per = guided ? 2 : 1;
  float* xp = x.data_ptr<float>();
  const float *np = noise.data_ptr<float>(), *sp = scale.data_ptr<float>(), *tp = t_embed.data_ptr<float>(),
              *cp = coef.data_ptr<float>();
  float* st = keep ? states.data_ptr<float>() : nullptr;
  ReleaseGil release;
  const torch::Tensor zc = conditions(H, z);
  const Items items{H, n, guided, zc.data_ptr<float>(), cfg.data_ptr<float>(), cfg.numel() == n};
  const int64_t per_group = images_per_group(n, guided), groups = (n + per_group - 1) / per_group;
  // steps whose modulation is made together: about 64 (row, step) pairs a product
  const int64_t chunk = std::max<int64_t>(1, std::min(steps, 64 / (per_group * per)));
  parallel_chunks(groups, 1, [&](int64_t lo, int64_t hi) {
    Scratch S;
    S.fit(per_group * per, chunk * per_group * per, H);
    std::vector<Item> its(chunk * per_group);
    std::vector<float*> mods(per_group * per);
    float e[kGroupRows][kMaxDim];
    for (int64_t g = lo; g < hi; ++g) {
      const int64_t i0 = g * per_group, i1 = std::min(n, i0 + per_group), count = i1 - i0;
      for (int64_t c0 = 0; c0 < steps; c0 += chunk) {
        const int64_t c1 = std::min(steps, c0 + chunk);
        for (int64_t s = c0; s < c1; ++s)
          for (int64_t i = i0; i < i1; ++i) its[(s - c0) * count + i - i0] = Item{xp + i * d, tp + s * H.w, i};
        items.modulate_items(its.data(), (c1 - c0) * count, S);
        for (int64_t s = c0; s < c1; ++s) {
          for (int64_t r = 0; r < count * per; ++r) mods[r] = S.mod[(s - c0) * count * per + r];
          items.eps(its.data() + (s - c0) * count, count, S, mods.data(), e);
          const float a = cp[4 * s], b = cp[4 * s + 1], c0_ = cp[4 * s + 2], c1_ = cp[4 * s + 3];
          for (int64_t i = i0; i < i1; ++i) {
            float* xi = xp + i * d;
            const float* noise_i = np + (s * n + i) * d;
            const float sc = sp[s * sw + (sw == n ? i : 0)];
            for (int64_t j = 0; j < d; ++j) {
              const float x0 = std::min(1.0f, std::max(-1.0f, xi[j] * a - e[i - i0][j] * b));
              xi[j] = (x0 * c0_ + xi[j] * c1_) + sc * noise_i[j];
            }
            if (keep) std::memcpy(st + (s * n + i) * d, xi, d * sizeof(float));
          }
        }
      }
    }
  });
}

// eps_hat along given trajectories: states [S, n, d] (each step's x), t_embed [S, w], z [m, zd], cfg [n or 1]
// -> [S, n, d] (guided: e_u + cfg (e_c - e_u)). What a trajectory's density under this head needs. Every
// (step, image) is independent: they are taken kGroupRows model rows at a time.
torch::Tensor eps_at(const torch::Tensor& states, const torch::Tensor& t_embed, const torch::Tensor& z,
                     const std::vector<torch::Tensor>& weights, const torch::Tensor& cfg) {
  for (const torch::Tensor* t : std::initializer_list<const torch::Tensor*>{&states, &t_embed, &z, &cfg})
    check_f32(*t, "eps_at's tensors");
  const int64_t steps = states.size(0), n = states.size(1), d = states.size(2), m = z.size(0);
  const Head H = head_of(weights, d, z.size(1));
  TORCH_CHECK((m == n || m == 2 * n) && t_embed.size(0) == steps && t_embed.size(1) == H.w &&
                  (cfg.numel() == n || cfg.numel() == 1),
              "eps_at: shapes disagree");
  auto out = torch::empty({steps, n, d}, states.options());
  const bool guided = m == 2 * n;
  const int64_t per = guided ? 2 : 1, group = kGroupRows / per, total = steps * n;
  const float *xp = states.data_ptr<float>(), *tp = t_embed.data_ptr<float>();
  float* op = out.data_ptr<float>();
  ReleaseGil release;
  const torch::Tensor zc = conditions(H, z);
  const Items items{H, n, guided, zc.data_ptr<float>(), cfg.data_ptr<float>(), cfg.numel() == n};
  parallel_chunks((total + group - 1) / group, 1, [&](int64_t lo, int64_t hi) {
    Scratch S;
    S.fit(group * per, group * per, H);
    std::vector<Item> its(group);
    float e[kGroupRows][kMaxDim];
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t k0 = task * group, count = std::min(group, total - k0);
      for (int64_t k = 0; k < count; ++k) {  // item k0 + k: step (k0 + k) / n, image (k0 + k) % n
        const int64_t s = (k0 + k) / n, i = (k0 + k) % n;
        its[k] = Item{xp + (s * n + i) * d, tp + s * H.w, i};
      }
      items.modulate_items(its.data(), count, S);
      items.eps(its.data(), count, S, S.mod.data(), e);
      for (int64_t k = 0; k < count; ++k) std::memcpy(op + (k0 + k) * d, e[k], d * sizeof(float));
    }
  });
  return out;
}

// ---------------------------------------------------------------------------
// The backbone (``ImageAR.forward`` over its KV cache, image_model.py): pre-norm transformer blocks,
//   a = LN1(h);  q, k, v = qkv(a);  h += proj(attention(q, cache));  h += fc2(gelu(fc1(LN2(h))))
// then z = LN(h). Each row (image) alone: its m new positions go after its committed length, their keys and
// values are written into the cache first, and position j attends the keys [0, length + j] (causal).

struct Backbone {
  int64_t dim, layers, heads, hidden;
  const float *ln1_w, *ln1_b;  // [layers, dim]
  const float *qkv_t, *qkv_b;  // [layers, dim, 3 dim] transposed (in, out), [layers, 3 dim]
  const float *proj_t, *proj_b;  // [layers, dim, dim], [layers, dim]
  const float *ln2_w, *ln2_b;  // [layers, dim]
  const float *fc1_t, *fc1_b;  // [layers, dim, hidden], [layers, hidden]
  const float *fc2_t, *fc2_b;  // [layers, hidden, dim], [layers, dim]
  const float *norm_w, *norm_b;  // [dim]
};

// y = (h - mean) / sqrt(var + eps) * w + b over one position [dim] (nn.LayerNorm, eps 1e-5).
inline void layer_norm(const float* h, const float* w, const float* b, int64_t dim, float* y) {
  vec s = splat(0.0f);
  for (int64_t i = 0; i < dim; i += L) s += load_vec(h + i);
  const float mean = lane_sum(s) / static_cast<float>(dim);
  vec q = splat(0.0f);
  for (int64_t i = 0; i < dim; i += L) {
    const vec c = load_vec(h + i) - mean;
    q = fma_lanes(c, c, q);
  }
  const float rstd = 1.0f / std::sqrt(lane_sum(q) / static_cast<float>(dim) + 1e-5f);
  for (int64_t i = 0; i < dim; i += L)
    store_vec(y + i, fma_lanes((load_vec(h + i) - mean) * rstd, load_vec(w + i), load_vec(b + i)));
}

Backbone backbone_of(const std::vector<torch::Tensor>& wts, int64_t dim, int64_t heads) {
  TORCH_CHECK(wts.size() == 14, "backbone weights: ln1_w, ln1_b, qkv_t, qkv_b, proj_t, proj_b, ln2_w, ln2_b, "
              "fc1_t, fc1_b, fc2_t, fc2_b, norm_w, norm_b");
  for (const auto& t : wts)
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32 && t.is_contiguous(),
                "backbone weights must be contiguous float32 CPU tensors");
  const int64_t layers = wts[0].size(0), hidden = wts[9].size(1);
  TORCH_CHECK(dim % L == 0 && hidden % L == 0 && dim % heads == 0, "backbone width and MLP width must be multiples of ", L);
  TORCH_CHECK(wts[0].numel() == layers * dim && wts[2].numel() == layers * dim * 3 * dim &&
                  wts[3].numel() == layers * 3 * dim && wts[4].numel() == layers * dim * dim &&
                  wts[5].numel() == layers * dim && wts[8].numel() == layers * dim * hidden &&
                  wts[10].numel() == layers * hidden * dim && wts[11].numel() == layers * dim &&
                  wts[12].numel() == dim && wts[13].numel() == dim,
              "backbone weights' shapes disagree");
  const auto p = [&](int i) { return wts[i].data_ptr<float>(); };
  return Backbone{dim, layers, heads, hidden, p(0), p(1), p(2), p(3), p(4), p(5), p(6), p(7), p(8), p(9), p(10),
                  p(11), p(12), p(13)};
}

// x [rows, m, dim] input embeddings (positions added), k_cache and v_cache [layers, rows, capacity, heads,
// head_dim] (each (layer, row) block contiguous; written at lengths[r] + j), lengths [rows] int64 -> z [rows, m,
// dim].
torch::Tensor image_forward(const torch::Tensor& x, torch::Tensor k_cache, torch::Tensor v_cache,
                            const torch::Tensor& lengths, const std::vector<torch::Tensor>& weights, int64_t heads) {
  check_f32(x, "x");
  TORCH_CHECK(x.dim() == 3, "x must be [rows, m, dim]");
  const int64_t rows = x.size(0), m = x.size(1), dim = x.size(2);
  const Backbone B = backbone_of(weights, dim, heads);
  const int64_t hd = dim / heads, capacity = k_cache.size(2);
  for (const torch::Tensor* c : {&k_cache, &v_cache})
    TORCH_CHECK(c->device().is_cpu() && c->scalar_type() == torch::kFloat32 && c->dim() == 5 &&
                    c->size(0) == B.layers && c->size(1) == rows && c->size(3) == heads && c->size(4) == hd &&
                    c->stride(4) == 1 && c->stride(3) == hd && c->stride(2) == dim,
                "the KV cache must be float32 [layers, rows, capacity, heads, head_dim], each row's positions "
                "contiguous");
  TORCH_CHECK(lengths.scalar_type() == torch::kInt64 && lengths.numel() == rows && lengths.is_contiguous(),
              "lengths must be [rows] int64");
  const int64_t* len = lengths.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r)
    TORCH_CHECK(len[r] >= 0 && len[r] + m <= capacity, "row ", r, ": ", m, " positions after ", len[r],
                " pass the cache's ", capacity);
  auto z = torch::empty({rows, m, dim}, x.options());
  if (rows == 0 || m == 0) return z;
  const float* xp = x.data_ptr<float>();
  float *kp = k_cache.data_ptr<float>(), *vp = v_cache.data_ptr<float>(), *zp = z.data_ptr<float>();
  const int64_t ks0 = k_cache.stride(0), ks1 = k_cache.stride(1), vs0 = v_cache.stride(0), vs1 = v_cache.stride(1);
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  ReleaseGil release;
  // A thread carries a group of rows through the blocks together, so that each product's tiles share
  // weight loads across rows (one row alone reads every weight once per position: 3 MB at dim 128).
  const int64_t threads = std::min<int64_t>(omp_get_max_threads(), rows);
  const int64_t group = std::max<int64_t>(1, std::min<int64_t>(kGroupRows, (rows + threads - 1) / threads));
  parallel_chunks((rows + group - 1) / group, 1, [&](int64_t lo, int64_t hi) {
    const int64_t P = group * m;  // positions of a group
    // per position: h [dim], a [dim], qkv [3 dim], o [dim], u [hidden]; scores [capacity]
    std::vector<float> buf(P * (6 * dim + B.hidden)), scores(capacity);
    std::vector<float*> h(P), a(P), qkv(P), o(P), u(P);
    for (int64_t j = 0; j < P; ++j) {
      float* p = buf.data() + j * (6 * dim + B.hidden);
      h[j] = p, a[j] = p + dim, qkv[j] = p + 2 * dim, o[j] = p + 5 * dim, u[j] = p + 6 * dim;
    }
    for (int64_t g = lo; g < hi; ++g) {
      const int64_t r0 = g * group, r1 = std::min(rows, r0 + group), n = (r1 - r0) * m;  // position i: row r0 + i / m
      for (int64_t i = 0; i < n; ++i) std::memcpy(h[i], xp + (r0 * m + i) * dim, dim * sizeof(float));
      for (int64_t l = 0; l < B.layers; ++l) {
        for (int64_t i = 0; i < n; ++i) layer_norm(h[i], B.ln1_w + l * dim, B.ln1_b + l * dim, dim, a[i]);
        product(n, a.data(), dim, B.qkv_t + l * dim * 3 * dim, 3 * dim, B.qkv_b + l * 3 * dim, 3 * dim, qkv.data());
        for (int64_t i = 0; i < n; ++i) {  // this call's keys and values first: the row's later positions attend them
          const int64_t r = r0 + i / m, pos = len[r] + i % m;
          std::memcpy(kp + l * ks0 + r * ks1 + pos * dim, qkv[i] + dim, dim * sizeof(float));
          std::memcpy(vp + l * vs0 + r * vs1 + pos * dim, qkv[i] + 2 * dim, dim * sizeof(float));
        }
        for (int64_t i = 0; i < n; ++i) {
          const int64_t r = r0 + i / m, keys = len[r] + i % m + 1;
          const float* kr = kp + l * ks0 + r * ks1;  // [capacity, dim] the row's keys at this layer
          const float* vr = vp + l * vs0 + r * vs1;
          for (int64_t hh = 0; hh < heads; ++hh) {
            const float* q = qkv[i] + hh * hd;
            float top = -INFINITY;
            for (int64_t t = 0; t < keys; ++t) {
              const float* kt = kr + t * dim + hh * hd;
              float s = 0.0f;
              for (int64_t e = 0; e < hd; ++e) s += q[e] * kt[e];
              scores[t] = s * scale;
              top = std::max(top, scores[t]);
            }
            float total = 0.0f;
            for (int64_t t = 0; t < keys; ++t) total += (scores[t] = std::exp(scores[t] - top));
            float* out = o[i] + hh * hd;
            std::fill(out, out + hd, 0.0f);
            for (int64_t t = 0; t < keys; ++t) {
              const float* vt = vr + t * dim + hh * hd;
              const float w = scores[t] / total;
              for (int64_t e = 0; e < hd; ++e) out[e] += w * vt[e];
            }
          }
        }
        product(n, o.data(), dim, B.proj_t + l * dim * dim, dim, B.proj_b + l * dim, dim, a.data());
        for (int64_t i = 0; i < n; ++i)
          for (int64_t e = 0; e < dim; e += L) store_vec(h[i] + e, load_vec(h[i] + e) + load_vec(a[i] + e));
        for (int64_t i = 0; i < n; ++i) layer_norm(h[i], B.ln2_w + l * dim, B.ln2_b + l * dim, dim, a[i]);
        product(n, a.data(), dim, B.fc1_t + l * dim * B.hidden, B.hidden, B.fc1_b + l * B.hidden, B.hidden,
                u.data());
        for (int64_t i = 0; i < n; ++i)
          for (int64_t e = 0; e < B.hidden; ++e)  // exact GELU (nn.GELU): x Phi(x)
            u[i][e] = 0.5f * u[i][e] * (1.0f + std::erf(u[i][e] * 0.70710678118654752f));
        product(n, u.data(), B.hidden, B.fc2_t + l * B.hidden * dim, dim, B.fc2_b + l * dim, dim, a.data());
        for (int64_t i = 0; i < n; ++i)
          for (int64_t e = 0; e < dim; e += L) store_vec(h[i] + e, load_vec(h[i] + e) + load_vec(a[i] + e));
      }
      for (int64_t i = 0; i < n; ++i) layer_norm(h[i], B.norm_w, B.norm_b, dim, zp + (r0 * m + i) * dim);
    }
  });
  return z;
}

}  // namespace

void bind_image(pybind11::module& m) {
  m.def("denoise", &denoise,
        "x [n, d] (in place), noise [S, n, d], scale [S, n or 1], t_embed [S, w], z [m, zd], weights, coef [S, 4], "
        "cfg [n or 1], states [S, n, d] or empty: S denoising steps of the diffusion head");
  m.def("eps_at", &eps_at, "states [S, n, d], t_embed [S, w], z [m, zd], weights, cfg [n or 1] -> eps [S, n, d]");
  m.def("image_forward", &image_forward,
        "x [rows, m, dim], k_cache, v_cache [layers, rows, capacity, heads, head_dim], lengths [rows], weights, heads "
        "-> z [rows, m, dim]: the image backbone's blocks, each row's m positions after its committed length");
  m.def("image_width", []() { return L; }, "the image model's widths must be multiples of it");
}

}  // namespace arserve
