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

void pool_cuda_kernel(const PoolGeom& g, const at::Tensor& x, at::Tensor& values, at::Tensor& switches) {
  c10::cuda::CUDAGuard guard(x.device());
  C10_CUDA_CHECK(gpu::launch_pool(g, gpu_dtype(x), gpu_switch_dtype(switches), x.const_data_ptr(),
                                  values.mutable_data_ptr(), switches.mutable_data_ptr(),
                                  at::cuda::getCurrentCUDAStream()));
}

void unpool_cuda_kernel(const PoolGeom& g, const at::Tensor& values, const at::Tensor& switches, at::Tensor& out) {
  c10::cuda::CUDAGuard guard(values.device());
  C10_CUDA_CHECK(gpu::launch_unpool(g, gpu_dtype(values), gpu_switch_dtype(switches), values.const_data_ptr(),
                                    switches.const_data_ptr(), out.mutable_data_ptr(),
                                    at::cuda::getCurrentCUDAStream()));
}

void gather_cuda_kernel(const PoolGeom& g, const at::Tensor& grad, const at::Tensor& switches, at::Tensor& out) {
  c10::cuda::CUDAGuard guard(grad.device());
  C10_CUDA_CHECK(gpu::launch_gather(g, gpu_dtype(grad), gpu_switch_dtype(switches), grad.const_data_ptr(),
                                    switches.const_data_ptr(), out.mutable_data_ptr(),
                                    at::cuda::getCurrentCUDAStream()));
}

}  // namespace

TORCH_LIBRARY_IMPL(lightning_vis, CUDA, m) {
  m.impl("max_pool_with_switches", &pool_op<pool_cuda_kernel>);
  m.impl("unpool", &unpool_op<unpool_cuda_kernel>);
  m.impl("gather_switches", &gather_op<gather_cuda_kernel>);
}

}  // namespace lightning_vis
