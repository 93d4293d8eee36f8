// Operator schemas of the lightning_vis library, and the Python module lightning_vis._C.
// Importing lightning_vis._C registers the schemas and every backend compiled into it.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "schemas.h"

TORCH_LIBRARY(lightning_vis, m) { lightning_vis::define_schemas(m); }

namespace {
std::vector<std::string> backends() {
  std::vector<std::string> b{"cpu"};
#ifdef LIGHTNING_VIS_WITH_CUDA
  b.push_back("cuda");
#endif
  return b;
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lightning-vis compiled kernels (operators live in torch.ops.lightning_vis)";
  m.def("backends", &backends, "Backends compiled into this build, e.g. ['cpu', 'cuda'].");
#ifdef LIGHTNING_VIS_CUDA_VERSION
  m.attr("cuda_version") = LIGHTNING_VIS_CUDA_VERSION;
#else
  m.attr("cuda_version") = pybind11::none();
#endif
}
