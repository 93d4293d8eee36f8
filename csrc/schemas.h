// The operator schemas, defined once: lightning_vis._C registers them in the lightning_vis namespace (ops.cpp), the
// test-only CUDA simulator (sim/cuda_sim.cpp) in its own.
#pragma once
#include <torch/library.h>

namespace lightning_vis {

inline void define_schemas(torch::Library& m) {
  m.def(
      "max_pool_with_switches(Tensor self, int[] kernel_size, int[] stride, int[] padding, int[] dilation, "
      "bool ceil_mode) -> (Tensor values, Tensor switches)");
  m.def(
      "unpool(Tensor values, Tensor switches, int[] kernel_size, int[] stride, int[] padding, int[] dilation, "
      "int[] output_size) -> Tensor");
  m.def(
      "gather_switches(Tensor grad, Tensor switches, int[] kernel_size, int[] stride, int[] padding, "
      "int[] dilation) -> Tensor");
  m.def("fft_image(Tensor spectrum, Tensor scale, Tensor color, int[] size, bool sigmoid) -> Tensor");
  m.def(
      "fft_image_backward(Tensor grad, Tensor out, Tensor scale, Tensor color, int[] size, bool sigmoid) -> "
      "Tensor");
  // ROAD's imputer (CPU only: on other devices the pure-torch solver of lightning_vis.metrics runs, batched)
  m.def("impute(Tensor images, Tensor known, float tol, int max_iter) -> Tensor");
}

}  // namespace lightning_vis
