// CPU kernels: max-pool with switches, unpool (its adjoint), gather at switches (unpool's adjoint).
//
// Planar (N, C, T, H, W) tensors are processed one output row at a time: the row's running max and
// switch live in small buffers that stay in L1, each input row of the window is streamed once, and
// the inner loops run along W so that the compiler vectorises them. Channels-last tensors are
// processed one spatial position at a time with the inner loop along C.
//
// Semantics follow torch's own kernels exactly: a value is taken when it is greater than the running
// max or is NaN (so the first maximum wins on ties and the last NaN wins), the running max starts at
// -inf and the switch at the first window cell with non-negative coordinates.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "../pool.h"

namespace lightning_vis {
namespace {

constexpr int64_t kGrainElems = 16384;  // elements of work per parallel chunk, at least

int64_t grain_for(int64_t work_per_row) { return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, work_per_row)); }

// Valid output range [lo, hi) along one dim for tap i: position o * s + i * d - p inside [0, size).
void tap_range(int64_t i, int64_t s, int64_t d, int64_t p, int64_t size, int64_t out, int64_t& lo, int64_t& hi) {
  const int64_t shift = i * d - p;  // position = o * s + shift
  lo = shift >= 0 ? 0 : (-shift + s - 1) / s;
  hi = size - 1 - shift < 0 ? 0 : std::min(out, (size - 1 - shift) / s + 1);
  if (hi < lo) hi = lo;
}

// ---------------------------------------------------------------------------------------------
// max-pool, planar

// All kw taps valid for ow in [lo, hi). xr points at input position -p of the row.
template <int KW, int S, typename scalar_t, typename acc_t>
void pool_row_fixed(const scalar_t* xr, int64_t dw, acc_t* m, int32_t* idx, int32_t off, int64_t lo, int64_t hi) {
  for (int64_t ow = lo; ow < hi; ++ow) {
    acc_t mv = m[ow];
    int32_t iv = idx[ow];
#pragma GCC unroll 4
    for (int j = 0; j < KW; ++j) {
      const acc_t v = static_cast<acc_t>(xr[ow * S + j * dw]);
      const bool take = (v > mv) | (v != v);
      mv = take ? v : mv;
      iv = take ? off + j : iv;
    }
    m[ow] = mv;
    idx[ow] = iv;
  }
}

template <typename scalar_t, typename acc_t>
void pool_row_any(const scalar_t* xr, int64_t kw, int64_t sw, int64_t dw, acc_t* m, int32_t* idx, int32_t off,
                  int64_t lo, int64_t hi) {
  for (int64_t j = 0; j < kw; ++j) {
    const scalar_t* xj = xr + j * dw;
    const int32_t o = off + static_cast<int32_t>(j);
    for (int64_t ow = lo; ow < hi; ++ow) {
      const acc_t v = static_cast<acc_t>(xj[ow * sw]);
      const bool take = (v > m[ow]) | (v != v);
      m[ow] = take ? v : m[ow];
      idx[ow] = take ? o : idx[ow];
    }
  }
}

template <typename scalar_t, typename acc_t>
void pool_row_interior(const scalar_t* xr, int64_t kw, int64_t sw, int64_t dw, acc_t* m, int32_t* idx, int32_t off,
                       int64_t lo, int64_t hi) {
  if (kw == 2 && sw == 2) return pool_row_fixed<2, 2>(xr, dw, m, idx, off, lo, hi);
  if (kw == 3 && sw == 2) return pool_row_fixed<3, 2>(xr, dw, m, idx, off, lo, hi);
  if (kw == 2 && sw == 1) return pool_row_fixed<2, 1>(xr, dw, m, idx, off, lo, hi);
  if (kw == 3 && sw == 1) return pool_row_fixed<3, 1>(xr, dw, m, idx, off, lo, hi);
  if (kw == 1 && sw == 1) return pool_row_fixed<1, 1>(xr, dw, m, idx, off, lo, hi);
  pool_row_any(xr, kw, sw, dw, m, idx, off, lo, hi);
}

template <typename scalar_t, typename sw_t>
void pool_planar(const PoolGeom& g, const scalar_t* x, scalar_t* y, sw_t* sw) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = g.in[0], H = g.in[1], W = g.in[2];
  const int64_t OT = g.out[0], OH = g.out[1], OW = g.out[2];
  const int64_t kh = g.k[1], kw = g.k[2];
  // Per output column: the first valid W tap (the initial switch); the interior [lo, hi) where all W taps are valid.
  std::vector<int32_t> j0(OW);
  int64_t lo = OW, hi = OW;
  for (int64_t ow = 0; ow < OW; ++ow) {
    const int64_t start = ow * g.s[2] - g.p[2];
    j0[ow] = static_cast<int32_t>(first_nonnegative_tap(start, g.d[2]));
    if (start >= 0 && start + (kw - 1) * g.d[2] < W) {
      if (lo == OW) lo = ow;
      hi = ow + 1;
    }
  }
  const int64_t rows = g.N * g.C * OT * OH;
  at::parallel_for(0, rows, grain_for(OW * g.window()), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> m(OW);
    std::vector<int32_t> idx(OW);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t oh = r % OH, ot = (r / OH) % OT, plane = r / (OH * OT);
      const int64_t t_start = ot * g.s[0] - g.p[0], h_start = oh * g.s[1] - g.p[1];
      const int64_t it0 = first_nonnegative_tap(t_start, g.d[0]), it1 = end_tap(t_start, g.d[0], T, g.k[0]);
      const int64_t ih0 = first_nonnegative_tap(h_start, g.d[1]), ih1 = end_tap(h_start, g.d[1], H, kh);
      const int32_t base = static_cast<int32_t>((it0 * kh + ih0) * kw);
      for (int64_t ow = 0; ow < OW; ++ow) {
        m[ow] = -std::numeric_limits<acc_t>::infinity();
        idx[ow] = base + j0[ow];
      }
      const scalar_t* xp = x + plane * T * H * W;
      for (int64_t it = it0; it < it1; ++it) {
        for (int64_t ih = ih0; ih < ih1; ++ih) {
          const scalar_t* xr = xp + ((t_start + it * g.d[0]) * H + h_start + ih * g.d[1]) * W;
          const int32_t off = static_cast<int32_t>((it * kh + ih) * kw);
          // Border columns [0, lo) and [hi, OW): some taps fall into the padding.
          auto border = [&](int64_t a, int64_t b) {
            for (int64_t ow = a; ow < b; ++ow) {
              const int64_t start = ow * g.s[2] - g.p[2];
              for (int64_t j = 0; j < kw; ++j) {
                const int64_t w = start + j * g.d[2];
                if (w < 0 || w >= W) continue;
                const acc_t v = static_cast<acc_t>(xr[w]);
                if ((v > m[ow]) | (v != v)) {
                  m[ow] = v;
                  idx[ow] = off + static_cast<int32_t>(j);
                }
              }
            }
          };
          border(0, lo);
          border(hi, OW);
          pool_row_interior(xr - g.p[2], kw, g.s[2], g.d[2], m.data(), idx.data(), off, lo, hi);
        }
      }
      scalar_t* yr = y + r * OW;
      sw_t* sr = sw + r * OW;
      for (int64_t ow = 0; ow < OW; ++ow) {
        yr[ow] = static_cast<scalar_t>(m[ow]);
        sr[ow] = static_cast<sw_t>(idx[ow]);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// max-pool, channels last

template <typename scalar_t, typename sw_t>
void pool_channels_last(const PoolGeom& g, const scalar_t* x, scalar_t* y, sw_t* sw) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = g.in[0], H = g.in[1], W = g.in[2], C = g.C;
  const int64_t OT = g.out[0], OH = g.out[1], OW = g.out[2];
  const int64_t kh = g.k[1], kw = g.k[2];
  const int64_t rows = g.N * OT * OH * OW;
  at::parallel_for(0, rows, grain_for(C * g.window()), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> m(C);
    std::vector<int32_t> idx(C);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t ow = r % OW, oh = (r / OW) % OH, ot = (r / (OW * OH)) % OT, n = r / (OW * OH * OT);
      const int64_t ts = ot * g.s[0] - g.p[0], hs = oh * g.s[1] - g.p[1], ws = ow * g.s[2] - g.p[2];
      const int64_t it0 = first_nonnegative_tap(ts, g.d[0]), it1 = end_tap(ts, g.d[0], T, g.k[0]);
      const int64_t ih0 = first_nonnegative_tap(hs, g.d[1]), ih1 = end_tap(hs, g.d[1], H, kh);
      const int64_t iw0 = first_nonnegative_tap(ws, g.d[2]), iw1 = end_tap(ws, g.d[2], W, kw);
      const int32_t first = static_cast<int32_t>((it0 * kh + ih0) * kw + iw0);
      acc_t* mp = m.data();
      int32_t* ip = idx.data();
      for (int64_t c = 0; c < C; ++c) {
        mp[c] = -std::numeric_limits<acc_t>::infinity();
        ip[c] = first;
      }
      for (int64_t it = it0; it < it1; ++it) {
        for (int64_t ih = ih0; ih < ih1; ++ih) {
          for (int64_t iw = iw0; iw < iw1; ++iw) {
            const scalar_t* xr =
                x + (((n * T + ts + it * g.d[0]) * H + hs + ih * g.d[1]) * W + ws + iw * g.d[2]) * C;
            const int32_t off = static_cast<int32_t>((it * kh + ih) * kw + iw);
            for (int64_t c = 0; c < C; ++c) {
              const acc_t v = static_cast<acc_t>(xr[c]);
              const bool take = (v > mp[c]) | (v != v);
              mp[c] = take ? v : mp[c];
              ip[c] = take ? off : ip[c];
            }
          }
        }
      }
      scalar_t* yr = y + r * C;
      sw_t* sr = sw + r * C;
      for (int64_t c = 0; c < C; ++c) {
        yr[c] = static_cast<scalar_t>(mp[c]);
        sr[c] = static_cast<sw_t>(ip[c]);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// unpool: every input cell sums the values of the windows whose switch points at it. Each output row
// (or position) is accumulated in a buffer and written once: no zero-fill pass, no atomics, and the
// summation order is fixed, so results are deterministic.

// Pooled index along one dim of the window that covers position q with tap i, or -1.
inline int64_t covering(int64_t q, int64_t i, int64_t s, int64_t d, int64_t p, int64_t out) {
  const int64_t a = q + p - i * d;
  if (a < 0 || a % s != 0) return -1;
  const int64_t o = a / s;
  return o < out ? o : -1;
}

template <typename scalar_t, typename sw_t>
void unpool_planar(const PoolGeom& g, const scalar_t* v, const sw_t* sw, scalar_t* out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = g.in[0], H = g.in[1], W = g.in[2];
  const int64_t OT = g.out[0], OH = g.out[1], OW = g.out[2];
  const int64_t kh = g.k[1], kw = g.k[2];
  std::vector<int64_t> ow_lo(kw), ow_hi(kw);
  for (int64_t j = 0; j < kw; ++j) tap_range(j, g.s[2], g.d[2], g.p[2], W, OW, ow_lo[j], ow_hi[j]);
  const int64_t rows = g.N * g.C * T * H;
  at::parallel_for(0, rows, grain_for(W + OW * kw), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(W);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t h = r % H, t = (r / H) % T, plane = r / (H * T);
      std::fill(buf.begin(), buf.end(), acc_t(0));
      for (int64_t it = 0; it < g.k[0]; ++it) {
        const int64_t ot = covering(t, it, g.s[0], g.d[0], g.p[0], OT);
        if (ot < 0) continue;
        for (int64_t ih = 0; ih < kh; ++ih) {
          const int64_t oh = covering(h, ih, g.s[1], g.d[1], g.p[1], OH);
          if (oh < 0) continue;
          const int64_t orow = ((plane * OT + ot) * OH + oh) * OW;
          const scalar_t* vr = v + orow;
          const sw_t* sr = sw + orow;
          for (int64_t j = 0; j < kw; ++j) {
            const sw_t off = static_cast<sw_t>((it * kh + ih) * kw + j);
            acc_t* bj = buf.data() + j * g.d[2] - g.p[2];
            const int64_t s = g.s[2];
            for (int64_t ow = ow_lo[j]; ow < ow_hi[j]; ++ow) {
              bj[ow * s] += sr[ow] == off ? static_cast<acc_t>(vr[ow]) : acc_t(0);
            }
          }
        }
      }
      scalar_t* orow_out = out + r * W;
      for (int64_t w = 0; w < W; ++w) orow_out[w] = static_cast<scalar_t>(buf[w]);
    }
  });
}

template <typename scalar_t, typename sw_t>
void unpool_channels_last(const PoolGeom& g, const scalar_t* v, const sw_t* sw, scalar_t* out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = g.in[0], H = g.in[1], W = g.in[2], C = g.C;
  const int64_t OT = g.out[0], OH = g.out[1], OW = g.out[2];
  const int64_t kh = g.k[1], kw = g.k[2];
  const int64_t rows = g.N * T * H * W;
  at::parallel_for(0, rows, grain_for(C * 2), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(C);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t w = r % W, h = (r / W) % H, t = (r / (W * H)) % T, n = r / (W * H * T);
      std::fill(buf.begin(), buf.end(), acc_t(0));
      acc_t* bp = buf.data();
      for (int64_t it = 0; it < g.k[0]; ++it) {
        const int64_t ot = covering(t, it, g.s[0], g.d[0], g.p[0], OT);
        if (ot < 0) continue;
        for (int64_t ih = 0; ih < kh; ++ih) {
          const int64_t oh = covering(h, ih, g.s[1], g.d[1], g.p[1], OH);
          if (oh < 0) continue;
          for (int64_t iw = 0; iw < kw; ++iw) {
            const int64_t ow = covering(w, iw, g.s[2], g.d[2], g.p[2], OW);
            if (ow < 0) continue;
            const int64_t o = (((n * OT + ot) * OH + oh) * OW + ow) * C;
            const scalar_t* vr = v + o;
            const sw_t* sr = sw + o;
            const sw_t off = static_cast<sw_t>((it * kh + ih) * kw + iw);
            for (int64_t c = 0; c < C; ++c) bp[c] += sr[c] == off ? static_cast<acc_t>(vr[c]) : acc_t(0);
          }
        }
      }
      scalar_t* orow = out + r * C;
      for (int64_t c = 0; c < C; ++c) orow[c] = static_cast<scalar_t>(bp[c]);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// gather: out[o] = grad[cell that switch o points at], 0 where that cell lies outside the input.

template <typename scalar_t, typename sw_t>
void gather_any(const PoolGeom& g, const scalar_t* grad, const sw_t* sw, scalar_t* out) {
  const int64_t T = g.in[0], H = g.in[1], W = g.in[2], C = g.C;
  const int64_t OT = g.out[0], OH = g.out[1], OW = g.out[2];
  const int64_t kh = g.k[1], kw = g.k[2];
  const int64_t total = g.N * C * OT * OH * OW;
  at::parallel_for(0, total, kGrainElems, [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e) {
      int64_t n, c, ot, oh, ow;
      if (g.channels_last) {
        c = e % C;
        int64_t q = e / C;
        ow = q % OW; q /= OW; oh = q % OH; q /= OH; ot = q % OT; n = q / OT;
      } else {
        ow = e % OW;
        int64_t q = e / OW;
        oh = q % OH; q /= OH; ot = q % OT; q /= OT; c = q % C; n = q / C;
      }
      const int64_t s = static_cast<int64_t>(sw[e]);
      const int64_t t = ot * g.s[0] - g.p[0] + (s / (kh * kw)) * g.d[0];
      const int64_t h = oh * g.s[1] - g.p[1] + ((s / kw) % kh) * g.d[1];
      const int64_t w = ow * g.s[2] - g.p[2] + (s % kw) * g.d[2];
      const bool inside = t >= 0 && t < T && h >= 0 && h < H && w >= 0 && w < W;
      const int64_t src = g.channels_last ? (((n * T + t) * H + h) * W + w) * C + c : ((n * C + c) * T + t) * H * W + h * W + w;
      out[e] = inside ? grad[src] : scalar_t(0);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// dispatch

template <typename F>
void dispatch_types(const at::Tensor& data, const at::Tensor& switches, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, data.scalar_type(), "lightning_vis_cpu", [&] {
    if (switches.scalar_type() == at::kByte) {
      f(scalar_t(), uint8_t());
    } else {
      f(scalar_t(), int32_t());
    }
  });
}

void pool_cpu_kernel(const PoolGeom& g, const at::Tensor& x, at::Tensor& values, at::Tensor& switches) {
  dispatch_types(x, switches, [&](auto s, auto w) {
    using scalar_t = decltype(s);
    using sw_t = decltype(w);
    auto fn = g.channels_last ? pool_channels_last<scalar_t, sw_t> : pool_planar<scalar_t, sw_t>;
    fn(g, x.const_data_ptr<scalar_t>(), values.mutable_data_ptr<scalar_t>(), switches.mutable_data_ptr<sw_t>());
  });
}

void unpool_cpu_kernel(const PoolGeom& g, const at::Tensor& values, const at::Tensor& switches, at::Tensor& out) {
  dispatch_types(values, switches, [&](auto s, auto w) {
    using scalar_t = decltype(s);
    using sw_t = decltype(w);
    auto fn = g.channels_last ? unpool_channels_last<scalar_t, sw_t> : unpool_planar<scalar_t, sw_t>;
    fn(g, values.const_data_ptr<scalar_t>(), switches.const_data_ptr<sw_t>(), out.mutable_data_ptr<scalar_t>());
  });
}

void gather_cpu_kernel(const PoolGeom& g, const at::Tensor& grad, const at::Tensor& switches, at::Tensor& out) {
  dispatch_types(grad, switches, [&](auto s, auto w) {
    using scalar_t = decltype(s);
    using sw_t = decltype(w);
    gather_any<scalar_t, sw_t>(g, grad.const_data_ptr<scalar_t>(), switches.const_data_ptr<sw_t>(),
                               out.mutable_data_ptr<scalar_t>());
  });
}

std::tuple<at::Tensor, at::Tensor> max_pool_with_switches_cpu(const at::Tensor& x, at::IntArrayRef k,
                                                              at::IntArrayRef s, at::IntArrayRef p,
                                                              at::IntArrayRef d, bool ceil_mode) {
  return max_pool_with_switches_impl(x, k, s, p, d, ceil_mode, pool_cpu_kernel);
}

at::Tensor unpool_cpu(const at::Tensor& values, const at::Tensor& switches, at::IntArrayRef k, at::IntArrayRef s,
                      at::IntArrayRef p, at::IntArrayRef d, at::IntArrayRef output_size) {
  return unpool_impl(values, switches, k, s, p, d, output_size, unpool_cpu_kernel);
}

at::Tensor gather_switches_cpu(const at::Tensor& grad, const at::Tensor& switches, at::IntArrayRef k,
                               at::IntArrayRef s, at::IntArrayRef p, at::IntArrayRef d) {
  return gather_switches_impl(grad, switches, k, s, p, d, gather_cpu_kernel);
}

}  // namespace

TORCH_LIBRARY_IMPL(lightning_vis, CPU, m) {
  m.impl("max_pool_with_switches", &max_pool_with_switches_cpu);
  m.impl("unpool", &unpool_cpu);
  m.impl("gather_switches", &gather_switches_cpu);
}

}  // namespace lightning_vis
