// CUDA registrations of the pooling operators: the ATen side (device guard, current stream, error
// checks); the arithmetic lives in pool_kernel.cu.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../pool.h"
#include "pool_kernel.h"

namespace lightning_vis {
namespace {

gpu::Dtype dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return gpu::Dtype::F32;
    case at::kDouble: return gpu::Dtype::F64;
    case at::kHalf: return gpu::Dtype::F16;
    case at::kBFloat16: return gpu::Dtype::BF16;
    default: TORCH_CHECK(false, "lightning_vis CUDA kernels: unsupported dtype ", t.scalar_type());
  }
}

gpu::SwitchDtype switch_dtype_of(const at::Tensor& t) {
  return t.scalar_type() == at::kByte ? gpu::SwitchDtype::U8 : gpu::SwitchDtype::I32;
}

void pool_cuda_kernel(const PoolGeom& g, const at::Tensor& x, at::Tensor& values, at::Tensor& switches) {
  c10::cuda::CUDAGuard guard(x.device());
  C10_CUDA_CHECK(gpu::launch_pool(g, dtype_of(x), switch_dtype_of(switches), x.const_data_ptr(),
                                  values.mutable_data_ptr(), switches.mutable_data_ptr(),
                                  at::cuda::getCurrentCUDAStream()));
}

void unpool_cuda_kernel(const PoolGeom& g, const at::Tensor& values, const at::Tensor& switches, at::Tensor& out) {
  c10::cuda::CUDAGuard guard(values.device());
  C10_CUDA_CHECK(gpu::launch_unpool(g, dtype_of(values), switch_dtype_of(switches), values.const_data_ptr(),
                                    switches.const_data_ptr(), out.mutable_data_ptr(),
                                    at::cuda::getCurrentCUDAStream()));
}

void gather_cuda_kernel(const PoolGeom& g, const at::Tensor& grad, const at::Tensor& switches, at::Tensor& out) {
  c10::cuda::CUDAGuard guard(grad.device());
  C10_CUDA_CHECK(gpu::launch_gather(g, dtype_of(grad), switch_dtype_of(switches), grad.const_data_ptr(),
                                    switches.const_data_ptr(), out.mutable_data_ptr(),
                                    at::cuda::getCurrentCUDAStream()));
}

std::tuple<at::Tensor, at::Tensor> max_pool_with_switches_cuda(const at::Tensor& x, at::IntArrayRef k,
                                                               at::IntArrayRef s, at::IntArrayRef p,
                                                               at::IntArrayRef d, bool ceil_mode) {
  return max_pool_with_switches_impl(x, k, s, p, d, ceil_mode, pool_cuda_kernel);
}

at::Tensor unpool_cuda(const at::Tensor& values, const at::Tensor& switches, at::IntArrayRef k, at::IntArrayRef s,
                       at::IntArrayRef p, at::IntArrayRef d, at::IntArrayRef output_size) {
  return unpool_impl(values, switches, k, s, p, d, output_size, unpool_cuda_kernel);
}

at::Tensor gather_switches_cuda(const at::Tensor& grad, const at::Tensor& switches, at::IntArrayRef k,
                                at::IntArrayRef s, at::IntArrayRef p, at::IntArrayRef d) {
  return gather_switches_impl(grad, switches, k, s, p, d, gather_cuda_kernel);
}

}  // namespace

TORCH_LIBRARY_IMPL(lightning_vis, CUDA, m) {
  m.impl("max_pool_with_switches", &max_pool_with_switches_cuda);
  m.impl("unpool", &unpool_cuda);
  m.impl("gather_switches", &gather_switches_cuda);
}

}  // namespace lightning_vis
