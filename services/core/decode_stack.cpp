// A decode step's transformer layers in one call: decode rows and draft
// chains and trees under verification (arserve.core.decode_stack; docs/decisions.md,
// decision 51).
//
// Why: a batch-1 decode step of a 135M model on a CPU reads its ~540 MB of
// weights in ~12 ms at full bandwidth, but from Python each of its 30 layers
// is ~10 calls (norms, four products, RoPE, the KV write, attention, SwiGLU,
// the residual), each paying Python's argument parsing and PyTorch's
// dispatcher, ~5 ms a step in all. Here the whole stack runs in C++, with the
// GIL released once for the step (the gateway's threads run meanwhile).
//
// The same kernels, in the same order, on the same inputs as the layer by
// layer path (model.Block.forward): every row keeps its bits, so a request's
// tokens are the same through either (tests/core/test_decode_stack.py).

#include "kernels.h"

#include <cmath>
#include <cstring>
#include <utility>
#include <vector>

namespace arserve {

namespace {

// One layer's weights: the norms [D] and the four matrices in the row layout (pack_rows).
struct Layer {
  torch::Tensor attn_norm, wqkv, wo, ffn_norm, w_gate_up, w_down;
};

// Rows that attend one KV: (k, v [layers, B, K, P, hd], each row's new position [B], tails, context).
// Without tails ([]) row b attends positions [0, at[b] + 1); with them (one per row, a draft tree's rows)
// row b attends [0, context), then the positions tails[b] (its ancestors' and its own, root first).
using Group = std::tuple<torch::Tensor, torch::Tensor, std::vector<int64_t>, std::vector<std::vector<int64_t>>, int64_t>;

class DecodeStack {
 public:
  // layers: per layer [attn_norm, wqkv, wo, ffn_norm, w_gate_up, w_down] (matrices packed);
  // features: the four matrices' output widths, in that order.
  DecodeStack(const std::vector<std::vector<torch::Tensor>>& layers, std::vector<int64_t> features, int64_t H,
              int64_t K, int64_t hd, double eps)
      : features_(std::move(features)), H_(H), K_(K), hd_(hd), eps_(eps), scale_(std::pow(double(hd), -0.5)) {
    TORCH_CHECK(features_.size() == 4, "features: the output widths of wqkv, wo, w_gate_up, w_down");
    TORCH_CHECK(features_[0] == (H + 2 * K) * hd, "wqkv must have (H + 2K) * head_dim outputs");
    for (const auto& l : layers) {
      TORCH_CHECK(l.size() == 6, "a layer is [attn_norm, wqkv, wo, ffn_norm, w_gate_up, w_down]");
      layers_.push_back({l[0], l[1], l[2], l[3], l[4], l[5]});
    }
  }

  // x [N, D]: the rows' embeddings; groups: the rows in row order, each
  // group (k, v [layers, B, K, P, hd], at [B]) of B rows: row b's new key and
  // value are written at position at[b] of k[:, b] and v[:, b], and it
  // attends positions [0, at[b] + 1) there. Decode rows attended together
  // are one group over their padded copy; a chain of new tokens on one cache
  // is a group over that cache broadcast to its rows (stride 0), at = start,
  // start + 1, ...; a tree of new tokens likewise, each row attending the
  // context and its path (tails); cos, sin [N, hd] (sin sign-folded) -> the
  // hidden states [N, D] after the last layer.
  torch::Tensor forward(torch::Tensor x, const std::vector<Group>& groups, const torch::Tensor& cos,
                        const torch::Tensor& sin) const {
    const int64_t N = x.size(0), n_layers = static_cast<int64_t>(layers_.size());
    TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be contiguous [rows, dim]");
    std::vector<std::vector<int64_t>> lengths;
    int64_t rows = 0;
    for (const auto& [k, v, at, tails, context] : groups) {
      const int64_t B = static_cast<int64_t>(at.size());
      TORCH_CHECK(k.dim() == 5 && v.sizes() == k.sizes() && k.size(0) == n_layers && k.size(1) == B &&
                      k.size(2) == K_ && k.size(4) == hd_,
                  "a group's k and v must be [layers, rows, kv_heads, positions, head_dim], one position per row");
      TORCH_CHECK(k.stride(4) == 1 && v.stride(4) == 1, "k and v must have contiguous heads");
      TORCH_CHECK(k.scalar_type() == x.scalar_type() && v.scalar_type() == x.scalar_type(), "k, v and x share a dtype");
      TORCH_CHECK(tails.empty() || static_cast<int64_t>(tails.size()) == B, "a group's tails: none, or one per row");
      lengths.emplace_back(B);
      for (int64_t b = 0; b < B; ++b) {
        TORCH_CHECK(at[b] >= 0 && at[b] < k.size(3), "a row's position must be inside its cache");
        lengths.back()[b] = tails.empty() ? at[b] + 1 : context + static_cast<int64_t>(tails[b].size());
      }
      rows += B;
    }
    TORCH_CHECK(rows == N, "the groups hold ", rows, " rows, x ", N);
    ReleaseGil release;
    const int64_t es = x.element_size(), row_bytes = hd_ * es;
    std::vector<torch::Tensor> outs(groups.size());
    for (int64_t l = 0; l < n_layers; ++l) {
      const Layer& w = layers_[l];
      torch::Tensor h = rms_norm(x, w.attn_norm, eps_);
      auto [qk, v_new] = rope_qkv(row_product(h, w.wqkv, features_[0]), cos, sin, H_, K_);  // [H+K, N, hd], [K, N, hd]
      const torch::Tensor q = qk.narrow(0, 0, H_).transpose(0, 1);  // [N, H, hd]
      const char* knew = static_cast<const char*>(qk.data_ptr());
      const char* vnew = static_cast<const char*>(v_new.data_ptr());
      int64_t row = 0;
      for (size_t i = 0; i < groups.size(); ++i) {
        const auto& [k, v, at, tails, context] = groups[i];
        const int64_t B = static_cast<int64_t>(at.size());
        const torch::Tensor kl = k.select(0, l), vl = v.select(0, l);  // [B, K, P, hd]
        char* kp = static_cast<char*>(kl.data_ptr());
        char* vp = static_cast<char*>(vl.data_ptr());
        for (int64_t b = 0; b < B; ++b) {  // the group's new keys and values, all before its attention
          for (int64_t g = 0; g < K_; ++g) {
            std::memcpy(kp + (b * kl.stride(0) + g * kl.stride(1) + at[b] * kl.stride(2)) * es,
                        knew + ((H_ + g) * N + row + b) * row_bytes, row_bytes);
            std::memcpy(vp + (b * vl.stride(0) + g * vl.stride(1) + at[b] * vl.stride(2)) * es,
                        vnew + (g * N + row + b) * row_bytes, row_bytes);
          }
        }
        outs[i] = decode_attention(q.narrow(0, row, B), kl, vl, lengths[i], scale_, tails);  // [B, H, hd]
        row += B;
      }
      const torch::Tensor attn = outs.size() == 1 ? outs[0] : torch::cat(outs, 0);  // [N, H, hd]
      auto [sum, h2] = add_rms_norm(x, row_product(attn.view({N, H_ * hd_}), w.wo, features_[1]), w.ffn_norm, eps_);
      x = sum + row_product(silu_mul(row_product(h2, w.w_gate_up, features_[2])), w.w_down, features_[3]);
    }
    return x;
  }

 private:
  std::vector<Layer> layers_;
  std::vector<int64_t> features_;
  int64_t H_, K_, hd_;
  double eps_, scale_;
};

}  // namespace

void bind_decode_stack(pybind11::module& m) {
  pybind11::class_<DecodeStack>(m, "DecodeStack",
                                "A forward of decode rows and draft chains in one call: the layer-by-layer "
                                "path's kernels and bits")
      .def(pybind11::init<const std::vector<std::vector<torch::Tensor>>&, std::vector<int64_t>, int64_t, int64_t,
                          int64_t, double>(),
           pybind11::arg("layers"), pybind11::arg("features"), pybind11::arg("n_heads"), pybind11::arg("n_kv_heads"),
           pybind11::arg("head_dim"), pybind11::arg("eps"))
      .def("forward", &DecodeStack::forward, pybind11::arg("x"), pybind11::arg("groups"), pybind11::arg("cos"),
           pybind11::arg("sin"),
           "x [N, D], groups [(k, v [layers, B, K, P, hd], at [B], tails [] or [B] lists, context)], cos, sin [N, hd] "
           "-> [N, D]");
}

}  // namespace arserve
