// The image backbone's blocks over its KV cache in one call (arserve.core.image_model: ``image_forward``).
//
// ``ImageAR.forward`` over a KV cache (serving: the backbone service, the drafter, a cache rebuild), pre-norm
// transformer blocks:
//   a = LN1(h);  q, k, v = qkv(a);  h += proj(attention(q, cache));  h += fc2(gelu(fc1(LN2(h))))
// then z = LN(h). Each row (image) alone: its m new positions go after its committed length, their keys and
// values are written into the cache first, and position j attends the keys [0, length + j] (causal).
//
// With the diffusion head compiled (diffusion_head.cpp) the backbone's PyTorch forward, some 70 ops at one
// position, was the next part of an image token (0.79 ms of the digits target at one row; 0.17 ms here).
// A thread carries a group of rows through the layers together, so that each product's tiles share weight
// loads across rows; each row's arithmetic is its own, so its z is the same bits alone or joined.

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

constexpr int64_t kGroupRows = 32;  // rows a thread carries through the blocks together

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
  const auto [mean, rstd] = norm_stats(h, dim, 1e-5f);
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
  TORCH_CHECK(dim % L == 0 && hidden % L == 0 && dim % heads == 0,
              "backbone width and MLP width must be multiples of ", L);
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

void bind_image_blocks(pybind11::module& m) {
  m.def("image_forward", &image_forward,
        "x [rows, m, dim], k_cache, v_cache [layers, rows, capacity, heads, head_dim], lengths [rows], weights, heads "
        "-> z [rows, m, dim]: the image backbone's blocks, each row's m positions after its committed length");
  m.def("image_width", []() { return L; }, "the image model's widths (backbone and head) must be multiples of it");
}

}  // namespace arserve
