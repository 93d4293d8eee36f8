// CUDA kernels: max-pool with switches, unpool (its adjoint, by gathering: deterministic, no atomics,
// no zero-fill pass), gather at switches. One thread per output element, grid-stride loops, 32-bit
// index arithmetic whenever the tensors allow it. Same selection rule as torch's kernels: a value is
// taken when greater than the running max or NaN; the switch starts at the first cell with
// non-negative coordinates.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>

#include <cstdint>

#include "pool_kernel.h"

namespace lightning_vis {
namespace gpu {
namespace {

template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

__device__ __forceinline__ float load(const float* p) { return *p; }
__device__ __forceinline__ double load(const double* p) { return *p; }
__device__ __forceinline__ float load(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float load(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(double* p, double v) { *p = v; }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// Index arithmetic in I (int32_t when every offset fits, else int64_t).
template <typename I>
struct Geo {
  I N, C, T, H, W, OT, OH, OW;
  I k[3], s[3], p[3], d[3];
  bool cl;
  explicit Geo(const PoolGeom& g)
      : N(g.N), C(g.C), T(g.in[0]), H(g.in[1]), W(g.in[2]), OT(g.out[0]), OH(g.out[1]), OW(g.out[2]),
        cl(g.channels_last) {
    for (int i = 0; i < 3; ++i) {
      k[i] = g.k[i];
      s[i] = g.s[i];
      p[i] = g.p[i];
      d[i] = g.d[i];
    }
  }
  // Element e of a (N, C, A, B, D) tensor in this layout -> its coordinates.
  __device__ __forceinline__ void decode(I e, I A, I B, I D, I& n, I& c, I& a, I& b, I& x) const {
    if (cl) {
      c = e % C; e /= C; x = e % D; e /= D; b = e % B; e /= B; a = e % A; n = e / A;
    } else {
      x = e % D; e /= D; b = e % B; e /= B; a = e % A; e /= A; c = e % C; n = e / C;
    }
  }
  __device__ __forceinline__ I offset(I n, I c, I a, I b, I x, I A, I B, I D) const {
    return cl ? (((n * A + a) * B + b) * D + x) * C + c : (((n * C + c) * A + a) * B + b) * D + x;
  }
};

template <typename I>
__device__ __forceinline__ I first_tap(I start, I dil) {
  return start >= 0 ? I(0) : (-start + dil - 1) / dil;
}

// Pooled index of the window covering position q with tap i along one dim, or -1.
template <typename I>
__device__ __forceinline__ I covering(I q, I i, I s, I d, I p, I out) {
  const I a = q + p - i * d;
  if (a < 0 || a % s != 0) return -1;
  const I o = a / s;
  return o < out ? o : I(-1);
}

template <typename T, typename S, typename I>
__global__ void pool_kernel(Geo<I> g, const T* __restrict__ x, T* __restrict__ y, S* __restrict__ sw, I total) {
  using A = typename Acc<T>::type;
  for (I e = blockIdx.x * I(blockDim.x) + threadIdx.x; e < total; e += I(blockDim.x) * gridDim.x) {
    I n, c, ot, oh, ow;
    g.decode(e, g.OT, g.OH, g.OW, n, c, ot, oh, ow);
    const I ts = ot * g.s[0] - g.p[0], hs = oh * g.s[1] - g.p[1], ws = ow * g.s[2] - g.p[2];
    const I it0 = first_tap(ts, g.d[0]), ih0 = first_tap(hs, g.d[1]), iw0 = first_tap(ws, g.d[2]);
    A m = -static_cast<A>(INFINITY);
    I idx = (it0 * g.k[1] + ih0) * g.k[2] + iw0;
    for (I it = it0; it < g.k[0]; ++it) {
      const I t = ts + it * g.d[0];
      if (t >= g.T) break;
      for (I ih = ih0; ih < g.k[1]; ++ih) {
        const I h = hs + ih * g.d[1];
        if (h >= g.H) break;
        for (I iw = iw0; iw < g.k[2]; ++iw) {
          const I w = ws + iw * g.d[2];
          if (w >= g.W) break;
          const A v = load(x + g.offset(n, c, t, h, w, g.T, g.H, g.W));
          if (v > m || v != v) {
            m = v;
            idx = (it * g.k[1] + ih) * g.k[2] + iw;
          }
        }
      }
    }
    store(y + e, m);
    sw[e] = static_cast<S>(idx);
  }
}

template <typename T, typename S, typename I>
__global__ void unpool_kernel(Geo<I> g, const T* __restrict__ v, const S* __restrict__ sw, T* __restrict__ out,
                              I total) {
  using A = typename Acc<T>::type;
  for (I e = blockIdx.x * I(blockDim.x) + threadIdx.x; e < total; e += I(blockDim.x) * gridDim.x) {
    I n, c, t, h, w;
    g.decode(e, g.T, g.H, g.W, n, c, t, h, w);
    A acc = 0;
    for (I it = 0; it < g.k[0]; ++it) {
      const I ot = covering(t, it, g.s[0], g.d[0], g.p[0], g.OT);
      if (ot < 0) continue;
      for (I ih = 0; ih < g.k[1]; ++ih) {
        const I oh = covering(h, ih, g.s[1], g.d[1], g.p[1], g.OH);
        if (oh < 0) continue;
        for (I iw = 0; iw < g.k[2]; ++iw) {
          const I ow = covering(w, iw, g.s[2], g.d[2], g.p[2], g.OW);
          if (ow < 0) continue;
          const I o = g.offset(n, c, ot, oh, ow, g.OT, g.OH, g.OW);
          if (static_cast<I>(sw[o]) == (it * g.k[1] + ih) * g.k[2] + iw) acc += load(v + o);
        }
      }
    }
    store(out + e, acc);
  }
}

template <typename T, typename S, typename I>
__global__ void gather_kernel(Geo<I> g, const T* __restrict__ grad, const S* __restrict__ sw, T* __restrict__ out,
                              I total) {
  for (I e = blockIdx.x * I(blockDim.x) + threadIdx.x; e < total; e += I(blockDim.x) * gridDim.x) {
    I n, c, ot, oh, ow;
    g.decode(e, g.OT, g.OH, g.OW, n, c, ot, oh, ow);
    const I s = static_cast<I>(sw[e]);
    const I t = ot * g.s[0] - g.p[0] + (s / (g.k[1] * g.k[2])) * g.d[0];
    const I h = oh * g.s[1] - g.p[1] + ((s / g.k[2]) % g.k[1]) * g.d[1];
    const I w = ow * g.s[2] - g.p[2] + (s % g.k[2]) * g.d[2];
    const bool inside = t >= 0 && t < g.T && h >= 0 && h < g.H && w >= 0 && w < g.W;
    if (inside) {
      out[e] = grad[g.offset(n, c, t, h, w, g.T, g.H, g.W)];
    } else {
      store(out + e, typename Acc<T>::type(0));
    }
  }
}

constexpr int kThreads = 256;

template <typename I>
unsigned blocks_for(I total) {
  const int64_t b = (static_cast<int64_t>(total) + kThreads - 1) / kThreads;
  return static_cast<unsigned>(b < (int64_t(1) << 30) ? b : (int64_t(1) << 30));
}

bool fits_int32(const PoolGeom& g) {
  // Every offset is below the larger tensor's element count; keep headroom for intermediate products.
  const int64_t in = g.N * g.C * g.in_plane(), out = g.N * g.C * g.out_plane();
  const int64_t big = (in > out ? in : out) + g.C * g.window() * 4;
  return big < (int64_t(1) << 30);
}

enum class Op { Pool, Unpool, Gather };

template <typename T, typename S, typename I>
void launch_typed(Op op, const PoolGeom& pg, const void* a, const void* b, void* c, void* d, cudaStream_t stream) {
  Geo<I> g(pg);
  if (op == Op::Pool) {
    const I total = static_cast<I>(pg.N * pg.C * pg.out_plane());
    pool_kernel<T, S, I><<<blocks_for(total), kThreads, 0, stream>>>(g, static_cast<const T*>(a), static_cast<T*>(c),
                                                                     static_cast<S*>(d), total);
  } else if (op == Op::Unpool) {
    const I total = static_cast<I>(pg.N * pg.C * pg.in_plane());
    unpool_kernel<T, S, I><<<blocks_for(total), kThreads, 0, stream>>>(
        g, static_cast<const T*>(a), static_cast<const S*>(b), static_cast<T*>(c), total);
  } else {
    const I total = static_cast<I>(pg.N * pg.C * pg.out_plane());
    gather_kernel<T, S, I><<<blocks_for(total), kThreads, 0, stream>>>(
        g, static_cast<const T*>(a), static_cast<const S*>(b), static_cast<T*>(c), total);
  }
}

template <typename T>
void launch_sw(Op op, const PoolGeom& g, SwitchDtype st, const void* a, const void* b, void* c, void* d,
               cudaStream_t stream) {
  const bool small = fits_int32(g);
  if (st == SwitchDtype::U8) {
    small ? launch_typed<T, uint8_t, int32_t>(op, g, a, b, c, d, stream)
          : launch_typed<T, uint8_t, int64_t>(op, g, a, b, c, d, stream);
  } else {
    small ? launch_typed<T, int32_t, int32_t>(op, g, a, b, c, d, stream)
          : launch_typed<T, int32_t, int64_t>(op, g, a, b, c, d, stream);
  }
}

cudaError_t launch(Op op, const PoolGeom& g, Dtype dt, SwitchDtype st, const void* a, const void* b, void* c,
                   void* d, cudaStream_t stream) {
  switch (dt) {
    case Dtype::F32: launch_sw<float>(op, g, st, a, b, c, d, stream); break;
    case Dtype::F64: launch_sw<double>(op, g, st, a, b, c, d, stream); break;
    case Dtype::F16: launch_sw<__half>(op, g, st, a, b, c, d, stream); break;
    case Dtype::BF16: launch_sw<__nv_bfloat16>(op, g, st, a, b, c, d, stream); break;
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_pool(const PoolGeom& g, Dtype dt, SwitchDtype st, const void* x, void* values, void* switches,
                        cudaStream_t stream) {
  return launch(Op::Pool, g, dt, st, x, nullptr, values, switches, stream);
}

cudaError_t launch_unpool(const PoolGeom& g, Dtype dt, SwitchDtype st, const void* values, const void* switches,
                          void* out, cudaStream_t stream) {
  return launch(Op::Unpool, g, dt, st, values, switches, out, nullptr, stream);
}

cudaError_t launch_gather(const PoolGeom& g, Dtype dt, SwitchDtype st, const void* grad, const void* switches,
                          void* out, cudaStream_t stream) {
  return launch(Op::Gather, g, dt, st, grad, switches, out, nullptr, stream);
}

}  // namespace gpu
}  // namespace lightning_vis
