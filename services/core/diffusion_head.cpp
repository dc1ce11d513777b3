// The diffusion head's denoising loop in one call (arserve.core.diffusion_head): ``denoise`` (every step of
// every image) and ``eps_at`` (eps_hat along given trajectories, for their densities).
//
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

#include "row_tiles.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <initializer_list>
#include <vector>

namespace arserve {
namespace {

using namespace tiles;

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

// y = shift + scale1 * (gamma * LN(h) + beta) (gamma, beta null: no affine), LN(h) = (h - mean) / sqrt(var + 1e-6).
inline void modulated_norm(const float* h, const float* shift, const float* scale1, const float* gamma,
                           const float* beta, int64_t w, float* y) {
  const auto [mean, rstd] = norm_stats(h, w, 1e-6f);
  for (int64_t i = 0; i < w; i += L) {
    vec n = (load_vec(h + i) - mean) * rstd;
    if (gamma != nullptr) n = fma_lanes(load_vec(gamma + i), n, load_vec(beta + i));
    store_vec(y + i, fma_lanes(load_vec(scale1 + i), n, load_vec(shift + i)));
  }
}

// A group's working memory: the modulation of up to `mod_rows` (row, step) pairs (adaLN's input a [w] and
// its output [(3 blocks + 2) w] each, and the pairs' t and cond(z) rows), and of up to `rows` model rows their
// h, y, u [w], their x rows and their eps [kMaxDim]. Sized once per thread: the step loop allocates nothing.
struct Scratch {
  std::vector<float> buf, eps_buf;
  std::vector<float*> a, mod, h, y, u, eps;
  std::vector<const float*> t, zc, x;
  void fit(int64_t rows, int64_t mod_rows, const Head& H) {
    buf.assign(mod_rows * (H.w + H.mods()) + rows * 3 * H.w, 0.0f);
    eps_buf.assign(rows * kMaxDim, 0.0f);
    for (auto* v : {&a, &mod}) v->resize(mod_rows);
    for (auto* v : {&h, &y, &u, &eps}) v->resize(rows);
    t.resize(mod_rows), zc.resize(mod_rows), x.resize(rows);
    float* p = buf.data();
    for (int64_t r = 0; r < mod_rows; ++r, p += H.w + H.mods()) a[r] = p, mod[r] = p + H.w;
    for (int64_t r = 0; r < rows; ++r, p += 3 * H.w) h[r] = p, y[r] = p + H.w, u[r] = p + 2 * H.w;
    for (int64_t r = 0; r < rows; ++r) eps[r] = eps_buf.data() + r * kMaxDim;
  }
};

// The adaLN modulation of R (row, step) pairs, which depends on t and z only: mod[r] = ada(silu(t[r] + zc[r]))
// into S.mod[0..R). Rows of several steps share one product, so the adaLN matrix (most of the head's
// weights) is read once per tile of kTile pairs, not once per step.
// The pairs' rows are S.t[r] and S.zc[r].
void modulate(const Head& H, int64_t R, Scratch& S) {
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t i = 0; i < H.w; i += L) store_vec(S.a[r] + i, load_vec(S.t[r] + i) + load_vec(S.zc[r] + i));
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
    for (int64_t k = 0; k < count; ++k)
      for (int64_t g = 0; g < per(); ++g) S.x[k * per() + g] = items[k].x;
    eps_rows(H, count * per(), S.x.data(), mod, S, S.eps.data());
    for (int64_t k = 0; k < count; ++k) {
      const float* ec = S.eps[k * per()];
      const float w = cfg[cfg_rows ? items[k].i : 0];
      for (int64_t j = 0; j < H.d; ++j) {
        const float eu = guided ? S.eps[k * per() + 1][j] : 0.0f;
        e[k][j] = guided ? eu + w * (ec[j] - eu) : ec[j];
      }
    }
  }

  // The modulation of `count` items' model rows into S.mod, item k's row g at k * per + g.
  void modulate_items(const Item* items, int64_t count, Scratch& S) const {
    for (int64_t k = 0; k < count; ++k)
      for (int64_t g = 0; g < per(); ++g) S.t[k * per() + g] = items[k].t, S.zc[k * per() + g] = z_of(items[k], g);
    modulate(H, count * per(), S);
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
    float e[kGroupRows][kMaxDim];
    for (int64_t g = lo; g < hi; ++g) {
      const int64_t i0 = g * per_group, i1 = std::min(n, i0 + per_group), count = i1 - i0;
      for (int64_t c0 = 0; c0 < steps; c0 += chunk) {
        const int64_t c1 = std::min(steps, c0 + chunk);
        for (int64_t s = c0; s < c1; ++s)
          for (int64_t i = i0; i < i1; ++i) its[(s - c0) * count + i - i0] = Item{xp + i * d, tp + s * H.w, i};
        items.modulate_items(its.data(), (c1 - c0) * count, S);
        for (int64_t s = c0; s < c1; ++s) {
          items.eps(its.data() + (s - c0) * count, count, S, S.mod.data() + (s - c0) * count * per, e);
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

}  // namespace

void bind_diffusion_head(pybind11::module& m) {
  m.def("denoise", &denoise,
        "x [n, d] (in place), noise [S, n, d], scale [S, n or 1], t_embed [S, w], z [m, zd], weights, coef [S, 4], "
        "cfg [n or 1], states [S, n, d] or empty: S denoising steps of the diffusion head");
  m.def("eps_at", &eps_at, "states [S, n, d], t_embed [S, w], z [m, zd], weights, cfg [n or 1] -> eps [S, n, d]");
}

}  // namespace arserve
