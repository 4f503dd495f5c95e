// SparseGPT's OBS column sweep over one block of columns with its mask already chosen (unstructured
// patterns): for each column i in turn, every row's weight there is kept or, where pruned, zeroed,
// and its error e = (w - q) / [H^-1]_ii is spread over the row's later columns of the block,
// w[:, i:] -= e [H^-1]_{i, i:}. Rows are independent, so they are split over torch's intra-op
// threads, and each row runs its columns in order. This is the Python loop of
// epts/baselines/sparsegpt.py, operation for operation in float32 (a product, then a difference:
// the file is compiled without floating-point contraction, so no FMA changes a rounding), and gives
// the same bits; it removes the per-column interpreter overhead, which was most of the sweep's time.

#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <tuple>

#pragma GCC optimize("fp-contract=off")

namespace {

// w1 [rows, count] float32 (changed in place), hinv1 [count, count] float32 (the block of the upper
// Cholesky factor of H^-1), prune1 [rows, count] bool (true: pruned). Returns q1 (the kept weights,
// zeros where pruned) and err1 (the errors e), both [rows, count] float32.
std::tuple<torch::Tensor, torch::Tensor> obs_sweep(const torch::Tensor& w1, const torch::Tensor& hinv1,
                                                   const torch::Tensor& prune1) {
  TORCH_CHECK(w1.dim() == 2 && w1.scalar_type() == torch::kFloat32 && w1.is_contiguous() && w1.device().is_cpu(),
              "obs_sweep: w1 must be a contiguous 2-D float32 CPU tensor");
  const int64_t rows = w1.size(0), count = w1.size(1);
  TORCH_CHECK(hinv1.sizes() == torch::IntArrayRef({count, count}) && hinv1.scalar_type() == torch::kFloat32 &&
                  hinv1.is_contiguous(), "obs_sweep: hinv1 must be a contiguous [count, count] float32 tensor");
  TORCH_CHECK(prune1.sizes() == w1.sizes() && prune1.scalar_type() == torch::kBool && prune1.is_contiguous(),
              "obs_sweep: prune1 must be a contiguous bool tensor shaped like w1");
  auto q1 = torch::empty_like(w1);
  auto err1 = torch::empty_like(w1);
  float* w = w1.data_ptr<float>();
  const float* h = hinv1.data_ptr<float>();
  const bool* pruned = prune1.data_ptr<bool>();
  float* q = q1.data_ptr<float>();
  float* err = err1.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float* wr = w + r * count;
      for (int64_t i = 0; i < count; ++i) {
        const float col = wr[i];
        const float kept = pruned[r * count + i] ? 0.0f : col;
        const float e = (col - kept) / h[i * count + i];
        q[r * count + i] = kept;
        err[r * count + i] = e;
        const float* hi = h + i * count;
        for (int64_t c = i; c < count; ++c) {
          const float step = e * hi[c];
          wr[c] = wr[c] - step;
        }
      }
    }
  });
  return {q1, err1};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(epts_sparse, m) {
  m.def("obs_sweep(Tensor w1, Tensor hinv1, Tensor prune1) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(epts_sparse, CPU, m) {
  m.impl("obs_sweep", obs_sweep);
}
