// What arserve's CPU kernels (fused.cpp, row_product.cpp, decode_stack.cpp) share: one module,
// arserve.core.fused, built by torch's cpp_extension for the CPU it runs on.
#pragma once

#include <torch/extension.h>

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

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

// The decode step's layers in one call (decode_stack.cpp).
void bind_decode_stack(pybind11::module& m);

}  // namespace arserve

// The elementwise chains and decode attention (fused.cpp), each row alone in a fixed order.
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& w, double eps);
std::tuple<torch::Tensor, torch::Tensor> add_rms_norm(const torch::Tensor& x, const torch::Tensor& delta,
                                                      const torch::Tensor& w, double eps);
torch::Tensor silu_mul(const torch::Tensor& gate_up);
std::tuple<torch::Tensor, torch::Tensor> rope_qkv(const torch::Tensor& qkv, const torch::Tensor& cos,
                                                  const torch::Tensor& sin, int64_t H, int64_t K);
torch::Tensor decode_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                               const std::vector<int64_t>& lengths, double scale);
