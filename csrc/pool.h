// The framework-facing side of the pooling operators: argument checks, layouts, allocation.
// Backends (cpu/, cuda/) implement only the arithmetic on tensors prepared here.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <tuple>

#include "pool_geometry.h"

namespace lightning_vis {

// Kernels receive dense tensors in the layout given by geom.channels_last.
using PoolKernel = void (*)(const PoolGeom&, const at::Tensor& x, at::Tensor& values, at::Tensor& switches);
using UnpoolKernel = void (*)(const PoolGeom&, const at::Tensor& values, const at::Tensor& switches, at::Tensor& out);
using GatherKernel = void (*)(const PoolGeom&, const at::Tensor& grad, const at::Tensor& switches, at::Tensor& out);

std::tuple<at::Tensor, at::Tensor> max_pool_with_switches_impl(
    const at::Tensor& x, at::IntArrayRef kernel, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, bool ceil_mode, PoolKernel kernel_fn);

at::Tensor unpool_impl(const at::Tensor& values, const at::Tensor& switches, at::IntArrayRef kernel,
                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                       at::IntArrayRef output_size, UnpoolKernel kernel_fn);

at::Tensor gather_switches_impl(const at::Tensor& grad, const at::Tensor& switches, at::IntArrayRef kernel,
                                at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                GatherKernel kernel_fn);

// The GPU kernels' element types (pool_geometry.h) of a data tensor and of a switches tensor.
gpu::Dtype gpu_dtype(const at::Tensor& t);
gpu::SwitchDtype gpu_switch_dtype(const at::Tensor& switches);

// The operator functions a backend registers: `m.impl("unpool", &unpool_op<my_unpool_kernel>)`.
template <PoolKernel K>
std::tuple<at::Tensor, at::Tensor> pool_op(const at::Tensor& x, at::IntArrayRef k, at::IntArrayRef s,
                                           at::IntArrayRef p, at::IntArrayRef d, bool ceil_mode) {
  return max_pool_with_switches_impl(x, k, s, p, d, ceil_mode, K);
}

template <UnpoolKernel K>
at::Tensor unpool_op(const at::Tensor& values, const at::Tensor& switches, at::IntArrayRef k, at::IntArrayRef s,
                     at::IntArrayRef p, at::IntArrayRef d, at::IntArrayRef output_size) {
  return unpool_impl(values, switches, k, s, p, d, output_size, K);
}

template <GatherKernel K>
at::Tensor gather_op(const at::Tensor& grad, const at::Tensor& switches, at::IntArrayRef k, at::IntArrayRef s,
                     at::IntArrayRef p, at::IntArrayRef d) {
  return gather_switches_impl(grad, switches, k, s, p, d, K);
}

}  // namespace lightning_vis
