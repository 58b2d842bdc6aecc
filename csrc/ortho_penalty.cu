// Grouped OrthoReg penalty and gradient as a `fastortho::` op (TORCH_LIBRARY_FRAGMENT: the Python ops share the namespace).
//
// ortho_penalty_grouped(weights, bases, squared, gram) -> (values [L] fp32, grads [L])
//   One C++ call for every layer: layers are grouped by shape; per group one CUDA kernel
//   forms D = W - W0 (fp32, all layers of the group through a pointer table: cuBLAS cannot
//   subtract on the fly), cuBLAS forms the Gram of the smaller side, one kernel subtracts I
//   and reduces ||G - I||^2 per layer (deterministic: per-block partials, then a sum), and one
//   batched GEMM writes grad = c D (G - I) (or c (G - I) D), with the per-layer factor c (4, or
//   2 / ||G - I|| when not squared) folded into the small k x k matrix first. The gradient is
//   that of sum(values); the autograd layer scales it by the upstream gradient. TF32 follows
//   torch.backends.cuda.matmul (set by the Python caller). One pinned host-to-device copy per
//   call carries every pointer table and the layer order.
//   gram: how the symmetric rank-k update G = X^T X is formed (which one serves is measured
//   per shape group by the Python side, never assumed):
//     "gemm"     one batched GEMM for the full k x k (simplest, most FLOPs);
//     "triangle" the upper block triangle only, one batched GEMM per block row: (b + 1) / 2b
//                of the FLOPs for b block rows, still batched and TF32-capable;
//     "syrk"     cublasSsyrk per layer (half the FLOPs, but no batched form, and cuBLAS may
//                not run it on tensor cores).
//   The last two write one triangle; the identity kernel mirrors it while it reduces.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Exceptions.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <map>
#include <string>
#include <tuple>
#include <vector>

namespace {

constexpr int kThreads = 256;

template <typename scalar_w, typename scalar_b>
__global__ void form_deltas_kernel(const int64_t* w_ptrs, const int64_t* b_ptrs, float* out, int64_t numel) {
  // blockIdx.y: layer of the group; grid-stride over its elements.
  const int layer = blockIdx.y;
  const scalar_w* w = reinterpret_cast<const scalar_w*>(w_ptrs[layer]);
  const scalar_b* b = reinterpret_cast<const scalar_b*>(b_ptrs[layer]);
  float* o = out + layer * numel;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < numel; i += (int64_t)gridDim.x * blockDim.x) {
    o[i] = static_cast<float>(w[i]) - static_cast<float>(b[i]);
  }
}

__global__ void subtract_identity_sq_kernel(float* g, int64_t k, float* partials, int chunks, bool upper_only) {
  // blockIdx.y: layer; blockIdx.x: chunk of its k*k entries. Writes G - I in place and the
  // chunk's sum of squares to partials[layer * chunks + chunk]. upper_only: only the upper
  // triangle (row-major, c >= r) holds the Gram; each upper entry is mirrored to the lower one
  // and counted twice. No thread reads a lower entry, so the mirroring cannot race.
  __shared__ float shared[kThreads];
  const int layer = blockIdx.y;
  float* m = g + layer * k * k;
  const int64_t n = k * k;
  const int64_t per_chunk = (n + chunks - 1) / chunks;
  const int64_t start = blockIdx.x * per_chunk;
  const int64_t stop = min(n, start + per_chunk);
  float acc = 0.f;
  for (int64_t i = start + threadIdx.x; i < stop; i += blockDim.x) {
    const int64_t r = i / k, c = i % k;
    if (upper_only && c < r) continue;
    float v = m[i];
    if (r == c) {
      v -= 1.f;
      m[i] = v;
      acc += v * v;
    } else if (upper_only) {
      m[c * k + r] = v;
      acc += 2.f * v * v;
    } else {
      acc += v * v;
    }
  }
  shared[threadIdx.x] = acc;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) shared[threadIdx.x] += shared[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) partials[layer * chunks + blockIdx.x] = shared[0];
}

at::Tensor form_deltas(const int64_t* w_table, const int64_t* b_table, int64_t layers, int64_t rows, int64_t cols,
                       at::ScalarType w_type, at::ScalarType b_type, const at::TensorOptions& options) {
  // w_table / b_table: device arrays of the group's data pointers.
  const int64_t numel = rows * cols;
  auto out = at::empty({layers, rows, cols}, options.dtype(at::kFloat));
  const int blocks_x = static_cast<int>(std::min<int64_t>((numel + kThreads - 1) / kThreads, 1024));
  dim3 grid(blocks_x, static_cast<unsigned>(layers));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w_type, "form_deltas_w", [&] {
    using scalar_w = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, b_type, "form_deltas_b", [&] {
      form_deltas_kernel<scalar_w, scalar_t><<<grid, kThreads, 0, stream>>>(w_table, b_table, out.data_ptr<float>(),
                                                                             numel);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

enum class GramMode { kGemm, kTriangle, kSyrk };

GramMode parse_gram(const std::string& gram) {
  if (gram == "gemm") return GramMode::kGemm;
  if (gram == "triangle") return GramMode::kTriangle;
  if (gram == "syrk") return GramMode::kSyrk;
  TORCH_CHECK(false, "ortho_penalty_grouped: gram: expected \"gemm\", \"triangle\" or \"syrk\", got \"", gram, "\"");
}

int64_t triangle_block(int64_t k) {
  // About four block rows, each a multiple of 128 (cuBLAS tile sizes): for k = 768 / 1024 that
  // is 3 / 4 rows, 2/3 / 5/8 of the full Gram's FLOPs in 3 / 4 batched GEMMs.
  const int64_t quarter = (k + 3) / 4;
  return std::max<int64_t>(128, (quarter + 127) / 128 * 128);
}

void gram_upper_triangle(const at::Tensor& x, at::Tensor& g) {
  // x: [Lg, big, k] (a view of D, maybe transposed); g: [Lg, k, k]. Block row [i0, i1) of
  // G = X^T X from column i0 on: X[:, :, i0:i1]^T X[:, :, i0:].
  const int64_t k = x.size(2), block = triangle_block(k);
  for (int64_t i0 = 0; i0 < k; i0 += block) {
    const int64_t rows = std::min(block, k - i0);
    auto out = g.narrow(1, i0, rows).narrow(2, i0, k - i0);
    at::bmm_out(out, x.narrow(2, i0, rows).transpose(1, 2), x.narrow(2, i0, k - i0));
  }
}

void gram_upper_syrk(const at::Tensor& d, bool tall, at::Tensor& g) {
  // d: [Lg, rows, cols] row-major fp32 = per layer a cols x rows column-major matrix A with
  // lda = cols. Tall: G = D^T D = A A^T (no transpose, n = cols). Wide: G = D D^T = A^T A
  // (transpose, n = rows). cuBLAS's lower triangle (column-major) is our row-major upper one.
  const int64_t rows = d.size(1), cols = d.size(2);
  const int n = static_cast<int>(tall ? cols : rows), depth = static_cast<int>(tall ? rows : cols);
  const cublasOperation_t op = tall ? CUBLAS_OP_N : CUBLAS_OP_T;
  const float alpha = 1.f, beta = 0.f;
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();  // current stream, TF32 mode as torch set it
  for (int64_t l = 0; l < d.size(0); ++l) {
    TORCH_CUDABLAS_CHECK(cublasSsyrk(handle, CUBLAS_FILL_MODE_LOWER, op, n, depth, &alpha,
                                     d.data_ptr<float>() + l * rows * cols, static_cast<int>(cols), &beta,
                                     g.data_ptr<float>() + l * n * n, n));
  }
}

at::Tensor subtract_identity_sq(at::Tensor& g, bool upper_only) {
  // g: [L, k, k] fp32 contiguous -> per-layer ||G - I||^2, G - I in place (and symmetric).
  const int64_t L = g.size(0), k = g.size(1);
  const int chunks = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((k * k) / (kThreads * 16), 256)));
  auto partials = at::empty({L, chunks}, g.options());
  dim3 grid(chunks, static_cast<unsigned>(L));
  subtract_identity_sq_kernel<<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      g.data_ptr<float>(), k, partials.data_ptr<float>(), chunks, upper_only);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return partials.sum(1);
}

void check_pairs(const std::vector<at::Tensor>& weights, const std::vector<at::Tensor>& bases) {
  TORCH_CHECK(!weights.empty() && weights.size() == bases.size(),
              "ortho_penalty_grouped: weights and bases must be non-empty lists of equal length");
  for (size_t i = 0; i < weights.size(); ++i) {
    TORCH_CHECK(weights[i].dim() == 2 && weights[i].sizes() == bases[i].sizes(),
                "ortho_penalty_grouped: layer ", i, ": expected 2-D weight and base of one shape");
    TORCH_CHECK(weights[i].is_cuda() && bases[i].is_cuda() && weights[i].device() == weights[0].device(),
                "ortho_penalty_grouped: layer ", i, ": expected CUDA tensors on one device");
    TORCH_CHECK(weights[i].is_contiguous() && bases[i].is_contiguous(),
                "ortho_penalty_grouped: layer ", i, ": expected contiguous tensors");
    TORCH_CHECK(weights[i].scalar_type() == weights[0].scalar_type() && bases[i].scalar_type() == bases[0].scalar_type(),
                "ortho_penalty_grouped: one weight dtype and one base dtype per call");
  }
}

std::tuple<at::Tensor, std::vector<at::Tensor>> ortho_penalty_grouped(
    std::vector<at::Tensor> weights, std::vector<at::Tensor> bases, bool squared, std::string gram) {
  check_pairs(weights, bases);
  const GramMode mode = parse_gram(gram);
  c10::cuda::CUDAGuard guard(weights[0].device());
  const int64_t L = weights.size();
  std::map<std::pair<int64_t, int64_t>, std::vector<int64_t>> groups;  // shape -> layers, in order
  std::vector<std::pair<int64_t, int64_t>> order;
  for (int64_t i = 0; i < L; ++i) {
    auto key = std::make_pair(weights[i].size(0), weights[i].size(1));
    if (!groups.count(key)) order.push_back(key);
    groups[key].push_back(i);
  }
  // One pinned upload: [weight pointers | base pointers | layer index], all in group order.
  auto host = at::empty({3 * L}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* h = host.data_ptr<int64_t>();
  int64_t pos = 0;
  for (const auto& key : order) {
    for (auto i : groups[key]) {
      h[pos] = reinterpret_cast<int64_t>(weights[i].data_ptr());
      h[L + pos] = reinterpret_cast<int64_t>(bases[i].data_ptr());
      h[2 * L + pos] = i;
      ++pos;
    }
  }
  auto table = host.to(weights[0].device(), /*non_blocking=*/true);
  const int64_t* dev = table.data_ptr<int64_t>();
  const auto options = weights[0].options();
  auto grouped_values = at::empty({L}, options.dtype(at::kFloat));
  std::vector<at::Tensor> grads(L);
  int64_t first = 0;  // position of the group's first layer in group order
  for (const auto& key : order) {
    const auto& idx = groups[key];
    const int64_t rows = key.first, cols = key.second, lg = idx.size();
    auto d = form_deltas(dev + first, dev + L + first, lg, rows, cols, weights[0].scalar_type(),
                         bases[0].scalar_type(), options);  // [Lg, rows, cols] fp32
    const bool tall = rows >= cols;
    auto x = tall ? d : d.transpose(1, 2);  // [Lg, big, k]
    const int64_t k = x.size(2);
    // A single block row is the full Gram: "triangle" then is "gemm".
    const bool full = mode == GramMode::kGemm || (mode == GramMode::kTriangle && triangle_block(k) >= k);
    at::Tensor g;
    if (full) {
      g = at::bmm(x.transpose(1, 2), x).contiguous();  // G = X^T X, [Lg, k, k]
    } else {
      g = at::empty({lg, k, k}, d.options());
      if (mode == GramMode::kTriangle) {
        gram_upper_triangle(x, g);
      } else {
        gram_upper_syrk(d, tall, g);
      }
    }
    auto sq = subtract_identity_sq(g, /*upper_only=*/!full);  // G -> G - I, symmetric
    auto val = squared ? sq : sq.sqrt();
    // d||G - I|| = 4 X (G - I) / (2 ||G - I||), zero where the norm is zero
    auto coef = squared ? at::full_like(sq, 4.0)
                        : at::where(sq > 0, sq.sqrt().reciprocal().mul(2.0), at::zeros_like(sq));
    g.mul_(coef.view({-1, 1, 1}));
    auto grad = tall ? at::bmm(d, g) : at::bmm(g, d);  // [Lg, rows, cols] fp32
    grouped_values.narrow(0, first, lg).copy_(val);
    for (int64_t j = 0; j < lg; ++j) grads[idx[j]] = grad[j].to(weights[idx[j]].scalar_type());
    first += lg;
  }
  auto values = at::empty({L}, options.dtype(at::kFloat));
  values.index_copy_(0, table.narrow(0, 2 * L, L), grouped_values);
  return {values, grads};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastortho, m) {
  m.def("ortho_penalty_grouped(Tensor[] weights, Tensor[] bases, bool squared, str gram=\"gemm\") -> "
        "(Tensor, Tensor[])");
}

TORCH_LIBRARY_IMPL(fastortho, CUDA, m) {
  m.impl("ortho_penalty_grouped", &ortho_penalty_grouped);
}
