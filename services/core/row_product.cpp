// Batch-invariant matrix products on the CPU: y = x @ w.T where every element
// of y is one dot product computed in one fixed order, whatever the number of
// rows of x, the rows beside it, or the threads (batch invariance, He et al.
// 2025, "Defeating Nondeterminism in LLM Inference", Thinking Machines Lab).
//
// Why a kernel of our own: greedy speculative decoding is lossless only if a
// row of a draft chain under verification (k + 1 rows) gets the bits plain
// decoding gives it (1 row). oneDNN and MKL choose their K-order by the
// number of rows (row_invariance.py measures where they agree); here
// y[m, n] = sum_lanes(fma(x[m, k:k+L], w[n, k:k+L], acc) for k = 0, L, 2L, ...)
// always. And a decode step of a small model is a stream of matrix-vector
// products bound by reading the weights: the packed layout below makes each
// thread's share of a matrix one sequential stream, which the hardware
// prefetchers follow at close to the machine's read bandwidth (measured:
// docs/decisions.md, decision 50).
//
// Words used here:
// - L (lanes): floats in one vector register (16 with AVX-512, 8 with AVX2).
// - a tile: NR consecutive output features; the packed layout stores tile t
//   as [K / L, NR, L]: for each L-wide slice of K, the NR rows' slices side by
//   side. packed: [N_pad / NR, K / L, NR, L], N_pad = N rounded up to NR (zero
//   rows past N).
// - a micro-tile: MR rows of x against one tile: MR * NR accumulators in
//   registers, each weight vector loaded once for MR rows.
// - pairs: bfloat16 slices are 2L wide, and lane l takes the products of
//   elements 2l and 2l + 1 of each slice (a 32-bit word holds such a pair, 2l
//   in its low half). Where the CPU has AVX-512 BF16, one VDPBF16PS adds both
//   (x[k+2l] w[k+2l] + x[k+2l+1] w[k+2l+1], each exact in float32, summed and
//   added in float32 with round-to-nearest; decision 52). Elsewhere (AVX2,
//   AVX-512 without BF16) the words are split: a shift makes the even
//   elements floats and a mask the odd ones, each one integer op for L
//   elements, and two FMAs add them, even then odd (decision 74): widening
//   element by element took two ops for L elements, as many as the
//   multiplies. Either order is fixed whatever the rows. A bfloat16 row then
//   needs a width that is a multiple of 2L.

#include "kernels.h"

#include <ATen/Dispatch.h>

#include <cstring>
#include <type_traits>

namespace arserve {
namespace {

#if defined(__AVX512F__)
constexpr int64_t NR = 8, MR = 3;  // 24 accumulators + 8 weight vectors of 32 zmm registers
constexpr int64_t kPrefetchRows = 4;  // rows from which a single pass prefetches the next tile: none (a pass holds 3)
#else
constexpr int64_t NR = 4, MR = 3;  // 12 accumulators + 4 weight vectors of 16 ymm registers (x from memory)
constexpr int64_t kPrefetchRows = 3;  // rows from which a single pass prefetches the next tile (decision 71)
#endif

// elements of T per slice of K: L, or 2L for bfloat16 (in pairs)
template <typename T>
constexpr int64_t slice_of() {
  return std::is_same_v<T, c10::BFloat16> ? 2 * L : L;
}

// The NR sums of NR accumulators' lanes at once, each in one fixed order:
// lane l is added to lane l + L/2, then l + L/4, ... (a transposing
// reduction: halves of two accumulators side by side in one vector, so each
// level is two shuffles and one add for every two vectors).
#if defined(__AVX512F__)
typedef float half_vec __attribute__((vector_size(8 * sizeof(float))));
inline half_vec sum_tile(const vec a[NR]) {  // NR = 8, L = 16 -> 8 sums
  vec v1[4], v2[2];
  for (int i = 0; i < 4; ++i) {  // [a[2i] 8 lanes | a[2i+1] 8 lanes], each half + its other half
    v1[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
            __builtin_shufflevector(a[2 * i], a[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  }
  for (int i = 0; i < 2; ++i) {  // four accumulators, four lanes each
    v2[i] = __builtin_shufflevector(v1[2 * i], v1[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
            __builtin_shufflevector(v1[2 * i], v1[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  }
  const vec v3 = __builtin_shufflevector(v2[0], v2[1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
                 __builtin_shufflevector(v2[0], v2[1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  return __builtin_shufflevector(v3, v3, 0, 2, 4, 6, 8, 10, 12, 14) +
         __builtin_shufflevector(v3, v3, 1, 3, 5, 7, 9, 11, 13, 15);  // eight accumulators, one lane each
}
#else
typedef float half_vec __attribute__((vector_size(4 * sizeof(float))));
inline half_vec sum_tile(const vec a[NR]) {  // NR = 4, L = 8 -> 4 sums
  vec v1[2];
  for (int i = 0; i < 2; ++i) {
    v1[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11) +
            __builtin_shufflevector(a[2 * i], a[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15);
  }
  const vec v2 = __builtin_shufflevector(v1[0], v1[1], 0, 1, 4, 5, 8, 9, 12, 13) +
                 __builtin_shufflevector(v1[0], v1[1], 2, 3, 6, 7, 10, 11, 14, 15);
  return __builtin_shufflevector(v2, v2, 0, 2, 4, 6) + __builtin_shufflevector(v2, v2, 1, 3, 5, 7);
}
#endif

// y[m, n] for the `rows` (<= MR) rows of x at `x` (row stride xs) and one tile
// (`w`: [K / S, NR, S], S = slice_of<T>()); y's row stride ys, only columns < `cols` stored.
// `next`: a tile to prefetch into L2 meanwhile (or null): this pass is `part`
// of `parts` over the tile and prefetches its share of next's lines, one
// contiguous run, spread evenly over its own k steps.
template <typename T, int64_t ROWS>
inline void micro_tile(const T* x, int64_t xs, const T* w, int64_t K, T* y, int64_t ys, int64_t cols,
                       const T* next = nullptr, int64_t part = 0, int64_t parts = 1) {
  constexpr int64_t S = slice_of<T>(), kLine = 64 / sizeof(T), kLines = NR * S / kLine;  // lines per k step
  const int64_t steps = K / S, lines = steps * kLines;  // k steps of a tile, 64-byte lines of a tile
  const int64_t lo = part * lines / parts, span = (part + 1) * lines / parts - lo;  // this pass's lines of next
  const T* ahead = next == nullptr ? nullptr : next + lo * kLine;
  int64_t owed = 0;  // span / steps lines per k step: Bresenham's running remainder
  vec acc[ROWS][NR];
  for (int64_t m = 0; m < ROWS; ++m) {
    for (int64_t n = 0; n < NR; ++n) acc[m][n] = vec{};
  }
  for (int64_t k = 0; k < K; k += S) {
    const T* wk = w + k * NR;
    if (ahead != nullptr) {
      for (owed += span; owed >= steps; owed -= steps, ahead += kLine) __builtin_prefetch(ahead, 0, 2);
    }
#if defined(__AVX512BF16__)
    if constexpr (S != L) {  // bfloat16 in pairs: 2L elements per vector, one VDPBF16PS each
      __m512bh wv[NR];
      for (int64_t n = 0; n < NR; ++n) wv[n] = (__m512bh)_mm512_loadu_si512(wk + n * S);
      for (int64_t m = 0; m < ROWS; ++m) {
        const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + m * xs + k);
        for (int64_t n = 0; n < NR; ++n) acc[m][n] = (vec)_mm512_dpbf16_ps((__m512)acc[m][n], xv, wv[n]);
      }
      continue;
    }
#else
    if constexpr (S != L) {  // bfloat16 pairs split: the even elements as floats, then the odd ones
      for (int odd = 0; odd < 2; ++odd) {
        vec wv[NR];
        for (int64_t n = 0; n < NR; ++n) {
          const pair_words p = load_pairs(wk + n * S);
          wv[n] = odd ? odd_floats(p) : even_floats(p);
        }
        for (int64_t m = 0; m < ROWS; ++m) {
          const pair_words p = load_pairs(x + m * xs + k);
          const vec xv = odd ? odd_floats(p) : even_floats(p);
          for (int64_t n = 0; n < NR; ++n) acc[m][n] = fma_lanes(xv, wv[n], acc[m][n]);
        }
      }
      continue;
    }
#endif
    vec wv[NR];
    for (int64_t n = 0; n < NR; ++n) wv[n] = load_vec(wk + n * L);
    for (int64_t m = 0; m < ROWS; ++m) {
      const vec xv = load_vec(x + m * xs + k);
      for (int64_t n = 0; n < NR; ++n) acc[m][n] = fma_lanes(xv, wv[n], acc[m][n]);
    }
  }
  for (int64_t m = 0; m < ROWS; ++m) {
    const half_vec sums = sum_tile(acc[m]);
    for (int64_t n = 0; n < cols; ++n) y[m * ys + n] = static_cast<T>(sums[n]);
  }
}

// every row of x [M, K] against one tile: micro-tiles of MR = 3 rows, the
// rest in one of two, except that where that would leave a row alone after
// others, the last four rows go as two of two: a pass of one row holds only NR
// accumulators, too few to keep the FMA units busy with AVX2's NR = 4 (9
// rows as 3 + 3 + 3 instead of 2 + 2 + 2 + 2 + 1: the products of a forward
// 10-20% faster there). With more rows than one micro-tile, every pass
// prefetches its share of tile `next` (or null): the first pass reads this
// tile from memory, the later ones from cache, and with the next tile's lines
// asked for only in the first, the memory stream idled through the later
// passes: a forward's time was its reads plus its multiplies (9 rows 1.3-1.5x
// one row, where the multiplies alone take half a row's reads). So does a row
// alone in bfloat16 pairs (decision 52), and with AVX2 a single pass of three
// rows: its multiplies take long enough for the stream to idle too (decision
// 71). Every pass computes each of its rows as any other pass would: the
// grouping never changes a row's bits.
template <typename T>
inline void rows_of_tile(const T* x, int64_t xs, int64_t M, const T* w, int64_t K, T* y, int64_t ys, int64_t cols,
                         const T* next) {
  static_assert(MR == 3, "the passes below are of 3, 2 and 1 rows");
  const bool lone = M > 1 && M % MR == 1;  // the last four rows as two passes of two
  const int64_t threes = M / MR - (lone ? 1 : 0), parts = threes + (lone ? 2 : M % MR ? 1 : 0);
  const T* ahead = parts > 1 || M >= kPrefetchRows ? next : nullptr;
  // a row alone in pairs runs through a tile in half the instructions and
  // prefetches the next too (without: 1 row 3-5% slower than widening with
  // VDPBF16PS, 7-15% slower split on AVX2; measured)
  if (M == 1 && slice_of<T>() != L) ahead = next;
  int64_t m = 0, part = 0;
  for (; part < threes; ++part, m += MR) micro_tile<T, MR>(x + m * xs, xs, w, K, y + m * ys, ys, cols, ahead, part, parts);
  for (; m < M; ++part) {
    if (M - m >= 2) {
      micro_tile<T, 2>(x + m * xs, xs, w, K, y + m * ys, ys, cols, ahead, part, parts);
      m += 2;
    } else {
      micro_tile<T, 1>(x + m * xs, xs, w, K, y + m * ys, ys, cols, ahead, part, parts);
      m += 1;
    }
  }
}

constexpr int64_t kBlockBytes = 256 << 10;  // rows of x kept in (L2) cache while a thread streams its tiles
constexpr int64_t kPiecesPerThread = 4;  // a thread's share in pieces, for a neighbour-slowed thread to shed
constexpr int64_t kInlineMacs = 1 << 18;  // smaller products run on the calling thread, holding the GIL

template <typename T>
void run(const torch::Tensor& x, const torch::Tensor& packed, torch::Tensor& y) {
  const int64_t M = x.size(0), K = x.size(1), xs = x.stride(0), N = y.size(1), tiles = packed.size(0);
  const T* xp = x.data_ptr<T>();
  const T* wp = packed.data_ptr<T>();
  T* yp = y.data_ptr<T>();
  const int64_t block = std::max<int64_t>(1, kBlockBytes / (K * static_cast<int64_t>(sizeof(T))) / MR) * MR;
  auto body = [&](int64_t lo, int64_t hi) {  // tiles [lo, hi): one sequential stream of weights per block of rows
    for (int64_t m0 = 0; m0 < M; m0 += block) {
      const int64_t rows = std::min(block, M - m0);
      for (int64_t t = lo; t < hi; ++t) {
        rows_of_tile<T>(xp + m0 * xs, xs, rows, wp + t * K * NR, K, yp + m0 * N + t * NR, N, std::min(NR, N - t * NR),
                        t + 1 < hi ? wp + (t + 1) * K * NR : nullptr);
      }
    }
  };
  if (M * N * K < kInlineMacs) {
    body(0, tiles);
    return;
  }
  ReleaseGil release;
  parallel_pieces(tiles, kPiecesPerThread, body);
}

// elements of a slice of K for a dtype's rows (``slice_of``)
int64_t slice_for(at::ScalarType dtype) {
  return dtype == at::kBFloat16 ? slice_of<c10::BFloat16>() : slice_of<float>();
}

}  // namespace

std::vector<int64_t> row_tile(bool bfloat16) { return {NR, slice_for(bfloat16 ? at::kBFloat16 : at::kFloat)}; }

// w [N, K] -> packed [N_pad / NR, K / S, NR, S] (zero rows past N; S = slice_for(dtype))
torch::Tensor pack_rows(const torch::Tensor& w) {
  TORCH_CHECK(w.device().is_cpu() && w.dim() == 2, "w must be a [out_features, in_features] CPU tensor");
  TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16, "w must be float32 or bfloat16");
  const int64_t N = w.size(0), K = w.size(1), tiles = (N + NR - 1) / NR, S = slice_for(w.scalar_type());
  TORCH_CHECK(K > 0 && K % S == 0, "in_features must be a positive multiple of ", S);
  auto padded = torch::zeros({tiles * NR, K}, w.options());
  padded.narrow(0, 0, N).copy_(w);
  return padded.view({tiles, NR, K / S, S}).permute({0, 2, 1, 3}).contiguous();
}

// x [M, K], packed (pack_rows of w [N, K]) -> x @ w.T [M, N]
torch::Tensor row_product(const torch::Tensor& x, const torch::Tensor& packed, int64_t out_features) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.stride(1) == 1, "x must be [rows, in_features], rows contiguous");
  const int64_t S = slice_for(x.scalar_type());
  TORCH_CHECK(packed.dim() == 4 && packed.size(2) == NR && packed.size(3) == S && packed.is_contiguous(),
              "packed must come from pack_rows");
  TORCH_CHECK(packed.device().is_cpu(), "packed must be on the CPU");
  TORCH_CHECK(packed.scalar_type() == x.scalar_type(), "x and the weights must share a dtype");
  const int64_t M = x.size(0), K = x.size(1), tiles = packed.size(0), N = out_features;
  TORCH_CHECK(packed.size(1) * S == K, "x has ", K, " features, the weights ", packed.size(1) * S);
  TORCH_CHECK(N > (tiles - 1) * NR && N <= tiles * NR, "out_features does not match the packed weights");
  auto y = torch::empty({M, N}, x.options());
  if (M == 0) return y;
  if (x.scalar_type() == at::kFloat) {
    run<float>(x, packed, y);
  } else {
    run<c10::BFloat16>(x, packed, y);
  }
  return y;
}

}  // namespace arserve
