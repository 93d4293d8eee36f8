// GPU launches of the pooling kernels: the bodies and the planner are pool_bodies.h (shared with the simulator).
#include "launch.h"
#include "pool_bodies.h"
#include "pool_kernel.h"

namespace lightning_vis {
namespace gpu {

cudaError_t launch_pool(const PoolGeom& g, Dtype dt, SwitchDtype st, const void* x, void* values, void* switches,
                        cudaStream_t stream) {
  CudaLaunch launch{stream};
  dispatch_pool(launch, g, dt, st, x, values, switches, device_limits());
  return cudaGetLastError();
}

cudaError_t launch_unpool(const PoolGeom& g, Dtype dt, SwitchDtype st, const void* values, const void* switches,
                          void* out, cudaStream_t stream) {
  CudaLaunch launch{stream};
  dispatch_unpool(launch, g, dt, st, values, switches, out, device_limits());
  return cudaGetLastError();
}

cudaError_t launch_gather(const PoolGeom& g, Dtype dt, SwitchDtype st, const void* grad, const void* switches,
                          void* out, cudaStream_t stream) {
  CudaLaunch launch{stream};
  dispatch_gather(launch, g, dt, st, grad, switches, out, device_limits());
  return cudaGetLastError();
}

}  // namespace gpu
}  // namespace lightning_vis
