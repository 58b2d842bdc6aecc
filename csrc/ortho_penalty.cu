// Grouped OrthoReg penalty and gradient, and the dual (primal + tangent) linear layer, as
// `fastortho::` ops (TORCH_LIBRARY_FRAGMENT: the Python ops share the namespace).
//
// ortho_penalty_grouped(weights, bases, squared) -> (values [L] fp32, grads [L])
//   One C++ call for every layer: layers are grouped by shape; per group one CUDA kernel
//   forms D = W - W0 (fp32, all layers of the group through a pointer table: cuBLAS cannot
//   subtract on the fly), one batched cuBLAS GEMM forms the Gram of the smaller side, one
//   kernel subtracts I and reduces ||G - I||^2 per layer (deterministic: per-block partials,
//   then a sum), and one batched GEMM writes grad = c D (G - I) (or c (G - I) D), with the
//   per-layer factor c (4, or 2 / ||G - I|| when not squared) folded into the small k x k
//   matrix first. The gradient is that of sum(values); the autograd layer scales it by the
//   upstream gradient. TF32 follows torch.backends.cuda.matmul (set by the Python caller).
//
// dual_linear(x, dx, w, dw, b, db) -> (y, dy), y = x w^T + b, dy = x dw^T + dx w^T + db
// dual_linear_backward(g_y, g_dy, x, dx, w, dw) -> (grad x, grad dx, grad dw, grad db)
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <map>
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

__global__ void subtract_identity_sq_kernel(float* g, int64_t k, float* partials, int chunks) {
  // blockIdx.y: layer; blockIdx.x: chunk of its k*k entries. Writes G - I in place and the
  // chunk's sum of squares to partials[layer * chunks + chunk].
  __shared__ float shared[kThreads];
  const int layer = blockIdx.y;
  float* m = g + layer * k * k;
  const int64_t n = k * k;
  const int64_t per_chunk = (n + chunks - 1) / chunks;
  const int64_t start = blockIdx.x * per_chunk;
  const int64_t stop = min(n, start + per_chunk);
  float acc = 0.f;
  for (int64_t i = start + threadIdx.x; i < stop; i += blockDim.x) {
    float v = m[i];
    if (i / k == i % k) {
      v -= 1.f;
      m[i] = v;
    }
    acc += v * v;
  }
  shared[threadIdx.x] = acc;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) shared[threadIdx.x] += shared[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) partials[layer * chunks + blockIdx.x] = shared[0];
}

at::Tensor form_deltas(const std::vector<at::Tensor>& ws, const std::vector<at::Tensor>& bs, int64_t rows, int64_t cols) {
  const auto device = ws[0].device();
  const int64_t L = ws.size();
  const int64_t numel = rows * cols;
  auto out = at::empty({L, rows, cols}, ws[0].options().dtype(at::kFloat));
  std::vector<int64_t> w_ptrs(L), b_ptrs(L);
  for (int64_t i = 0; i < L; ++i) {
    w_ptrs[i] = reinterpret_cast<int64_t>(ws[i].data_ptr());
    b_ptrs[i] = reinterpret_cast<int64_t>(bs[i].data_ptr());
  }
  auto table = at::tensor(w_ptrs, at::kLong).to(device, /*non_blocking=*/false);
  auto table_b = at::tensor(b_ptrs, at::kLong).to(device, false);
  const int blocks_x = static_cast<int>(std::min<int64_t>((numel + kThreads - 1) / kThreads, 1024));
  dim3 grid(blocks_x, static_cast<unsigned>(L));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, ws[0].scalar_type(), "form_deltas_w", [&] {
    using scalar_w = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, bs[0].scalar_type(), "form_deltas_b", [&] {
      form_deltas_kernel<scalar_w, scalar_t><<<grid, kThreads, 0, stream>>>(
          table.data_ptr<int64_t>(), table_b.data_ptr<int64_t>(), out.data_ptr<float>(), numel);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor subtract_identity_sq(at::Tensor& g) {
  // g: [L, k, k] fp32 contiguous -> per-layer ||G - I||^2, G - I in place.
  const int64_t L = g.size(0), k = g.size(1);
  const int chunks = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((k * k) / (kThreads * 16), 256)));
  auto partials = at::empty({L, chunks}, g.options());
  dim3 grid(chunks, static_cast<unsigned>(L));
  subtract_identity_sq_kernel<<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      g.data_ptr<float>(), k, partials.data_ptr<float>(), chunks);
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
    std::vector<at::Tensor> weights, std::vector<at::Tensor> bases, bool squared) {
  check_pairs(weights, bases);
  c10::cuda::CUDAGuard guard(weights[0].device());
  const int64_t L = weights.size();
  std::map<std::pair<int64_t, int64_t>, std::vector<int64_t>> groups;  // shape -> layers, in order
  std::vector<std::pair<int64_t, int64_t>> order;
  for (int64_t i = 0; i < L; ++i) {
    auto key = std::make_pair(weights[i].size(0), weights[i].size(1));
    if (!groups.count(key)) order.push_back(key);
    groups[key].push_back(i);
  }
  auto values = at::empty({L}, weights[0].options().dtype(at::kFloat));
  std::vector<at::Tensor> grads(L);
  for (const auto& key : order) {
    const auto& idx = groups[key];
    const int64_t rows = key.first, cols = key.second;
    std::vector<at::Tensor> ws, bs;
    for (auto i : idx) {
      ws.push_back(weights[i]);
      bs.push_back(bases[i]);
    }
    auto d = form_deltas(ws, bs, rows, cols);         // [Lg, rows, cols] fp32
    const bool tall = rows >= cols;
    auto x = tall ? d : d.transpose(1, 2);             // [Lg, big, k]
    auto g = at::bmm(x.transpose(1, 2), x).contiguous();  // G = X^T X, [Lg, k, k]
    auto sq = subtract_identity_sq(g);                 // G -> G - I
    auto val = squared ? sq : sq.sqrt();
    // d||G - I|| = 4 X (G - I) / (2 ||G - I||), zero where the norm is zero
    auto coef = squared ? at::full_like(sq, 4.0)
                        : at::where(sq > 0, sq.sqrt().reciprocal().mul(2.0), at::zeros_like(sq));
    g.mul_(coef.view({-1, 1, 1}));
    auto grad = tall ? at::bmm(d, g) : at::bmm(g, d);  // [Lg, rows, cols] fp32
    auto where = at::tensor(idx, at::kLong).to(values.device(), false);
    values.index_copy_(0, where, val);
    for (size_t j = 0; j < idx.size(); ++j) grads[idx[j]] = grad[j].to(weights[idx[j]].scalar_type());
  }
  return {values, grads};
}

std::tuple<at::Tensor, at::Tensor> dual_linear(at::Tensor x, std::optional<at::Tensor> dx, at::Tensor w,
                                               std::optional<at::Tensor> dw, std::optional<at::Tensor> b,
                                               std::optional<at::Tensor> db) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "dual_linear: expected x [M, K] and w [N, K]");
  c10::cuda::CUDAGuard guard(x.device());
  auto y = b.has_value() ? at::addmm(*b, x, w.t()) : at::mm(x, w.t());
  at::Tensor dy;
  if (dw.has_value()) dy = db.has_value() ? at::addmm(*db, x, dw->t()) : at::mm(x, dw->t());
  if (dx.has_value()) {
    if (dy.defined()) {
      dy.addmm_(*dx, w.t());  // accumulated by the same cuBLAS call (beta = 1)
    } else {
      dy = db.has_value() ? at::addmm(*db, *dx, w.t()) : at::mm(*dx, w.t());
    }
  }
  if (!dy.defined()) dy = db.has_value() ? db->expand({x.size(0), w.size(0)}).contiguous() : at::zeros_like(y);
  return {y, dy};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dual_linear_backward(
    std::optional<at::Tensor> g_y, at::Tensor g_dy, at::Tensor x, std::optional<at::Tensor> dx, at::Tensor w,
    std::optional<at::Tensor> dw) {
  c10::cuda::CUDAGuard guard(x.device());
  // y = x w^T: grad x += g_y w;  dy = x dw^T + dx w^T + db
  at::Tensor grad_x = dw.has_value() ? at::mm(g_dy, *dw) : at::zeros_like(x);
  if (g_y.has_value()) grad_x.addmm_(*g_y, w);
  auto grad_dx = at::mm(g_dy, w);
  auto grad_dw = at::mm(g_dy.t(), x);
  auto grad_db = g_dy.sum(0);
  return {grad_x, grad_dx, grad_dw, grad_db};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastortho, m) {
  m.def("ortho_penalty_grouped(Tensor[] weights, Tensor[] bases, bool squared) -> (Tensor, Tensor[])");
  m.def("dual_linear(Tensor x, Tensor? dx, Tensor w, Tensor? dw, Tensor? b, Tensor? db) -> (Tensor, Tensor)");
  m.def("dual_linear_backward(Tensor? g_y, Tensor g_dy, Tensor x, Tensor? dx, Tensor w, Tensor? dw) -> "
        "(Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastortho, CUDA, m) {
  m.impl("ortho_penalty_grouped", &ortho_penalty_grouped);
  m.impl("dual_linear", &dual_linear);
  m.impl("dual_linear_backward", &dual_linear_backward);
}
