// CPU kernels: max-pool with switches, unpool (its adjoint), gather at switches (unpool's adjoint).
//
// Planar (N, C, T, H, W) tensors are processed one output row at a time along W: border columns one by
// one, interior columns with the whole window in registers (fused rows, hand-vectorised for fp32 stride 2)
// or, for other windows, one window row at a time through L1 row buffers. Kernel 2 / stride 2 windows have
// whole-row AVX2 kernels (simd_x86.h). Channels-last tensors are processed one position at a time with the
// inner loop along C, compiled twice (plain and AVX2, chosen at run time). Unpool gathers: every output cell
// is written once from the windows that cover it (residue classes along W where windows overlap).
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
#include <type_traits>
#include <vector>

#include "../pool.h"
#include "simd_x86.h"

#define LV_COMMA ,

namespace lightning_vis {
namespace {

constexpr int64_t kGrainElems = 16384;  // elements of work per parallel chunk, at least

int64_t grain_for(int64_t work_per_row) { return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, work_per_row)); }

// Per pooled index along T or H: window start and the range of taps inside the input.
struct TapSpan {
  int64_t start, i0, i1;
};

std::vector<TapSpan> tap_spans(int64_t out, int64_t k, int64_t s, int64_t d, int64_t p, int64_t size) {
  std::vector<TapSpan> v(out);
  for (int64_t o = 0; o < out; ++o) {
    const int64_t start = o * s - p;
    v[o] = {start, first_nonnegative_tap(start, d), end_tap(start, d, size, k)};
  }
  return v;
}

// Row index r = (outer * A + a) * B + b, advanced without divisions.
struct RowCounter {
  int64_t outer, a, b, A, B;
  RowCounter(int64_t r, int64_t A_, int64_t B_) : outer(r / (A_ * B_)), a((r / B_) % A_), b(r % B_), A(A_), B(B_) {}
  void next() {
    if (++b == B) {
      b = 0;
      if (++a == A) {
        a = 0;
        ++outer;
      }
    }
  }
};

// ---------------------------------------------------------------------------------------------
// max-pool, planar

// The whole window in registers: R window rows (all inside the input), KW taps along W (all inside for
// ow in [lo, hi)), stride S along W. Writes values and switches directly.
template <int R, int KW, int S, typename scalar_t, typename sw_t>
void pool_row_fused(const scalar_t* const* rows, const int32_t* offs, int64_t dw, scalar_t* __restrict__ y,
                    sw_t* __restrict__ sw, int64_t lo, int64_t hi) {
  using acc_t = at::opmath_type<scalar_t>;
#ifdef LIGHTNING_VIS_SSE2
  if constexpr ((KW == 2 || KW == 3) && S == 2 && std::is_same_v<scalar_t, float> && std::is_same_v<sw_t, uint8_t>) {
    if (dw == 1) lo = simd::pool_row_s2<R, KW>(rows, offs, y, sw, lo, hi);
  }
#endif
  const scalar_t* rp[R];
  int32_t of[R];
  for (int i = 0; i < R; ++i) {
    rp[i] = rows[i];
    of[i] = offs[i];
  }
  for (int64_t ow = lo; ow < hi; ++ow) {
    acc_t mv = -std::numeric_limits<acc_t>::infinity();
    int32_t iv = of[0];
#pragma GCC unroll 4
    for (int i = 0; i < R; ++i) {
#pragma GCC unroll 4
      for (int j = 0; j < KW; ++j) {
        const acc_t v = static_cast<acc_t>(rp[i][ow * S + j * dw]);
        const bool take = (v > mv) | (v != v);
        mv = take ? v : mv;
        iv = take ? of[i] + j : iv;
      }
    }
    y[ow] = static_cast<scalar_t>(mv);
    sw[ow] = static_cast<sw_t>(iv);
  }
}

template <typename scalar_t, typename sw_t>
using FusedFn = void (*)(const scalar_t* const*, const int32_t*, int64_t, scalar_t*, sw_t*, int64_t, int64_t);

// The fused row kernel for R window rows of KW taps at stride S, if one is compiled.
template <typename scalar_t, typename sw_t>
FusedFn<scalar_t, sw_t> pick_fused(int64_t R, int64_t kw, int64_t s) {
#define LV_FUSED(r, k, st) \
  if (R == r && kw == k && s == st) return pool_row_fused<r, k, st, scalar_t, sw_t>;
  LV_FUSED(2, 2, 2) LV_FUSED(3, 3, 2) LV_FUSED(4, 2, 2) LV_FUSED(2, 2, 1) LV_FUSED(3, 3, 1) LV_FUSED(1, 2, 2)
  LV_FUSED(1, 3, 2) LV_FUSED(1, 2, 1) LV_FUSED(1, 3, 1) LV_FUSED(2, 1, 1) LV_FUSED(4, 1, 1)
#undef LV_FUSED
  return nullptr;
}

// Running max along a row buffer, one W tap at a time (any kernel width, stride and dilation).
template <typename scalar_t, typename acc_t>
void pool_row_taps(const scalar_t* xr, int64_t kw, int64_t sw, int64_t dw, acc_t* __restrict__ m,
                   int32_t* __restrict__ idx, int32_t off, int64_t lo, int64_t hi) {
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

// Kernel 2, stride 2, no padding, no dilation along H and W, every window inside the input (ceil_mode can
// make the last one hang over); along T the same (2) or untouched (1). 0 otherwise.
int k2s2_depth(const PoolGeom& g) {
  for (int i = 1; i < 3; ++i)
    if (g.k[i] != 2 || g.s[i] != 2 || g.p[i] != 0 || g.d[i] != 1 || 2 * g.out[i] > g.in[i]) return 0;
  if (g.k[0] == 1 && g.s[0] == 1 && g.p[0] == 0) return 1;
  if (g.k[0] == 2 && g.s[0] == 2 && g.p[0] == 0 && g.d[0] == 1 && 2 * g.out[0] <= g.in[0]) return 2;
  return 0;
}

template <typename scalar_t, typename sw_t>
void pool_planar(const PoolGeom& g, const scalar_t* x, scalar_t* y, sw_t* sw) {
  using acc_t = at::opmath_type<scalar_t>;
#ifdef LIGHTNING_VIS_SSE2
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<sw_t, uint8_t>) {
    if (const int kt = k2s2_depth(g); kt > 0 && simd::has_avx2()) {
      const int64_t rows = g.N * g.C * g.out[0] * g.out[1];
      at::parallel_for(0, rows, grain_for(g.out[2] * 4 * kt), [&](int64_t begin, int64_t end) {
        (kt == 1 ? simd::pool_rows_k2s2_avx2<1> : simd::pool_rows_k2s2_avx2<2>)(
            x, y, sw, begin, end, g.in[0], g.in[1], g.in[2], g.out[0], g.out[1], g.out[2]);
      });
      return;
    }
  }
#endif
  const int64_t T = g.in[0], H = g.in[1], W = g.in[2];
  const int64_t OT = g.out[0], OH = g.out[1], OW = g.out[2];
  const int64_t kt = g.k[0], kh = g.k[1], kw = g.k[2];
  const int64_t sw_ = g.s[2], dw = g.d[2], pw = g.p[2];
  // Per output column: the first valid W tap (the initial switch); the interior [lo, hi) where all W taps are valid.
  std::vector<int32_t> j0(OW);
  int64_t lo = OW, hi = OW;
  for (int64_t ow = 0; ow < OW; ++ow) {
    const int64_t start = ow * sw_ - pw;
    j0[ow] = static_cast<int32_t>(first_nonnegative_tap(start, dw));
    if (start >= 0 && start + (kw - 1) * dw < W) {
      if (lo == OW) lo = ow;
      hi = ow + 1;
    }
  }
  const auto tT = tap_spans(OT, kt, g.s[0], g.d[0], g.p[0], T), tH = tap_spans(OH, kh, g.s[1], g.d[1], g.p[1], H);
  const auto fused = pick_fused<scalar_t, sw_t>(kt * kh, kw, sw_);
  const int64_t rows = g.N * g.C * OT * OH;
  at::parallel_for(0, rows, grain_for(OW * g.window()), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> m(OW);
    std::vector<int32_t> idx(OW);
    std::vector<const scalar_t*> rp(kt * kh);
    std::vector<int32_t> offs(kt * kh);
    RowCounter rc(begin, OT, OH);
    for (int64_t r = begin; r < end; ++r, rc.next()) {
      const TapSpan& ts = tT[rc.a];
      const TapSpan& hs = tH[rc.b];
      const int32_t base = static_cast<int32_t>((ts.i0 * kh + hs.i0) * kw);
      const scalar_t* xp = x + rc.outer * T * H * W;
      int64_t R = 0;  // the window rows inside the input; pointers at input position -pw
      for (int64_t it = ts.i0; it < ts.i1; ++it) {
        for (int64_t ih = hs.i0; ih < hs.i1; ++ih) {
          rp[R] = xp + ((ts.start + it * g.d[0]) * H + hs.start + ih * g.d[1]) * W - pw;
          offs[R++] = static_cast<int32_t>((it * kh + ih) * kw);
        }
      }
      scalar_t* yr = y + r * OW;
      sw_t* sr = sw + r * OW;
      // Border columns [0, lo) and [hi, OW), where some W taps fall into the padding: one column at a time.
      auto border = [&](int64_t a, int64_t b) {
        for (int64_t ow = a; ow < b; ++ow) {
          acc_t mv = -std::numeric_limits<acc_t>::infinity();
          int32_t iv = base + j0[ow];
          for (int64_t i = 0; i < R; ++i) {
            for (int64_t j = 0; j < kw; ++j) {
              const int64_t w = ow * sw_ + j * dw - pw;
              if (w < 0 || w >= W) continue;
              const acc_t v = static_cast<acc_t>(rp[i][w + pw]);
              if ((v > mv) | (v != v)) {
                mv = v;
                iv = offs[i] + static_cast<int32_t>(j);
              }
            }
          }
          yr[ow] = static_cast<scalar_t>(mv);
          sr[ow] = static_cast<sw_t>(iv);
        }
      };
      border(0, lo);
      border(hi, OW);
      // Interior columns: the whole window in registers, or one window row at a time through row buffers.
      if (fused != nullptr && R == kt * kh) {
        fused(rp.data(), offs.data(), dw, yr, sr, lo, hi);
        continue;
      }
      for (int64_t ow = lo; ow < hi; ++ow) {
        m[ow] = -std::numeric_limits<acc_t>::infinity();
        idx[ow] = base + j0[ow];
      }
      for (int64_t i = 0; i < R; ++i) pool_row_taps(rp[i], kw, sw_, dw, m.data(), idx.data(), offs[i], lo, hi);
      for (int64_t ow = lo; ow < hi; ++ow) {
        yr[ow] = static_cast<scalar_t>(m[ow]);
        sr[ow] = static_cast<sw_t>(idx[ow]);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// max-pool, channels last: one output row (n, ot, oh) per task, channels innermost.

// One output position over all its taps, channels innermost. NT > 0: NT taps fixed at compile time, the
// window reduced in registers in one pass over C. NT == 0: any number of taps, through row buffers.
template <int NT, typename scalar_t, typename sw_t>
__attribute__((always_inline)) inline void pool_cl_position_impl(const scalar_t* const* taps, const int32_t* offs,
                                                                 int64_t ntaps, int64_t C, scalar_t* __restrict__ y,
                                                                 sw_t* __restrict__ sw,
                                                                 at::opmath_type<scalar_t>* __restrict__ m,
                                                                 int32_t* __restrict__ idx) {
  using acc_t = at::opmath_type<scalar_t>;
  if constexpr (NT > 0) {
    const scalar_t* tp[NT];
    int32_t of[NT];
    for (int t = 0; t < NT; ++t) {
      tp[t] = taps[t];
      of[t] = offs[t];
    }
    for (int64_t c = 0; c < C; ++c) {
      acc_t mv = static_cast<acc_t>(tp[0][c]);
      int32_t iv = of[0];
#pragma GCC unroll 9
      for (int t = 1; t < NT; ++t) {
        const acc_t v = static_cast<acc_t>(tp[t][c]);
        const bool take = (v > mv) | (v != v);
        mv = take ? v : mv;
        iv = take ? of[t] : iv;
      }
      y[c] = static_cast<scalar_t>(mv);
      sw[c] = static_cast<sw_t>(iv);
    }
  } else {
    const scalar_t* x0 = taps[0];
    for (int64_t c = 0; c < C; ++c) {
      m[c] = static_cast<acc_t>(x0[c]);
      idx[c] = offs[0];
    }
    for (int64_t t = 1; t < ntaps; ++t) {
      const scalar_t* xr = taps[t];
      const int32_t off = offs[t];
      for (int64_t c = 0; c < C; ++c) {
        const acc_t v = static_cast<acc_t>(xr[c]);
        const bool take = (v > m[c]) | (v != v);
        m[c] = take ? v : m[c];
        idx[c] = take ? off : idx[c];
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      y[c] = static_cast<scalar_t>(m[c]);
      sw[c] = static_cast<sw_t>(idx[c]);
    }
  }
}

// The channel loops below are compiled twice: as they are, and inside an AVX2 wrapper (8 floats a step)
// chosen at run time where the CPU has it. The bodies are always_inline, so each copy gets its own code.
#ifdef LIGHTNING_VIS_SSE2
#define LV_AVX2 __attribute__((target("avx2")))
inline bool use_avx2() { return simd::has_avx2(); }
#else
#define LV_AVX2
inline bool use_avx2() { return false; }
#endif

#define LV_TWICE(name, impl, tparams, targs, params, args) \
  template <tparams>                                        \
  void name params { impl<targs> args; }                     \
  template <tparams>                                        \
  LV_AVX2 void name##_avx2 params { impl<targs> args; }

#define LV_POS_PARAMS                                                                                             \
  (const scalar_t* const* taps, const int32_t* offs, int64_t ntaps, int64_t C, scalar_t* y, sw_t* sw,             \
   at::opmath_type<scalar_t>* m, int32_t* idx)
LV_TWICE(pool_cl_position, pool_cl_position_impl, int NT LV_COMMA typename scalar_t LV_COMMA typename sw_t,
         NT LV_COMMA scalar_t LV_COMMA sw_t, LV_POS_PARAMS, (taps, offs, ntaps, C, y, sw, m, idx))

template <typename scalar_t, typename sw_t>
using PosFn = void (*)(const scalar_t* const*, const int32_t*, int64_t, int64_t, scalar_t*, sw_t*,
                       at::opmath_type<scalar_t>*, int32_t*);

template <typename scalar_t, typename sw_t>
PosFn<scalar_t, sw_t> pick_position(int64_t ntaps, bool avx2) {
#define LV_POS(nt) \
  if (ntaps == nt) return avx2 ? pool_cl_position_avx2<nt, scalar_t, sw_t> : pool_cl_position<nt, scalar_t, sw_t>;
  LV_POS(2) LV_POS(3) LV_POS(4) LV_POS(8) LV_POS(9)
#undef LV_POS
  return avx2 ? pool_cl_position_avx2<0, scalar_t, sw_t> : pool_cl_position<0, scalar_t, sw_t>;
}

template <typename scalar_t, typename sw_t>
void pool_channels_last(const PoolGeom& g, const scalar_t* x, scalar_t* y, sw_t* sw) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = g.in[0], H = g.in[1], W = g.in[2], C = g.C;
  const int64_t OT = g.out[0], OH = g.out[1], OW = g.out[2];
  const int64_t kt = g.k[0], kh = g.k[1], kw = g.k[2];
  std::vector<int64_t> iw0(OW), iw1(OW);
  for (int64_t ow = 0; ow < OW; ++ow) {
    const int64_t ws = ow * g.s[2] - g.p[2];
    iw0[ow] = first_nonnegative_tap(ws, g.d[2]);
    iw1[ow] = end_tap(ws, g.d[2], W, kw);
  }
  const int64_t rows = g.N * OT * OH;
  const bool avx2 = use_avx2();
  at::parallel_for(0, rows, grain_for(OW * C * g.window()), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> m(C);
    std::vector<int32_t> idx(C);
    std::vector<const scalar_t*> taps(g.window());
    std::vector<int32_t> offs(g.window());
    for (int64_t r = begin; r < end; ++r) {
      const int64_t oh = r % OH, ot = (r / OH) % OT, n = r / (OH * OT);
      const int64_t ts = ot * g.s[0] - g.p[0], hs = oh * g.s[1] - g.p[1];
      const int64_t it0 = first_nonnegative_tap(ts, g.d[0]), it1 = end_tap(ts, g.d[0], T, kt);
      const int64_t ih0 = first_nonnegative_tap(hs, g.d[1]), ih1 = end_tap(hs, g.d[1], H, kh);
      for (int64_t ow = 0; ow < OW; ++ow) {
        const int64_t ws = ow * g.s[2] - g.p[2];
        int64_t ntaps = 0;
        for (int64_t it = it0; it < it1; ++it) {
          for (int64_t ih = ih0; ih < ih1; ++ih) {
            for (int64_t iw = iw0[ow]; iw < iw1[ow]; ++iw) {
              taps[ntaps] = x + (((n * T + ts + it * g.d[0]) * H + hs + ih * g.d[1]) * W + ws + iw * g.d[2]) * C;
              offs[ntaps++] = static_cast<int32_t>((it * kh + ih) * kw + iw);
            }
          }
        }
        scalar_t* __restrict__ yr = y + (r * OW + ow) * C;
        sw_t* __restrict__ sr = sw + (r * OW + ow) * C;
        if (ntaps == 0) {  // a window wholly in the padding (torch gives -inf and the first cell)
          const int32_t first = static_cast<int32_t>((it0 * kh + ih0) * kw + iw0[ow]);
          for (int64_t c = 0; c < C; ++c) {
            yr[c] = static_cast<scalar_t>(-std::numeric_limits<acc_t>::infinity());
            sr[c] = static_cast<sw_t>(first);
          }
          continue;
        }
        // The first cell initialises (the -inf start and the first-cell switch give exactly this).
        pick_position<scalar_t, sw_t>(ntaps, avx2)(taps.data(), offs.data(), ntaps, C, yr, sr, m.data(), idx.data());
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// unpool: every input cell sums the values of the windows whose switch points at it, computed per
// output row (or position) and written once: no zero-fill pass, no atomics, a fixed summation order.

// The windows covering position q along one dim: (pooled index, tap) pairs in tap order; at most one pair
// where windows do not overlap.
void covering(int64_t q, int64_t k, int64_t s, int64_t d, int64_t p, int64_t out, std::vector<int64_t>& o,
              std::vector<int64_t>& tap) {
  o.clear();
  tap.clear();
  for (int64_t i = 0; i < k; ++i) {
    const int64_t a = q + p - i * d;
    if (a < 0) break;
    if (a % s != 0 || a / s >= out) continue;
    o.push_back(a / s);
    tap.push_back(i);
  }
}

// Along W: windows tile the row without overlap (dilation 1, KW <= S); each pooled column writes S cells.
template <int KW, int S, typename scalar_t, typename sw_t>
void unpool_row_direct(const scalar_t* __restrict__ vr, const sw_t* __restrict__ sr, int32_t off,
                       scalar_t* __restrict__ o, int64_t lo, int64_t hi) {
#ifdef LIGHTNING_VIS_SSE2
  if constexpr (KW == 2 && S == 2 && std::is_same_v<scalar_t, float> && std::is_same_v<sw_t, uint8_t>) {
    lo = simd::unpool_row_k2s2(vr, sr, off, o, lo, hi);
  }
#endif
  for (int64_t ow = lo; ow < hi; ++ow) {
    const scalar_t v = vr[ow];
    const int32_t s = static_cast<int32_t>(sr[ow]);
#pragma GCC unroll 4
    for (int j = 0; j < S; ++j) o[ow * S + j] = (j < KW && s == off + j) ? v : scalar_t(0);
  }
}

template <typename scalar_t, typename sw_t>
using DirectFn = void (*)(const scalar_t*, const sw_t*, int32_t, scalar_t*, int64_t, int64_t);

template <typename scalar_t, typename sw_t>
DirectFn<scalar_t, sw_t> pick_direct(int64_t kw, int64_t s) {
#define LV_DIRECT(k, st) \
  if (kw == k && s == st) return unpool_row_direct<k, st, scalar_t, sw_t>;
  LV_DIRECT(2, 2) LV_DIRECT(3, 3) LV_DIRECT(1, 1) LV_DIRECT(4, 4) LV_DIRECT(1, 2)
#undef LV_DIRECT
  return nullptr;
}

// Per position along one dim: the covering (pooled index, tap) pairs, flattened; position q owns
// entries [begin[q], begin[q + 1]).
struct CoverTable {
  std::vector<int64_t> begin, o, tap;
  CoverTable(int64_t size, int64_t k, int64_t s, int64_t d, int64_t p, int64_t out) : begin(size + 1) {
    std::vector<int64_t> qo, qt;
    for (int64_t q = 0; q < size; ++q) {
      begin[q] = static_cast<int64_t>(o.size());
      covering(q, k, s, d, p, out, qo, qt);
      o.insert(o.end(), qo.begin(), qo.end());
      tap.insert(tap.end(), qt.begin(), qt.end());
    }
    begin[size] = static_cast<int64_t>(o.size());
  }
  int64_t count(int64_t q) const { return begin[q + 1] - begin[q]; }
};

template <typename scalar_t, typename sw_t>
void unpool_planar(const PoolGeom& g, const scalar_t* v, const sw_t* sw, scalar_t* out) {
  using acc_t = at::opmath_type<scalar_t>;
#ifdef LIGHTNING_VIS_SSE2
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<sw_t, uint8_t>) {
    if (const int kt = k2s2_depth(g); kt > 0 && simd::has_avx2()) {
      const int64_t rows = g.N * g.C * g.in[0] * g.in[1];
      at::parallel_for(0, rows, grain_for(g.in[2] * 2), [&](int64_t begin, int64_t end) {
        (kt == 1 ? simd::unpool_rows_k2s2_avx2<1> : simd::unpool_rows_k2s2_avx2<2>)(
            v, sw, out, begin, end, g.in[0], g.in[1], g.in[2], g.out[0], g.out[1], g.out[2]);
      });
      return;
    }
  }
#endif
  const int64_t T = g.in[0], H = g.in[1], W = g.in[2];
  const int64_t OT = g.out[0], OH = g.out[1], OW = g.out[2];
  const int64_t kh = g.k[1], kw = g.k[2], s = g.s[2], d = g.d[2], p = g.p[2];
  // Direct path along W: pooled columns [dlo, dhi) whose S cells lie inside the row.
  const bool w_tiles = d == 1 && kw <= s;
  int64_t dlo = (p + s - 1) / s, dhi = std::min(OW, (W + p) / s);
  if (dhi < dlo) dhi = dlo;
  const CoverTable cT(T, g.k[0], g.s[0], g.d[0], g.p[0], OT), cH(H, kh, g.s[1], g.d[1], g.p[1], OH);
  const auto direct = w_tiles ? pick_direct<scalar_t, sw_t>(kw, s) : nullptr;
  const int64_t Q = (W + p + s - 1) / s + 1;  // residue buffer length (q of every cell, plus slack)
  const int64_t rows = g.N * g.C * T * H;
  at::parallel_for(0, rows, grain_for(W + OW * kw), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(s * Q);
    RowCounter rc(begin, T, H);
    for (int64_t r = begin; r < end; ++r, rc.next()) {
      const int64_t plane = rc.outer, t = rc.a, h = rc.b;
      scalar_t* __restrict__ orow = out + r * W;
      const int64_t pairs = cT.count(t) * cH.count(h);
      if (pairs == 0) {
        std::fill(orow, orow + W, scalar_t(0));
        continue;
      }
      if (pairs == 1 && direct != nullptr) {
        const int64_t et = cT.begin[t], eh = cH.begin[h];
        const int64_t o = ((plane * OT + cT.o[et]) * OH + cH.o[eh]) * OW;
        const int32_t off = static_cast<int32_t>((cT.tap[et] * kh + cH.tap[eh]) * kw);
        direct(v + o, sw + o, off, orow - p, dlo, dhi);
        // Cells outside the directly written span [dlo * s - p, dhi * s - p).
        auto edge = [&](int64_t a, int64_t b) {
          for (int64_t w = a; w < b; ++w) {
            const int64_t ow = (w + p) / s, j = (w + p) % s;
            const bool hit = j < kw && ow < OW && static_cast<int32_t>(sw[o + ow]) == off + j;
            orow[w] = hit ? v[o + ow] : scalar_t(0);
          }
        };
        edge(0, std::min(W, dlo * s - p));
        edge(std::max<int64_t>(0, dhi * s - p), W);
        continue;
      }
      // Residue buffers: cell w with w + p = q * s + r collects into res[r * Q + q]; tap j of pooled column ow
      // lands at q = ow + (j * d) / s in residue (j * d) % s. Every loop below runs over contiguous memory.
      acc_t* __restrict__ res = buf.data();
      std::fill(res, res + s * Q, acc_t(0));
      for (int64_t a = cT.begin[t]; a < cT.begin[t + 1]; ++a) {
        for (int64_t c = cH.begin[h]; c < cH.begin[h + 1]; ++c) {
          const int64_t o = ((plane * OT + cT.o[a]) * OH + cH.o[c]) * OW;
          for (int64_t j = 0; j < kw; ++j) {
            const int64_t sh = (j * d) / s;
            const sw_t off = static_cast<sw_t>((cT.tap[a] * kh + cH.tap[c]) * kw + j);
            acc_t* __restrict__ rr = res + ((j * d) % s) * Q + sh;
            const scalar_t* __restrict__ vr = v + o;
            const sw_t* __restrict__ sr = sw + o;
            const int64_t n = std::min(OW, Q - sh);
            for (int64_t ow = 0; ow < n; ++ow) {
              const acc_t val = static_cast<acc_t>(vr[ow]);
              rr[ow] += sr[ow] == off ? val : acc_t(0);
            }
          }
        }
      }
      for (int64_t r = 0; r < s; ++r) {
        const acc_t* __restrict__ rr = res + r * Q;
        // cells w = q * s + r - p inside [0, W)
        const int64_t q0 = r >= p ? 0 : (p - r + s - 1) / s;
        const int64_t last = W - 1 + p - r;  // q * s <= last
        const int64_t q1 = last < 0 ? 0 : std::min(Q, last / s + 1);
        for (int64_t q = q0; q < q1; ++q) orow[q * s + r - p] = static_cast<scalar_t>(rr[q]);
      }
    }
  });
}

// out[c] = switch[c] == off ? value[c] : 0, and its accumulating twin (values loaded unconditionally, so that
// the loops vectorise).
template <typename scalar_t, typename sw_t>
__attribute__((always_inline)) inline void select_channels_impl(scalar_t* __restrict__ out,
                                                                const scalar_t* __restrict__ v,
                                                                const sw_t* __restrict__ sw, sw_t off, int64_t C) {
  for (int64_t c = 0; c < C; ++c) {
    const scalar_t val = v[c];
    out[c] = sw[c] == off ? val : scalar_t(0);
  }
}

template <typename scalar_t, typename sw_t>
__attribute__((always_inline)) inline void add_channels_impl(at::opmath_type<scalar_t>* __restrict__ acc,
                                                             const scalar_t* __restrict__ v,
                                                             const sw_t* __restrict__ sw, sw_t off, int64_t C) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t c = 0; c < C; ++c) {
    const acc_t val = static_cast<acc_t>(v[c]);
    acc[c] += sw[c] == off ? val : acc_t(0);
  }
}

LV_TWICE(select_channels, select_channels_impl, typename scalar_t LV_COMMA typename sw_t, scalar_t LV_COMMA sw_t,
         (scalar_t* out, const scalar_t* v, const sw_t* sw, sw_t off, int64_t C), (out, v, sw, off, C))
LV_TWICE(add_channels, add_channels_impl, typename scalar_t LV_COMMA typename sw_t, scalar_t LV_COMMA sw_t,
         (at::opmath_type<scalar_t>* acc, const scalar_t* v, const sw_t* sw, sw_t off, int64_t C),
         (acc, v, sw, off, C))

// Channels-last unpool for the k2s2_depth() geometry: input rows r in [begin, end) of (N, T, H); the covering
// window and the switch offset of each cell follow from its parity, with no per-cell table look-ups.
template <int KT, typename scalar_t, typename sw_t>
__attribute__((always_inline)) inline void unpool_cl_rows_k2s2_impl(const scalar_t* v, const sw_t* sw,
                                                                    scalar_t* out, int64_t begin, int64_t end,
                                                                    const PoolGeom* g) {
  const int64_t C = g->C, T = g->in[0], H = g->in[1], W = g->in[2], OT = g->out[0], OH = g->out[1],
                OW = g->out[2];
  int64_t h = begin % H, t = (begin / H) % T, n = begin / (H * T);
  for (int64_t r = begin; r < end; ++r) {
    scalar_t* orow = out + r * W * C;
    const int64_t ot = t / KT, oh = h / 2;
    if (ot >= OT || oh >= OH) {
      std::fill(orow, orow + W * C, scalar_t(0));
    } else {
      const int64_t base = ((n * OT + ot) * OH + oh) * OW;
      const int32_t off_row = static_cast<int32_t>(((t % KT) * 2 + h % 2) * 2);
      for (int64_t w = 0; w < W; ++w) {
        scalar_t* __restrict__ o = orow + w * C;
        const int64_t ow = w / 2;
        if (ow >= OW) {
          std::fill(o, o + C, scalar_t(0));
          continue;
        }
        const sw_t off = static_cast<sw_t>(off_row + (w & 1));
        const scalar_t* __restrict__ vr = v + (base + ow) * C;
        const sw_t* __restrict__ sr = sw + (base + ow) * C;
        for (int64_t c = 0; c < C; ++c) {
          const scalar_t val = vr[c];
          o[c] = sr[c] == off ? val : scalar_t(0);
        }
      }
    }
    if (++h == H) {
      h = 0;
      if (++t == T) {
        t = 0;
        ++n;
      }
    }
  }
}

LV_TWICE(unpool_cl_rows_k2s2, unpool_cl_rows_k2s2_impl, int KT LV_COMMA typename scalar_t LV_COMMA typename sw_t,
         KT LV_COMMA scalar_t LV_COMMA sw_t,
         (const scalar_t* v, const sw_t* sw, scalar_t* out, int64_t begin, int64_t end, const PoolGeom* g),
         (v, sw, out, begin, end, g))

template <typename scalar_t, typename sw_t>
void unpool_channels_last(const PoolGeom& g, const scalar_t* v, const sw_t* sw, scalar_t* out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = g.in[0], H = g.in[1], W = g.in[2], C = g.C;
  const int64_t OT = g.out[0], OH = g.out[1], OW = g.out[2];
  const int64_t kh = g.k[1], kw = g.k[2];
  const CoverTable cT(T, g.k[0], g.s[0], g.d[0], g.p[0], OT), cH(H, kh, g.s[1], g.d[1], g.p[1], OH),
      cW(W, kw, g.s[2], g.d[2], g.p[2], OW);
  const int64_t rows = g.N * T * H;
  const bool avx2 = use_avx2();
  if (const int kt = k2s2_depth(g); kt > 0) {
    using Fn = void (*)(const scalar_t*, const sw_t*, scalar_t*, int64_t, int64_t, const PoolGeom*);
    const Fn fn = kt == 1 ? (avx2 ? unpool_cl_rows_k2s2_avx2<1, scalar_t, sw_t> : unpool_cl_rows_k2s2<1, scalar_t, sw_t>)
                          : (avx2 ? unpool_cl_rows_k2s2_avx2<2, scalar_t, sw_t> : unpool_cl_rows_k2s2<2, scalar_t, sw_t>);
    at::parallel_for(0, rows, grain_for(W * C), [&](int64_t begin, int64_t end) { fn(v, sw, out, begin, end, &g); });
    return;
  }
  at::parallel_for(0, rows, grain_for(W * C * 2), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(C);
    RowCounter rc(begin, T, H);
    for (int64_t r = begin; r < end; ++r, rc.next()) {
      const int64_t n = rc.outer, t = rc.a, h = rc.b;
      const int64_t th_pairs = cT.count(t) * cH.count(h);
      for (int64_t w = 0; w < W; ++w) {
        scalar_t* __restrict__ orow = out + (r * W + w) * C;
        const int64_t pairs = th_pairs * cW.count(w);
        if (pairs == 0) {
          std::fill(orow, orow + C, scalar_t(0));
          continue;
        }
        if (pairs == 1) {  // one window covers this cell: write directly
          const int64_t et = cT.begin[t], eh = cH.begin[h], ew = cW.begin[w];
          const int64_t o = (((n * OT + cT.o[et]) * OH + cH.o[eh]) * OW + cW.o[ew]) * C;
          const scalar_t* __restrict__ vr = v + o;
          const sw_t* __restrict__ sr = sw + o;
          const sw_t off = static_cast<sw_t>((cT.tap[et] * kh + cH.tap[eh]) * kw + cW.tap[ew]);
          (avx2 ? select_channels_avx2<scalar_t, sw_t> : select_channels<scalar_t, sw_t>)(orow, vr, sr, off, C);
          continue;
        }
        acc_t* __restrict__ bp = buf.data();
        std::fill(bp, bp + C, acc_t(0));
        for (int64_t a = cT.begin[t]; a < cT.begin[t + 1]; ++a) {
          for (int64_t b = cH.begin[h]; b < cH.begin[h + 1]; ++b) {
            for (int64_t e = cW.begin[w]; e < cW.begin[w + 1]; ++e) {
              const int64_t o = (((n * OT + cT.o[a]) * OH + cH.o[b]) * OW + cW.o[e]) * C;
              const scalar_t* __restrict__ vr = v + o;
              const sw_t* __restrict__ sr = sw + o;
              const sw_t off = static_cast<sw_t>((cT.tap[a] * kh + cH.tap[b]) * kw + cW.tap[e]);
              (avx2 ? add_channels_avx2<scalar_t, sw_t> : add_channels<scalar_t, sw_t>)(bp, vr, sr, off, C);
            }
          }
        }
        for (int64_t c = 0; c < C; ++c) orow[c] = static_cast<scalar_t>(bp[c]);
      }
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

}  // namespace

TORCH_LIBRARY_IMPL(lightning_vis, CPU, m) {
  m.impl("max_pool_with_switches", &pool_op<pool_cpu_kernel>);
  m.impl("unpool", &unpool_op<unpool_cpu_kernel>);
  m.impl("gather_switches", &gather_op<gather_cpu_kernel>);
}

}  // namespace lightning_vis
