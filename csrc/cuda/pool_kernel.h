// Launchers of the CUDA pooling kernels. Plain types only: pool_kernel.cu includes no torch header.
#pragma once
#include <cuda_runtime.h>

#include "../pool_geometry.h"

namespace lightning_vis {
namespace gpu {

// All pointers are dense tensors in the layout given by g.channels_last; every launch is asynchronous on
// `stream` and returns the launch error, if any.
cudaError_t launch_pool(const PoolGeom& g, Dtype dt, SwitchDtype st, const void* x, void* values, void* switches,
                        cudaStream_t stream);
cudaError_t launch_unpool(const PoolGeom& g, Dtype dt, SwitchDtype st, const void* values, const void* switches,
                          void* out, cudaStream_t stream);
cudaError_t launch_gather(const PoolGeom& g, Dtype dt, SwitchDtype st, const void* grad, const void* switches,
                          void* out, cudaStream_t stream);

}  // namespace gpu
}  // namespace lightning_vis
