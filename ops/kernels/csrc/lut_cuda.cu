// The LUT op on CUDA as one C++ operator with its own autograd (gqa_lut_cuda::lut), and the
// fake quantizers of ops/fake_quant.py likewise (`tqt`, `weight_fake_quant`, below the LUT's).
//
// Why C++ and not only the Triton kernels (ops/triton_lut.py): at 2^24 bfloat16 elements a
// kernel takes ~20 us of GPU time, less than the host spends on one Python autograd.Function
// call plus a Triton launch (~30-50 us forward, ~250 us forward+backward, bench/lut_host_cost.py).
// Here the forward, the saved tensors and the backward are C++: one pybind11 call from Python
// (`lut`, for eager calls: cheaper than the dispatcher's boxed call), a C++ autograd node where
// a gradient is wanted, two kernel launches. The same function is also the operator
// gqa_lut_cuda::lut (dispatcher, autograd and inference mode). The arithmetic is the Triton kernels',
// operation for operation, so the forward is bit-identical to them and to the CPU path, and the
// backward uses the same CUDA math library (erff, expf, tanhf, rsqrtf).
//
// Forward: x * 2^d in float32 (exact), NaN -> 0, round half to even, clamp to [qmin, qmax],
// then the expanded table's real (row `index`). Backward: grad * g(x) inside the representable
// range and 0 outside it; g is the exact function's derivative named by `kind`
// (ops/registry.py's numbers, given to nvcc as -DGQA_D_<NAME>) or, for GQA_D_SLOPE, the slope
// of the code's segment.
//
// Memory access: 16 bytes per thread per load/store (4 float32 or 8 half/bfloat16) when every
// pointer is 16-byte aligned, element by element otherwise. Strided (non-dense) inputs are
// made contiguous first; dense ones in any layout (channels-last) keep it.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <utility>

namespace {

constexpr int THREADS = 256;

// float32, float16 and bfloat16 only: float64 keeps its own (float64) torch path
#define GQA_DISPATCH(TYPE, NAME, ...)                                                      \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                 \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)              \
                                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

template <typename T>
__device__ __forceinline__ float to_float(T v) {
  return static_cast<float>(v);
}

__device__ __forceinline__ float quantized(float x, float scale, int qmin, int qmax) {
  float v = x * scale;
  v = (v == v) ? v : 0.0f;
  return fminf(fmaxf(rintf(v), static_cast<float>(qmin)), static_cast<float>(qmax));
}

__device__ __forceinline__ float lut_value(float x, float scale, const float* __restrict__ row, int qmin, int qmax) {
  return __ldg(row + static_cast<int>(quantized(x, scale, qmin, qmax) - static_cast<float>(qmin)));
}

// ops.kernels.triton_lut._derivative, case for case
__device__ __forceinline__ float derivative(int kind, float xi, float xs, const int32_t* __restrict__ bp, int nbp,
                                            const float* __restrict__ slopes, int qmin, int qmax) {
  switch (kind) {
    case GQA_D_SLOPE: {
      const int code = static_cast<int>(quantized(xs, 1.0f, qmin, qmax));
      int seg = 0;
      for (int j = 0; j < nbp; ++j) seg += (__ldg(bp + j) < code) ? 1 : 0;
      return __ldg(slopes + seg);
    }
    case GQA_D_GELU:
      return 0.5f * (1.0f + erff(xi * 0.7071067811865476f)) + xi * expf(-0.5f * xi * xi) * 0.3989422804014327f;
    case GQA_D_GELU_TANH: {
      const float t = tanhf(0.7978845608028654f * (xi + 0.044715f * xi * xi * xi));
      return 0.5f * (1.0f + t) + 0.5f * xi * (1.0f - t * t) * 0.7978845608028654f * (1.0f + 3.0f * 0.044715f * xi * xi);
    }
    case GQA_D_SWISH: {
      const float sg = 1.0f / (1.0f + expf(-xi));
      return sg * (1.0f + xi * (1.0f - sg));
    }
    case GQA_D_HSWISH:
      return xi <= -3.0f ? 0.0f : (xi >= 3.0f ? 1.0f : (2.0f * xi + 3.0f) / 6.0f);
    case GQA_D_HSIGMOID:
      return (xi > -3.0f && xi < 3.0f) ? 1.0f / 6.0f : 0.0f;
    case GQA_D_SIGMOID: {
      const float sg = 1.0f / (1.0f + expf(-xi));
      return sg * (1.0f - sg);
    }
    case GQA_D_TANH: {
      const float th = tanhf(xi);
      return 1.0f - th * th;
    }
    case GQA_D_SOFTPLUS:
      return 1.0f / (1.0f + expf(-xi));
    case GQA_D_EXP:
      return expf(xi);
    case GQA_D_DECAY:
      return -expf(-xi);
    case GQA_D_RSQRT:
      return -0.5f * rsqrtf(xi) / xi;
    case GQA_D_RECIPROCAL:
      return -1.0f / (xi * xi);
    default:  // no derivative of that number: ops/registry.py lists them
      return __int_as_float(0x7fc00000);
  }
}

__device__ __forceinline__ float grad_value(float g, float x, float scale, int kind, const int32_t* __restrict__ bp,
                                            int nbp, const float* __restrict__ slopes, int qmin, int qmax) {
  const float xs = x * scale;
  const bool inside = (xs >= static_cast<float>(qmin) - 0.5f) && (xs <= static_cast<float>(qmax) + 0.5f);
  const float der = derivative(kind, inside ? x : 0.0f, xs, bp, nbp, slopes, qmin, qmax);
  return inside ? g * der : 0.0f;
}

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// one thread: VEC consecutive elements (VEC = 1 is the unaligned path)
template <typename T, int VEC>
__global__ void lut_forward_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t n,
                                   const float* __restrict__ table, const int64_t* __restrict__ index,
                                   const int64_t* __restrict__ d, int qmin, int qmax) {
  const float* row = table + index[0] * static_cast<int64_t>(qmax - qmin + 1);
  const float scale = ldexpf(1.0f, static_cast<int>(d[0]));
  const int64_t i = (static_cast<int64_t>(blockIdx.x) * THREADS + threadIdx.x) * VEC;
  if (i + VEC <= n) {
    Pack<T, VEC> p = *reinterpret_cast<const Pack<T, VEC>*>(x + i);
#pragma unroll
    for (int j = 0; j < VEC; ++j) p.v[j] = static_cast<T>(lut_value(to_float(p.v[j]), scale, row, qmin, qmax));
    *reinterpret_cast<Pack<T, VEC>*>(y + i) = p;
  } else {
    for (int64_t k = i; k < n; ++k) y[k] = static_cast<T>(lut_value(to_float(x[k]), scale, row, qmin, qmax));
  }
}

template <typename T, int VEC>
__global__ void lut_backward_kernel(const T* __restrict__ g, const T* __restrict__ x, T* __restrict__ gx, int64_t n,
                                    const int64_t* __restrict__ index, const int64_t* __restrict__ d,
                                    const int32_t* __restrict__ breakpoints, int nbp,
                                    const float* __restrict__ slopes, int qmin, int qmax, int kind) {
  const int32_t* bp = breakpoints + index[0] * static_cast<int64_t>(nbp);
  const float scale = ldexpf(1.0f, static_cast<int>(d[0]));
  const int64_t i = (static_cast<int64_t>(blockIdx.x) * THREADS + threadIdx.x) * VEC;
  if (i + VEC <= n) {
    const Pack<T, VEC> pg = *reinterpret_cast<const Pack<T, VEC>*>(g + i);
    Pack<T, VEC> px = *reinterpret_cast<const Pack<T, VEC>*>(x + i);
#pragma unroll
    for (int j = 0; j < VEC; ++j)
      px.v[j] = static_cast<T>(grad_value(to_float(pg.v[j]), to_float(px.v[j]), scale, kind, bp, nbp, slopes, qmin,
                                          qmax));
    *reinterpret_cast<Pack<T, VEC>*>(gx + i) = px;
  } else {
    for (int64_t k = i; k < n; ++k)
      gx[k] = static_cast<T>(grad_value(to_float(g[k]), to_float(x[k]), scale, kind, bp, nbp, slopes, qmin, qmax));
  }
}

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

int64_t blocks_for(int64_t n, int vec) { return (n + static_cast<int64_t>(THREADS) * vec - 1) / (THREADS * vec); }

// dense in some layout: elementwise work may walk its memory as a flat array
at::Tensor dense(const at::Tensor& t) { return t.is_non_overlapping_and_dense() ? t : t.contiguous(); }

// a backward's two inputs in one layout (x's, where the gradient has it; else both contiguous),
// the gradient in x's dtype
std::pair<at::Tensor, at::Tensor> one_layout(const at::Tensor& grad, const at::Tensor& x_in) {
  at::Tensor x = dense(x_in);
  at::Tensor g = grad.to(x.scalar_type());
  if (g.strides() != x.strides() || !g.is_non_overlapping_and_dense()) return {x.contiguous(), g.contiguous()};
  return {x, g};
}

// launch(std::integral_constant<int, V>{}): V = the elements of T in 16 bytes where every
// pointer is 16-byte aligned, 1 (element by element) otherwise
template <typename T, typename Launch>
void by_width(bool aligned, Launch&& launch) {
  if (aligned)
    launch(std::integral_constant<int, static_cast<int>(16 / sizeof(T))>{});
  else
    launch(std::integral_constant<int, 1>{});
}

void check_scalars(const at::Tensor& x, const at::Tensor& index, const at::Tensor& d) {
  TORCH_CHECK(x.is_cuda(), "gqa_lut_cuda::lut: x must be a CUDA tensor, got ", x.device());
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16,
              "gqa_lut_cuda::lut: x must be float32, float16 or bfloat16, got ", t);
  TORCH_CHECK(index.scalar_type() == at::kLong && index.numel() == 1 && index.device() == x.device(),
              "gqa_lut_cuda::lut: index must be one int64 on x's device");
  TORCH_CHECK(d.scalar_type() == at::kLong && d.numel() == 1 && d.device() == x.device(),
              "gqa_lut_cuda::lut: d must be one int64 on x's device");
}

at::Tensor lut_forward_cuda(const at::Tensor& x_in, const at::Tensor& table, const at::Tensor& index,
                            const at::Tensor& d, int64_t qmin, int64_t qmax) {
  check_scalars(x_in, index, d);
  TORCH_CHECK(table.scalar_type() == at::kFloat && table.is_contiguous() && table.device() == x_in.device(),
              "gqa_lut_cuda::lut: table must be contiguous float32 on x's device");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = dense(x_in);
  at::Tensor y = at::empty_like(x);
  const int64_t n = x.numel();
  if (n == 0) return y;
  auto stream = at::cuda::getCurrentCUDAStream();
  GQA_DISPATCH(x.scalar_type(), "gqa_lut_cuda_forward", [&] {
    by_width<scalar_t>(aligned16(x) && aligned16(y), [&](auto width) {
      constexpr int V = decltype(width)::value;
      lut_forward_kernel<scalar_t, V><<<blocks_for(n, V), THREADS, 0, stream>>>(
          x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), n, table.data_ptr<float>(), index.data_ptr<int64_t>(),
          d.data_ptr<int64_t>(), static_cast<int>(qmin), static_cast<int>(qmax));
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

at::Tensor lut_backward_cuda(const at::Tensor& grad, const at::Tensor& x_in, const at::Tensor& slopes,
                             const at::Tensor& breakpoints, const at::Tensor& index, const at::Tensor& d,
                             int64_t qmin, int64_t qmax, int64_t kind) {
  check_scalars(x_in, index, d);
  TORCH_CHECK(slopes.scalar_type() == at::kFloat && slopes.is_contiguous(), "gqa_lut_cuda::lut: slopes float32");
  TORCH_CHECK(breakpoints.scalar_type() == at::kInt && breakpoints.is_contiguous() && breakpoints.dim() == 2,
              "gqa_lut_cuda::lut: breakpoints must be contiguous int32 (scales, count)");
  const c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor x, g;
  std::tie(x, g) = one_layout(grad, x_in);
  at::Tensor gx = at::empty_like(x);
  const int64_t n = x.numel();
  if (n == 0) return gx;
  const int nbp = static_cast<int>(breakpoints.size(1));
  auto stream = at::cuda::getCurrentCUDAStream();
  GQA_DISPATCH(x.scalar_type(), "gqa_lut_cuda_backward", [&] {
    by_width<scalar_t>(aligned16(g) && aligned16(x) && aligned16(gx), [&](auto width) {
      constexpr int V = decltype(width)::value;
      lut_backward_kernel<scalar_t, V><<<blocks_for(n, V), THREADS, 0, stream>>>(
          g.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), gx.data_ptr<scalar_t>(), n, index.data_ptr<int64_t>(),
          d.data_ptr<int64_t>(), breakpoints.data_ptr<int32_t>(), nbp, slopes.data_ptr<float>(),
          static_cast<int>(qmin), static_cast<int>(qmax), static_cast<int>(kind));
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return gx;
}

class LutFunction : public torch::autograd::Function<LutFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& table,
                            const at::Tensor& slopes, const at::Tensor& breakpoints, const at::Tensor& index,
                            const at::Tensor& d, int64_t qmin, int64_t qmax, int64_t kind) {
    ctx->save_for_backward({x, slopes, breakpoints, index, d});
    ctx->saved_data["qmin"] = qmin;
    ctx->saved_data["qmax"] = qmax;
    ctx->saved_data["kind"] = kind;
    return lut_forward_cuda(x, table, index, d, qmin, qmax);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto s = ctx->get_saved_variables();
    at::Tensor gx = lut_backward_cuda(grads[0], s[0], s[1], s[2], s[3], s[4], ctx->saved_data["qmin"].toInt(),
                                      ctx->saved_data["qmax"].toInt(), ctx->saved_data["kind"].toInt());
    return {gx, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

at::Tensor lut_autograd(const at::Tensor& x, const at::Tensor& table, const at::Tensor& slopes,
                        const at::Tensor& breakpoints, const at::Tensor& index, const at::Tensor& d, int64_t qmin,
                        int64_t qmax, int64_t kind) {
  return LutFunction::apply(x, table, slopes, breakpoints, index, d, qmin, qmax, kind);
}

at::Tensor lut_no_autograd(const at::Tensor& x, const at::Tensor& table, const at::Tensor& slopes,
                           const at::Tensor& breakpoints, const at::Tensor& index, const at::Tensor& d, int64_t qmin,
                           int64_t qmax, int64_t kind) {
  return lut_forward_cuda(x, table, index, d, qmin, qmax);
}

// --- TQT activation fake-quant (ops/triton_quant.py's kernels, operation for operation) --------
//
// Forward: d = clamp((bits - 1) - ceil(log2 t), dmin, dmax) read on the device (no host sync),
// y = clamp(rint(x * 2^d)) * 2^-d with NaN -> 0; d is an output too. Backward: the input's
// straight-through gradient (grad inside [qmin, qmax] after scaling, 0 outside) and, in the same
// pass, each block's share of the threshold's gradient, sum(grad * 2^-d * ln 2 * (inside ? q - v : q)),
// summed after by torch (another order of additions than the CPU path: equal within rounding).

__device__ __forceinline__ float tqt_d(const float* __restrict__ log2t, int bits, int dmin, int dmax) {
  const float d = static_cast<float>(bits - 1) - ceilf(log2t[0]);
  return fminf(fmaxf(d, static_cast<float>(dmin)), static_cast<float>(dmax));
}

template <typename T, int VEC>
__global__ void tqt_forward_kernel(const T* __restrict__ x, T* __restrict__ y, float* __restrict__ d_out, int64_t n,
                                   const float* __restrict__ log2t, int bits, int dmin, int dmax) {
  const float d = tqt_d(log2t, bits, dmin, dmax);
  if (blockIdx.x == 0 && threadIdx.x == 0) d_out[0] = d;
  const float up = ldexpf(1.0f, static_cast<int>(d)), down = ldexpf(1.0f, -static_cast<int>(d));
  const float qmin = -static_cast<float>(1 << (bits - 1)), qmax = static_cast<float>((1 << (bits - 1)) - 1);
  const int64_t i = (static_cast<int64_t>(blockIdx.x) * THREADS + threadIdx.x) * VEC;
  auto fq = [&](float v) {
    v = (v == v) ? v : 0.0f;
    return fminf(fmaxf(rintf(v * up), qmin), qmax) * down;
  };
  if (i + VEC <= n) {
    Pack<T, VEC> p = *reinterpret_cast<const Pack<T, VEC>*>(x + i);
#pragma unroll
    for (int j = 0; j < VEC; ++j) p.v[j] = static_cast<T>(fq(to_float(p.v[j])));
    *reinterpret_cast<Pack<T, VEC>*>(y + i) = p;
  } else {
    for (int64_t k = i; k < n; ++k) y[k] = static_cast<T>(fq(to_float(x[k])));
  }
}

__device__ __forceinline__ float block_sum(float v) {
  __shared__ float warp_sums[THREADS / 32];
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = v;
  __syncthreads();
  v = 0.0f;
  if (threadIdx.x < 32) {
    v = threadIdx.x < THREADS / 32 ? warp_sums[threadIdx.x] : 0.0f;
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  }
  return v;  // the block's sum, in thread 0
}

template <typename T, int VEC>
__global__ void tqt_backward_kernel(const T* __restrict__ g, const T* __restrict__ x, T* __restrict__ gx,
                                    const float* __restrict__ d_ptr, float* __restrict__ part, int64_t n, int bits) {
  const float d = d_ptr[0];
  const float up = ldexpf(1.0f, static_cast<int>(d)), down = ldexpf(1.0f, -static_cast<int>(d));
  const float qmin = -static_cast<float>(1 << (bits - 1)), qmax = static_cast<float>((1 << (bits - 1)) - 1);
  const int64_t i = (static_cast<int64_t>(blockIdx.x) * THREADS + threadIdx.x) * VEC;
  float share = 0.0f;
  auto one = [&](T gv, T xv) -> T {
    float xf = to_float(xv);
    const float v = ((xf == xf) ? xf : 0.0f) * up;
    const float q = fminf(fmaxf(rintf(v), qmin), qmax);
    const bool inside = (v >= qmin) && (v <= qmax);
    share += to_float(gv) * down * 0.6931471805599453f * (inside ? q - v : q);
    return inside ? gv : static_cast<T>(0.0f);
  };
  if (i + VEC <= n) {
    const Pack<T, VEC> pg = *reinterpret_cast<const Pack<T, VEC>*>(g + i);
    Pack<T, VEC> px = *reinterpret_cast<const Pack<T, VEC>*>(x + i);
#pragma unroll
    for (int j = 0; j < VEC; ++j) px.v[j] = one(pg.v[j], px.v[j]);
    *reinterpret_cast<Pack<T, VEC>*>(gx + i) = px;
  } else {
    for (int64_t k = i; k < n; ++k) gx[k] = one(g[k], x[k]);
  }
  const float total = block_sum(share);
  if (threadIdx.x == 0) part[blockIdx.x] = total;
}

std::tuple<at::Tensor, at::Tensor> tqt_forward_cuda(const at::Tensor& x_in, const at::Tensor& log2t_in, int64_t bits,
                                                    int64_t dmin, int64_t dmax) {
  TORCH_CHECK(x_in.is_cuda() && log2t_in.numel() == 1 && log2t_in.device() == x_in.device(),
              "gqa_lut_cuda::tqt: x on CUDA, one log2 threshold on its device");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = dense(x_in);
  const at::Tensor log2t = log2t_in.scalar_type() == at::kFloat ? log2t_in : log2t_in.to(at::kFloat);
  at::Tensor y = at::empty_like(x);
  at::Tensor d = at::empty({}, x.options().dtype(at::kFloat));
  const int64_t n = x.numel();
  auto stream = at::cuda::getCurrentCUDAStream();
  GQA_DISPATCH(x.scalar_type(), "gqa_lut_cuda_tqt_forward", [&] {
    by_width<scalar_t>(aligned16(x) && aligned16(y), [&](auto width) {
      constexpr int V = decltype(width)::value;  // at least one block: it writes d
      tqt_forward_kernel<scalar_t, V><<<std::max<int64_t>(1, blocks_for(n, V)), THREADS, 0, stream>>>(
          x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), d.data_ptr<float>(), n, log2t.data_ptr<float>(),
          static_cast<int>(bits), static_cast<int>(dmin), static_cast<int>(dmax));
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {y, d};
}

std::tuple<at::Tensor, at::Tensor> tqt_backward_cuda(const at::Tensor& grad, const at::Tensor& x_in,
                                                     const at::Tensor& d, int64_t bits) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor x, g;
  std::tie(x, g) = one_layout(grad, x_in);
  at::Tensor gx = at::empty_like(x);
  const int64_t n = x.numel();
  auto stream = at::cuda::getCurrentCUDAStream();
  at::Tensor part;
  GQA_DISPATCH(x.scalar_type(), "gqa_lut_cuda_tqt_backward", [&] {
    by_width<scalar_t>(aligned16(g) && aligned16(x) && aligned16(gx), [&](auto width) {
      constexpr int V = decltype(width)::value;
      const int64_t blocks = std::max<int64_t>(1, blocks_for(n, V));  // one per share of the sum
      part = at::empty({blocks}, x.options().dtype(at::kFloat));
      tqt_backward_kernel<scalar_t, V><<<blocks, THREADS, 0, stream>>>(
          g.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), gx.data_ptr<scalar_t>(), d.data_ptr<float>(),
          part.data_ptr<float>(), n, static_cast<int>(bits));
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {gx, part.sum()};
}

class TqtFunction : public torch::autograd::Function<TqtFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                                                const at::Tensor& log2t, int64_t bits, int64_t dmin, int64_t dmax) {
    auto [y, d] = tqt_forward_cuda(x, log2t, bits, dmin, dmax);
    ctx->save_for_backward({x, d});
    ctx->saved_data["bits"] = bits;
    ctx->saved_data["log2_dtype"] = static_cast<int64_t>(log2t.scalar_type());
    ctx->mark_non_differentiable({d});
    return {y, d};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto s = ctx->get_saved_variables();
    at::Tensor gy = grads[0].defined() ? grads[0] : at::zeros_like(s[0]);
    auto [gx, gt] = tqt_backward_cuda(gy, s[0], s[1], ctx->saved_data["bits"].toInt());
    const auto dtype = static_cast<at::ScalarType>(ctx->saved_data["log2_dtype"].toInt());
    return {gx, gt.to(dtype), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> tqt_eager(const at::Tensor& x, const at::Tensor& log2t, int64_t bits, int64_t dmin,
                                             int64_t dmax) {
  if (at::GradMode::is_enabled() && (x.requires_grad() || log2t.requires_grad())) {
    auto out = TqtFunction::apply(x, log2t, bits, dmin, dmax);
    return {out[0], out[1]};
  }
  return tqt_forward_cuda(x, log2t, bits, dmin, dmax);
}

// --- per-output-channel weight fake-quant: max |w| / qmax per row, IEEE division, straight-through

__global__ void weight_fq_kernel_f32(const float* __restrict__ w, float* __restrict__ y, int64_t k, float qmax) {
  const float* row = w + static_cast<int64_t>(blockIdx.x) * k;
  float* out = y + static_cast<int64_t>(blockIdx.x) * k;
  float amax = 0.0f;
  for (int64_t j = threadIdx.x; j < k; j += THREADS) amax = fmaxf(amax, fabsf(row[j]));
  __shared__ float warp_max[THREADS / 32];
  for (int off = 16; off > 0; off >>= 1) amax = fmaxf(amax, __shfl_down_sync(0xffffffffu, amax, off));
  if ((threadIdx.x & 31) == 0) warp_max[threadIdx.x >> 5] = amax;
  __syncthreads();
  __shared__ float scale_s;
  if (threadIdx.x == 0) {
    float m = 0.0f;
    for (int i = 0; i < THREADS / 32; ++i) m = fmaxf(m, warp_max[i]);
    scale_s = __fdiv_rn(fmaxf(m, 1e-12f), qmax);
  }
  __syncthreads();
  const float scale = scale_s;
  for (int64_t j = threadIdx.x; j < k; j += THREADS)
    out[j] = fminf(fmaxf(rintf(__fdiv_rn(row[j], scale)), -qmax - 1.0f), qmax) * scale;
}

at::Tensor weight_fq_cuda(const at::Tensor& w_in, int64_t bits) {
  const c10::cuda::CUDAGuard guard(w_in.device());
  const at::Tensor w = w_in.contiguous();
  at::Tensor y = at::empty_like(w);
  const int64_t rows = w.size(0), k = rows ? w.numel() / rows : 0;
  if (rows && k)
    weight_fq_kernel_f32<<<rows, THREADS, 0, at::cuda::getCurrentCUDAStream()>>>(
        w.data_ptr<float>(), y.data_ptr<float>(), k, static_cast<float>((1 << (bits - 1)) - 1));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

class WeightFqFunction : public torch::autograd::Function<WeightFqFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& w, int64_t bits) {
    return weight_fq_cuda(w, bits);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    return {grads[0], at::Tensor()};  // straight-through
  }
};

at::Tensor weight_fq_eager(const at::Tensor& w, int64_t bits) {
  TORCH_CHECK(w.is_cuda() && w.scalar_type() == at::kFloat && w.dim() == 2,
              "gqa_lut_cuda::weight_fake_quant: a 2-D float32 CUDA weight");
  if (at::GradMode::is_enabled() && w.requires_grad()) return WeightFqFunction::apply(w, bits);
  return weight_fq_cuda(w, bits);
}

// the eager entry: the autograd node only where a gradient will be asked for
at::Tensor lut_eager(const at::Tensor& x, const at::Tensor& table, const at::Tensor& slopes,
                     const at::Tensor& breakpoints, const at::Tensor& index, const at::Tensor& d, int64_t qmin,
                     int64_t qmax, int64_t kind) {
  if (x.requires_grad() && at::GradMode::is_enabled())
    return LutFunction::apply(x, table, slopes, breakpoints, index, d, qmin, qmax, kind);
  return lut_forward_cuda(x, table, index, d, qmin, qmax);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lut", &lut_eager, "table value of x with the straight-through backward (ops/cuda_kernel.py)");
  m.def("tqt", &tqt_eager, "(x fake-quantized at 2^-d, d) with TQT's gradients (ops/fake_quant.py)");
  m.def("weight_fake_quant", &weight_fq_eager, "per-output-channel weight fake-quant, straight-through");
}

TORCH_LIBRARY(gqa_lut_cuda, m) {
  m.def("lut(Tensor x, Tensor table, Tensor slopes, Tensor breakpoints, Tensor index, Tensor d, int qmin, int qmax, "
        "int kind) -> Tensor");
  m.def("lut_backward(Tensor grad, Tensor x, Tensor slopes, Tensor breakpoints, Tensor index, Tensor d, int qmin, "
        "int qmax, int kind) -> Tensor");
}

TORCH_LIBRARY_IMPL(gqa_lut_cuda, CUDA, m) {
  m.impl("lut", &lut_no_autograd);
  m.impl("lut_backward", &lut_backward_cuda);
}

TORCH_LIBRARY_IMPL(gqa_lut_cuda, Autograd, m) { m.impl("lut", &lut_autograd); }
