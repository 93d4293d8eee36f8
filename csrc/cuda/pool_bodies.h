// The CUDA pooling kernels, written once (single_source.h): max-pool with switches, unpool (its adjoint, by
// gathering: deterministic, no atomics, no zero-fill pass) and gather at switches, as per-thread bodies, and the
// planner that picks a body, its index type and its grid. pool_kernel.cu launches them on the GPU; the simulator
// (csrc/sim/cuda_sim.cpp) runs the same bodies under the same plans on the CPU.
//
// Same selection rule as torch's kernels and ours on the CPU: a value is taken when greater than the running max or
// NaN, starting from -inf and the first window cell with non-negative coordinates. A cell outside the input reads as
// -inf, which is never taken: skipping it and reading -inf give the same values and switches.
//
// Bodies, by layout and window (the planner, dispatch_* below, chooses):
// - planar, window along W of 2 / stride 2 or 3 / stride 2 / padding 1 (any window along T and H; 2x2/s2, 3x3/s2/p1
//   and their 3D forms): pool and unpool handle a group of 16 bytes of outputs of one row per thread, reading each
//   window row with two 16-byte loads when the row is aligned, writing with vector stores (fp16 / bf16: 8 values per
//   access, compared in fp32).
// - channels last with C a multiple of the vector width and aligned tensors: 16 bytes of channels per thread, one
//   16-byte load per window cell.
// - planar gather: a group of outputs of one row per thread (switches and values through vector accesses).
// - anything else: one element per thread.
// Index arithmetic is int32 (divisions by multiply-high, Div<int32_t>) whenever every offset fits, int64 otherwise;
// coordinates are decoded once per group, not per element.
#pragma once
#include <cstdint>
#include <type_traits>

#include "../pool_geometry.h"
#include "single_source.h"

namespace lightning_vis {
namespace gpu {

// Index arithmetic in I (int32_t when every offset fits, else int64_t).
template <typename I>
struct Geo {
  I C, T, H, W, OT, OH, OW;
  I k[3], s[3], p[3], d[3];
  Div<I> dC, dT, dH, dW, dOT, dOH, dOW, dKHW, dKW, ds[3];
  bool cl;
  explicit Geo(const PoolGeom& g)
      : C(g.C), T(g.in[0]), H(g.in[1]), W(g.in[2]), OT(g.out[0]), OH(g.out[1]), OW(g.out[2]), dC(g.C),
        dT(g.in[0]), dH(g.in[1]), dW(g.in[2]), dOT(g.out[0]), dOH(g.out[1]), dOW(g.out[2]), dKHW(g.k[1] * g.k[2]),
        dKW(g.k[2]), cl(g.channels_last) {
    for (int i = 0; i < 3; ++i) {
      k[i] = static_cast<I>(g.k[i]);
      s[i] = static_cast<I>(g.s[i]);
      p[i] = static_cast<I>(g.p[i]);
      d[i] = static_cast<I>(g.d[i]);
      ds[i] = Div<I>(g.s[i]);
    }
  }
  // Element e of an (N, C, A, B, D) tensor in this layout -> its coordinates.
  LV_HOST_DEVICE void decode(I e, const Div<I>& dA, const Div<I>& dB, const Div<I>& dD, I& n, I& c, I& a, I& b,
                             I& x) const {
    if (cl) {
      e = divmod(dC, e, c);
      e = divmod(dD, e, x);
      e = divmod(dB, e, b);
      n = divmod(dA, e, a);
    } else {
      e = divmod(dD, e, x);
      e = divmod(dB, e, b);
      e = divmod(dA, e, a);
      n = divmod(dC, e, c);
    }
  }
  LV_HOST_DEVICE I offset(I n, I c, I a, I b, I x, I A, I B, I D) const {
    return cl ? (((n * A + a) * B + b) * D + x) * C + c : (((n * C + c) * A + a) * B + b) * D + x;
  }
  // A switch -> its window cell (it, ih, iw).
  LV_HOST_DEVICE void cell(I sw, I& it, I& ih, I& iw) const {
    I rest;
    it = divmod(dKHW, sw, rest);
    ih = divmod(dKW, rest, iw);
  }
  // Pooled index of the window covering position q with tap i along dim `dim`, or -1.
  LV_HOST_DEVICE I covering(int dim, I q, I i, I out) const {
    const I a = q + p[dim] - i * d[dim];
    if (a < 0) return -1;
    I rest;
    const I o = divmod(ds[dim], a, rest);
    return rest == 0 && o < out ? o : I(-1);
  }
};

template <typename I>
LV_HOST_DEVICE I first_tap(I start, I dil) {
  return start >= 0 ? I(0) : (-start + dil - 1) / dil;
}

// ------------------------------------------------------------------------------------------------------------------
// max-pool

template <typename T, typename S, typename I>
struct PoolGeneric {
  Geo<I> g;
  const T* x;
  T* y;
  S* sw;
  I total;
  Div<I> per;  // unused: one element per work item
  LV_HOST_DEVICE void operator()(const Thread& th) const {
    using A = typename Acc<T>::type;
    for (I e = first_item<I>(th); e < total; e += grid_stride<I>(th)) {
      LV_PATH(pool_generic);
      I n, c, ot, oh, ow;
      g.decode(e, g.dOT, g.dOH, g.dOW, n, c, ot, oh, ow);
      const I ts = ot * g.s[0] - g.p[0], hs = oh * g.s[1] - g.p[1], ws = ow * g.s[2] - g.p[2];
      const I it0 = first_tap(ts, g.d[0]), ih0 = first_tap(hs, g.d[1]), iw0 = first_tap(ws, g.d[2]);
      A m = neg_inf<A>();
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
            const A v = to_acc(ld(x + g.offset(n, c, t, h, w, g.T, g.H, g.W)));
            if (v > m || v != v) {
              m = v;
              idx = (it * g.k[1] + ih) * g.k[2] + iw;
            }
          }
        }
      }
      st(y + e, from_acc<T>(m));
      st(sw + e, static_cast<S>(idx));
    }
  }
};

// Calls f(it, ih, t, h) for the window rows (it, ih) of a window starting at (ts, hs) that lie inside the input, in
// tap order. KT, KH > 0: the window's extent along T and H, fixed at compile time (the loops unroll, and the rows'
// loads can all be issued before the first is used); 0: the geometry's.
template <int KT, int KH, typename I, class F>
LV_HOST_DEVICE void for_window_rows(const Geo<I>& g, I ts, I hs, F&& f) {
  if constexpr (KT > 0 && KH > 0) {
    LV_UNROLL
    for (int it = 0; it < KT; ++it) {
      const I t = ts + it * g.d[0];
      LV_UNROLL
      for (int ih = 0; ih < KH; ++ih) {
        const I h = hs + ih * g.d[1];
        if (t >= 0 && t < g.T && h >= 0 && h < g.H) f(I(it), I(ih), t, h);
      }
    }
  } else {
    for (I it = first_tap(ts, g.d[0]); it < g.k[0]; ++it) {
      const I t = ts + it * g.d[0];
      if (t >= g.T) break;
      for (I ih = first_tap(hs, g.d[1]); ih < g.k[1]; ++ih) {
        const I h = hs + ih * g.d[1];
        if (h >= g.H) break;
        f(it, ih, t, h);
      }
    }
  }
}

// Calls f(it, ih, ot, oh) for the pooled rows (ot, oh) whose windows cover the input row (t, h) with tap (it, ih), in
// tap order; KT, KH as for_window_rows.
template <int KT, int KH, typename I, class F>
LV_HOST_DEVICE void for_covering_rows(const Geo<I>& g, I t, I h, F&& f) {
  if constexpr (KT > 0 && KH > 0) {
    LV_UNROLL
    for (int it = 0; it < KT; ++it) {
      const I ot = g.covering(0, t, I(it), g.OT);
      LV_UNROLL
      for (int ih = 0; ih < KH; ++ih) {
        const I oh = g.covering(1, h, I(ih), g.OH);
        if (ot >= 0 && oh >= 0) f(I(it), I(ih), ot, oh);
      }
    }
  } else {
    for (I it = 0; it < g.k[0]; ++it) {
      const I ot = g.covering(0, t, it, g.OT);
      if (ot < 0) continue;
      for (I ih = 0; ih < g.k[1]; ++ih) {
        const I oh = g.covering(1, h, ih, g.OH);
        if (oh >= 0) f(it, ih, ot, oh);
      }
    }
  }
}

// Planar, window KW (2 or 3) / stride 2 / padding KW - 2 / dilation 1 along W; along T and H any window (KT x KH
// fixed at compile time for the common 2x2, 2x2x2 and 3x3 windows, else 0: the geometry's). One work item: V = 16
// bytes of consecutive outputs of one output row (row r over N * C * OT * OH, outputs ow0 .. ow0 + V - 1). Each
// window row inside the input is read once into a tile of NC cells (input columns 2 * ow0 - PW ..), with two 16-byte
// loads (+ one cell on the left when KW is 3) when the tile lies inside the row and the row is aligned.
template <typename T, typename S, typename I, int KW, int KT, int KH>
struct PoolS2 {
  static constexpr int V = 16 / sizeof(T);
  static constexpr int PW = KW - 2;  // padding along W: 0 or 1
  static constexpr int NC = 2 * V + KW - 2;
  Geo<I> g;
  const T* x;
  T* y;
  S* sw;
  I groups;
  Div<I> per_row;  // groups per output row
  LV_HOST_DEVICE void operator()(const Thread& th) const {
    using A = typename Acc<T>::type;
    for (I q = first_item<I>(th); q < groups; q += grid_stride<I>(th)) {
      if (KW == 2) LV_PATH(pool_s2_k2);
      else LV_PATH(pool_s2_k3);
      if (KT > 0) LV_PATH(pool_s2_fixed_rows);
      I j, oh, ot;
      const I r = divmod(per_row, q, j);
      const I nc = divmod(g.dOT, divmod(g.dOH, r, oh), ot);
      const I ow0 = j * V, c0 = 2 * ow0 - PW;
      const I ts = ot * g.s[0] - g.p[0], hs = oh * g.s[1] - g.p[1];
      const bool inside = c0 >= 0 && c0 + NC <= g.W;
      A m[V];
      int idx[V];
      const int first = static_cast<int>((first_tap(ts, g.d[0]) * g.k[1] + first_tap(hs, g.d[1])) * KW);
      LV_UNROLL
      for (int i = 0; i < V; ++i) {
        m[i] = neg_inf<A>();
        idx[i] = first + (c0 + 2 * i < 0 ? PW : 0);
      }
      for_window_rows<KT, KH>(g, ts, hs, [&](I it, I ih, I t, I h) {
        const T* row = x + ((nc * g.T + t) * g.H + h) * g.W;
        const T* a = row + 2 * ow0;
        A tile[NC];
        if (inside && is_aligned(a, 16)) {
          LV_PATH(pool_s2_vec_load);
          const Vec<T, V> u = ld_vec<V>(a), w = ld_vec<V>(a + V);
          if (PW) tile[0] = to_acc(ld(a - 1));
          LV_UNROLL
          for (int i = 0; i < V; ++i) {
            tile[PW + i] = to_acc(u.v[i]);
            tile[PW + V + i] = to_acc(w.v[i]);
          }
        } else {
          LV_PATH(pool_s2_scalar_load);
          LV_UNROLL
          for (int i = 0; i < NC; ++i) {
            const I col = c0 + i;
            tile[i] = (col >= 0 && col < g.W) ? to_acc(ld(row + col)) : neg_inf<A>();
          }
        }
        const int base = static_cast<int>((it * g.k[1] + ih) * KW);
        LV_UNROLL
        for (int i = 0; i < V; ++i) {
          LV_UNROLL
          for (int iw = 0; iw < KW; ++iw) {
            const A v = tile[2 * i + iw];
            if (v > m[i] || v != v) {
              m[i] = v;
              idx[i] = base + iw;
            }
          }
        }
      });
      T* yo = y + r * g.OW + ow0;
      S* so = sw + r * g.OW + ow0;
      if (ow0 + V <= g.OW && is_aligned(yo, 16) && is_aligned(so, sizeof(S) * V)) {
        LV_PATH(pool_s2_vec_store);
        Vec<T, V> vv;
        Vec<S, V> sv;
        LV_UNROLL
        for (int i = 0; i < V; ++i) {
          vv.v[i] = from_acc<T>(m[i]);
          sv.v[i] = static_cast<S>(idx[i]);
        }
        st_vec<V>(yo, vv);
        st_vec<V>(so, sv);
      } else {
        LV_PATH(pool_s2_scalar_store);
        LV_UNROLL
        for (int i = 0; i < V; ++i) {
          if (ow0 + i < g.OW) {
            st(yo + i, from_acc<T>(m[i]));
            st(so + i, static_cast<S>(idx[i]));
          }
        }
      }
    }
  }
};

// Channels last (N, T, H, W, C), C a multiple of V = 16 bytes of elements, every tensor aligned: one work item is V
// channels of one output position, each window cell one 16-byte load.
template <typename T, typename S, typename I>
struct PoolCL {
  static constexpr int V = 16 / sizeof(T);
  Geo<I> g;
  const T* x;
  T* y;
  S* sw;
  I groups;
  Div<I> per_pos;  // C / V
  LV_HOST_DEVICE void operator()(const Thread& th) const {
    using A = typename Acc<T>::type;
    for (I q = first_item<I>(th); q < groups; q += grid_stride<I>(th)) {
      LV_PATH(pool_cl_vec);
      I cg, ow, oh, ot;
      const I n = divmod(g.dOT, divmod(g.dOH, divmod(g.dOW, divmod(per_pos, q, cg), ow), oh), ot);
      const I ts = ot * g.s[0] - g.p[0], hs = oh * g.s[1] - g.p[1], ws = ow * g.s[2] - g.p[2];
      const I it0 = first_tap(ts, g.d[0]), ih0 = first_tap(hs, g.d[1]), iw0 = first_tap(ws, g.d[2]);
      A m[V];
      int idx[V];
      LV_UNROLL
      for (int i = 0; i < V; ++i) {
        m[i] = neg_inf<A>();
        idx[i] = static_cast<int>((it0 * g.k[1] + ih0) * g.k[2] + iw0);
      }
      for (I it = it0; it < g.k[0]; ++it) {
        const I t = ts + it * g.d[0];
        if (t >= g.T) break;
        for (I ih = ih0; ih < g.k[1]; ++ih) {
          const I h = hs + ih * g.d[1];
          if (h >= g.H) break;
          for (I iw = iw0; iw < g.k[2]; ++iw) {
            const I w = ws + iw * g.d[2];
            if (w >= g.W) break;
            const Vec<T, V> u = ld_vec<V>(x + (((n * g.T + t) * g.H + h) * g.W + w) * g.C + cg * V);
            const int off = static_cast<int>((it * g.k[1] + ih) * g.k[2] + iw);
            LV_UNROLL
            for (int i = 0; i < V; ++i) {
              const A v = to_acc(u.v[i]);
              if (v > m[i] || v != v) {
                m[i] = v;
                idx[i] = off;
              }
            }
          }
        }
      }
      Vec<T, V> vv;
      Vec<S, V> sv;
      LV_UNROLL
      for (int i = 0; i < V; ++i) {
        vv.v[i] = from_acc<T>(m[i]);
        sv.v[i] = static_cast<S>(idx[i]);
      }
      st_vec<V>(y + q * V, vv);
      st_vec<V>(sw + q * V, sv);
    }
  }
};

// ------------------------------------------------------------------------------------------------------------------
// unpool: every input cell sums the pooled values whose switch points at it.

template <typename T, typename S, typename I>
struct UnpoolGeneric {
  Geo<I> g;
  const T* v;
  const S* sw;
  T* out;
  I total;
  Div<I> per;  // unused: one element per work item
  LV_HOST_DEVICE void operator()(const Thread& th) const {
    using A = typename Acc<T>::type;
    for (I e = first_item<I>(th); e < total; e += grid_stride<I>(th)) {
      LV_PATH(unpool_generic);
      I n, c, t, h, w;
      g.decode(e, g.dT, g.dH, g.dW, n, c, t, h, w);
      A acc = 0;
      for (I it = 0; it < g.k[0]; ++it) {
        const I ot = g.covering(0, t, it, g.OT);
        if (ot < 0) continue;
        for (I ih = 0; ih < g.k[1]; ++ih) {
          const I oh = g.covering(1, h, ih, g.OH);
          if (oh < 0) continue;
          for (I iw = 0; iw < g.k[2]; ++iw) {
            const I ow = g.covering(2, w, iw, g.OW);
            if (ow < 0) continue;
            const I o = g.offset(n, c, ot, oh, ow, g.OT, g.OH, g.OW);
            if (static_cast<I>(ld(sw + o)) == (it * g.k[1] + ih) * g.k[2] + iw) acc += to_acc(ld(v + o));
          }
        }
      }
      st(out + e, from_acc<T>(acc));
    }
  }
};

// Planar, the same windows as PoolS2. One work item: 2 * V consecutive cells of one input row (row r over
// N * C * T * H, columns w0 = 2 * V * j ..), covered along W by the pooled columns ow0 = V * j .. ow0 + V - 1 (and
// ow0 + V when KW is 3): per covering pooled row, V values and V switches in one vector load each.
template <typename T, typename S, typename I, int KW, int KT, int KH>
struct UnpoolS2 {
  static constexpr int V = 16 / sizeof(T);
  static constexpr int NP = V + KW - 2;  // pooled columns read per covering row
  Geo<I> g;
  const T* v;
  const S* sw;
  T* out;
  I groups;
  Div<I> per_row;  // groups per input row
  LV_HOST_DEVICE void operator()(const Thread& th) const {
    using A = typename Acc<T>::type;
    for (I q = first_item<I>(th); q < groups; q += grid_stride<I>(th)) {
      if (KW == 2) LV_PATH(unpool_s2_k2);
      else LV_PATH(unpool_s2_k3);
      if (KT > 0) LV_PATH(unpool_s2_fixed_rows);
      I j, h, t;
      const I r = divmod(per_row, q, j);
      const I nc = divmod(g.dT, divmod(g.dH, r, h), t);
      const I w0 = j * (2 * V), ow0 = j * V;
      A acc[2 * V];
      LV_UNROLL
      for (int i = 0; i < 2 * V; ++i) acc[i] = 0;
      for_covering_rows<KT, KH>(g, t, h, [&](I it, I ih, I ot, I oh) {
        const I pr = ((nc * g.OT + ot) * g.OH + oh) * g.OW + ow0;
        A val[NP];
        int s[NP];
        if (ow0 + NP <= g.OW && is_aligned(v + pr, 16) && is_aligned(sw + pr, sizeof(S) * V)) {
          LV_PATH(unpool_s2_vec_load);
          const Vec<T, V> a = ld_vec<V>(v + pr);
          const Vec<S, V> b = ld_vec<V>(sw + pr);
          LV_UNROLL
          for (int i = 0; i < V; ++i) {
            val[i] = to_acc(a.v[i]);
            s[i] = static_cast<int>(b.v[i]);
          }
          if (NP > V) {
            val[NP - 1] = to_acc(ld(v + pr + V));
            s[NP - 1] = static_cast<int>(ld(sw + pr + V));
          }
        } else {
          LV_PATH(unpool_s2_scalar_load);
          LV_UNROLL
          for (int i = 0; i < NP; ++i) {
            const bool in = ow0 + i < g.OW;
            val[i] = in ? to_acc(ld(v + pr + i)) : A(0);
            s[i] = in ? static_cast<int>(ld(sw + pr + i)) : -1;
          }
        }
        const int base = static_cast<int>((it * g.k[1] + ih) * KW);
        LV_UNROLL
        for (int i = 0; i < V; ++i) {
          if (KW == 2) {  // pooled column i covers cells 2i (tap 0) and 2i + 1 (tap 1)
            acc[2 * i] += s[i] == base ? val[i] : A(0);
            acc[2 * i + 1] += s[i] == base + 1 ? val[i] : A(0);
          } else {  // pooled column i covers 2i - 1 (tap 0), 2i (tap 1), 2i + 1 (tap 2); taps in order per cell
            acc[2 * i] += s[i] == base + 1 ? val[i] : A(0);
            acc[2 * i + 1] += s[i + KW - 2] == base ? val[i + KW - 2] : A(0);
            acc[2 * i + 1] += s[i] == base + 2 ? val[i] : A(0);
          }
        }
      });
      T* o = out + r * g.W + w0;
      if (w0 + 2 * V <= g.W && is_aligned(o, 16)) {
        LV_PATH(unpool_s2_vec_store);
        Vec<T, V> a, b;
        LV_UNROLL
        for (int i = 0; i < V; ++i) {
          a.v[i] = from_acc<T>(acc[i]);
          b.v[i] = from_acc<T>(acc[V + i]);
        }
        st_vec<V>(o, a);
        st_vec<V>(o + V, b);
      } else {
        LV_PATH(unpool_s2_scalar_store);
        LV_UNROLL
        for (int i = 0; i < 2 * V; ++i) {
          if (w0 + i < g.W) st(o + i, from_acc<T>(acc[i]));
        }
      }
    }
  }
};

// Channels last, as PoolCL: V channels of one input position per work item.
template <typename T, typename S, typename I>
struct UnpoolCL {
  static constexpr int V = 16 / sizeof(T);
  Geo<I> g;
  const T* v;
  const S* sw;
  T* out;
  I groups;
  Div<I> per_pos;
  LV_HOST_DEVICE void operator()(const Thread& th) const {
    using A = typename Acc<T>::type;
    for (I q = first_item<I>(th); q < groups; q += grid_stride<I>(th)) {
      LV_PATH(unpool_cl_vec);
      I cg, w, h, t;
      const I n = divmod(g.dT, divmod(g.dH, divmod(g.dW, divmod(per_pos, q, cg), w), h), t);
      A acc[V];
      LV_UNROLL
      for (int i = 0; i < V; ++i) acc[i] = 0;
      for (I it = 0; it < g.k[0]; ++it) {
        const I ot = g.covering(0, t, it, g.OT);
        if (ot < 0) continue;
        for (I ih = 0; ih < g.k[1]; ++ih) {
          const I oh = g.covering(1, h, ih, g.OH);
          if (oh < 0) continue;
          for (I iw = 0; iw < g.k[2]; ++iw) {
            const I ow = g.covering(2, w, iw, g.OW);
            if (ow < 0) continue;
            const I o = (((n * g.OT + ot) * g.OH + oh) * g.OW + ow) * g.C + cg * V;
            const Vec<S, V> s = ld_vec<V>(sw + o);
            const Vec<T, V> a = ld_vec<V>(v + o);
            const int tap = static_cast<int>((it * g.k[1] + ih) * g.k[2] + iw);
            LV_UNROLL
            for (int i = 0; i < V; ++i) acc[i] += static_cast<int>(s.v[i]) == tap ? to_acc(a.v[i]) : A(0);
          }
        }
      }
      Vec<T, V> res;
      LV_UNROLL
      for (int i = 0; i < V; ++i) res.v[i] = from_acc<T>(acc[i]);
      st_vec<V>(out + q * V, res);
    }
  }
};

// ------------------------------------------------------------------------------------------------------------------
// gather: out[pooled cell] = grad[the input cell its switch points at], 0 where that cell is outside the input.

template <typename T, typename S, typename I>
struct GatherGeneric {
  Geo<I> g;
  const T* grad;
  const S* sw;
  T* out;
  I total;
  Div<I> per;  // unused: one element per work item
  LV_HOST_DEVICE void operator()(const Thread& th) const {
    for (I e = first_item<I>(th); e < total; e += grid_stride<I>(th)) {
      LV_PATH(gather_generic);
      I n, c, ot, oh, ow, it, ih, iw;
      g.decode(e, g.dOT, g.dOH, g.dOW, n, c, ot, oh, ow);
      g.cell(static_cast<I>(ld(sw + e)), it, ih, iw);
      const I t = ot * g.s[0] - g.p[0] + it * g.d[0];
      const I h = oh * g.s[1] - g.p[1] + ih * g.d[1];
      const I w = ow * g.s[2] - g.p[2] + iw * g.d[2];
      const bool inside = t >= 0 && t < g.T && h >= 0 && h < g.H && w >= 0 && w < g.W;
      st(out + e, inside ? ld(grad + g.offset(n, c, t, h, w, g.T, g.H, g.W)) : from_acc<T>(0));
    }
  }
};

// Planar: V consecutive outputs of one output row per work item; their switches in one load, values in one store.
template <typename T, typename S, typename I>
struct GatherRows {
  static constexpr int V = 16 / sizeof(T);
  Geo<I> g;
  const T* grad;
  const S* sw;
  T* out;
  I groups;
  Div<I> per_row;
  LV_HOST_DEVICE void operator()(const Thread& th) const {
    for (I q = first_item<I>(th); q < groups; q += grid_stride<I>(th)) {
      LV_PATH(gather_rows);
      I j, oh, ot;
      const I r = divmod(per_row, q, j);
      const I nc = divmod(g.dOT, divmod(g.dOH, r, oh), ot);
      const I ow0 = j * V;
      const S* sr = sw + r * g.OW + ow0;
      T* o = out + r * g.OW + ow0;
      const bool vec = ow0 + V <= g.OW && is_aligned(sr, sizeof(S) * V) && is_aligned(o, 16);
      I s[V];
      if (vec) {
        LV_PATH(gather_rows_vec);
        const Vec<S, V> a = ld_vec<V>(sr);
        LV_UNROLL
        for (int i = 0; i < V; ++i) s[i] = static_cast<I>(a.v[i]);
      } else {
        LV_UNROLL
        for (int i = 0; i < V; ++i) s[i] = ow0 + i < g.OW ? static_cast<I>(ld(sr + i)) : I(0);
      }
      const I ts = ot * g.s[0] - g.p[0], hs = oh * g.s[1] - g.p[1];
      const T* plane = grad + nc * g.T * g.H * g.W;
      Vec<T, V> res;
      LV_UNROLL
      for (int i = 0; i < V; ++i) {
        I it, ih, iw;
        g.cell(s[i], it, ih, iw);
        const I t = ts + it * g.d[0], h = hs + ih * g.d[1], w = (ow0 + i) * g.s[2] - g.p[2] + iw * g.d[2];
        const bool inside = ow0 + i < g.OW && t >= 0 && t < g.T && h >= 0 && h < g.H && w >= 0 && w < g.W;
        res.v[i] = inside ? ld(plane + (t * g.H + h) * g.W + w) : from_acc<T>(0);
      }
      if (vec) {
        st_vec<V>(o, res);
      } else {
        LV_UNROLL
        for (int i = 0; i < V; ++i) {
          if (ow0 + i < g.OW) st(o + i, res.v[i]);
        }
      }
    }
  }
};

// Channels last, as PoolCL: V channels of one pooled position per work item.
template <typename T, typename S, typename I>
struct GatherCL {
  static constexpr int V = 16 / sizeof(T);
  Geo<I> g;
  const T* grad;
  const S* sw;
  T* out;
  I groups;
  Div<I> per_pos;
  LV_HOST_DEVICE void operator()(const Thread& th) const {
    for (I q = first_item<I>(th); q < groups; q += grid_stride<I>(th)) {
      LV_PATH(gather_cl_vec);
      I cg, ow, oh, ot;
      const I n = divmod(g.dOT, divmod(g.dOH, divmod(g.dOW, divmod(per_pos, q, cg), ow), oh), ot);
      const Vec<S, V> s = ld_vec<V>(sw + q * V);
      const T* base = grad + n * g.T * g.H * g.W * g.C + cg * V;
      Vec<T, V> res;
      LV_UNROLL
      for (int i = 0; i < V; ++i) {
        I it, ih, iw;
        g.cell(static_cast<I>(s.v[i]), it, ih, iw);
        const I t = ot * g.s[0] - g.p[0] + it * g.d[0];
        const I h = oh * g.s[1] - g.p[1] + ih * g.d[1];
        const I w = ow * g.s[2] - g.p[2] + iw * g.d[2];
        const bool inside = t >= 0 && t < g.T && h >= 0 && h < g.H && w >= 0 && w < g.W;
        res.v[i] = inside ? ld(base + ((t * g.H + h) * g.W + w) * g.C + i) : from_acc<T>(0);
      }
      st_vec<V>(out + q * V, res);
    }
  }
};

// ------------------------------------------------------------------------------------------------------------------
// The planner: which body, index type and grid. `launch(kernel, plan)` is the GPU launcher (pool_kernel.cu) or the
// simulator's; everything above it is shared.

// Every offset of the problem fits int32 with headroom for intermediate products.
inline bool fits_int32(const PoolGeom& g) {
  const int64_t in = g.N * g.C * g.in_plane(), out = g.N * g.C * g.out_plane();
  const int64_t big = (in > out ? in : out) + g.C * g.window() * 4 + 64;
  return big < (int64_t(1) << 30);
}

// The window along W that the S2 bodies serve (2: 2 / stride 2; 3: 3 / stride 2 / padding 1), or 0.
inline int s2_window(const PoolGeom& g) {
  if (g.channels_last || g.s[2] != 2 || g.d[2] != 1 || g.window() > 255) return 0;
  if (g.k[2] == 2 && g.p[2] == 0) return 2;
  if (g.k[2] == 3 && g.p[2] == 1) return 3;
  return 0;
}

template <int N>
struct Int {
  static constexpr int value = N;
};

// Calls f(Int<KW>, Int<KT>, Int<KH>, shape name) with the S2 bodies' template arguments for the geometry: the window
// along T and H fixed at compile time where it is 1 x 2, 2 x 2 (with KW 2) or 1 x 3 (with KW 3), else 0 x 0.
template <class F>
void with_s2_shape(int kw, const PoolGeom& g, F&& f) {
  if (kw == 2 && g.k[0] == 1 && g.k[1] == 2) return f(Int<2>{}, Int<1>{}, Int<2>{}, "2x2");
  if (kw == 2 && g.k[0] == 2 && g.k[1] == 2) return f(Int<2>{}, Int<2>{}, Int<2>{}, "2x2x2");
  if (kw == 2) return f(Int<2>{}, Int<0>{}, Int<0>{}, "any rows");
  if (g.k[0] == 1 && g.k[1] == 3) return f(Int<3>{}, Int<1>{}, Int<3>{}, "3x3");
  return f(Int<3>{}, Int<0>{}, Int<0>{}, "any rows");
}

// The types of one launch: data T, switches S, index I (int32 while every offset fits, unless the limits force int64),
// the vector width V and the index bits.
template <typename T_, typename S_, typename I_>
struct Types {
  using T = T_;
  using S = S_;
  using I = I_;
  static constexpr int V = 16 / sizeof(T);
  static constexpr int bits = 8 * sizeof(I);
};

// Calls f(Types<T, S, I>{}) for the problem.
template <class F>
void with_types(const PoolGeom& g, Dtype dt, SwitchDtype st, const Limits& lim, F&& f) {
  const bool int64 = lim.force_int64 || !fits_int32(g);
  auto with_s = [&](auto t) {
    using T = typename decltype(t)::type;
    auto with_i = [&](auto s) {
      using S = typename decltype(s)::type;
      if (int64) f(Types<T, S, int64_t>{});
      else f(Types<T, S, int32_t>{});
    };
    if (st == SwitchDtype::U8) with_i(Tag<uint8_t>{});
    else with_i(Tag<int32_t>{});
  };
  switch (dt) {
    case Dtype::F32: with_s(Tag<float>{}); break;
    case Dtype::F64: with_s(Tag<double>{}); break;
    case Dtype::F16: with_s(Tag<__half>{}); break;
    case Dtype::BF16: with_s(Tag<__nv_bfloat16>{}); break;
  }
}

// Channels last with C a multiple of the vector width and every tensor aligned for it.
template <typename T, typename S>
bool cl_vector_ok(const PoolGeom& g, const void* data_a, const void* data_b, const void* switches) {
  constexpr int V = 16 / sizeof(T);
  return g.channels_last && g.C % V == 0 && is_aligned(data_a, 16) && is_aligned(data_b, 16) &&
         is_aligned(switches, sizeof(S) * V);
}

// Launches body B{geometry, pointers..., work items, divisor per} under the plan named `name`.
template <class B, typename I, class L, class... P>
void launch_body(L& launch, const char* name, const char* shape, int vec, int64_t work, int64_t per,
                 const Limits& lim, const Geo<I>& g, P... pointers) {
  launch(B{g, pointers..., static_cast<I>(work), Div<I>(per)}, make_plan(name, 8 * sizeof(I), vec, work, lim, shape));
}

// Planar bodies over rows of `len` cells in groups of `group`: (work items, groups per row).
inline void row_groups(int64_t rows, int64_t len, int64_t group, int64_t& work, int64_t& per_row) {
  per_row = (len + group - 1) / group;
  work = rows * per_row;
}

template <class L>
void dispatch_pool(L& launch, const PoolGeom& pg, Dtype dt, SwitchDtype st, const void* x_, void* y_, void* sw_,
                   const Limits& lim) {
  with_types(pg, dt, st, lim, [&](auto ty) {
    using Ty = decltype(ty);
    using T = typename Ty::T;
    using S = typename Ty::S;
    using I = typename Ty::I;
    const Geo<I> g(pg);
    const auto x = static_cast<const T*>(x_);
    const auto y = static_cast<T*>(y_);
    const auto sw = static_cast<S*>(sw_);
    const int64_t outputs = pg.N * pg.C * pg.out_plane();
    if constexpr (std::is_same<S, uint8_t>::value) {
      if (const int kw = s2_window(pg)) {
        int64_t work, per_row;
        row_groups(pg.N * pg.C * pg.out[0] * pg.out[1], pg.out[2], Ty::V, work, per_row);
        return with_s2_shape(kw, pg, [&](auto kw_, auto kt_, auto kh_, const char* shape) {
          constexpr int KW = decltype(kw_)::value, KT = decltype(kt_)::value, KH = decltype(kh_)::value;
          launch_body<PoolS2<T, S, I, KW, KT, KH>>(launch, KW == 2 ? "pool_s2_k2" : "pool_s2_k3", shape, Ty::V, work,
                                                   per_row, lim, g, x, y, sw);
        });
      }
    }
    if (cl_vector_ok<T, S>(pg, x, y, sw)) {
      return launch_body<PoolCL<T, S, I>>(launch, "pool_cl_vec", "", Ty::V, outputs / Ty::V, pg.C / Ty::V, lim, g, x,
                                          y, sw);
    }
    launch_body<PoolGeneric<T, S, I>>(launch, "pool_generic", "", 1, outputs, 1, lim, g, x, y, sw);
  });
}

template <class L>
void dispatch_unpool(L& launch, const PoolGeom& pg, Dtype dt, SwitchDtype st, const void* v_, const void* sw_,
                     void* out_, const Limits& lim) {
  with_types(pg, dt, st, lim, [&](auto ty) {
    using Ty = decltype(ty);
    using T = typename Ty::T;
    using S = typename Ty::S;
    using I = typename Ty::I;
    const Geo<I> g(pg);
    const auto v = static_cast<const T*>(v_);
    const auto sw = static_cast<const S*>(sw_);
    const auto out = static_cast<T*>(out_);
    const int64_t cells = pg.N * pg.C * pg.in_plane();
    if constexpr (std::is_same<S, uint8_t>::value) {
      if (const int kw = s2_window(pg)) {
        int64_t work, per_row;
        row_groups(pg.N * pg.C * pg.in[0] * pg.in[1], pg.in[2], 2 * Ty::V, work, per_row);
        return with_s2_shape(kw, pg, [&](auto kw_, auto kt_, auto kh_, const char* shape) {
          constexpr int KW = decltype(kw_)::value, KT = decltype(kt_)::value, KH = decltype(kh_)::value;
          launch_body<UnpoolS2<T, S, I, KW, KT, KH>>(launch, KW == 2 ? "unpool_s2_k2" : "unpool_s2_k3", shape, Ty::V,
                                                     work, per_row, lim, g, v, sw, out);
        });
      }
    }
    if (cl_vector_ok<T, S>(pg, v, out, sw)) {
      return launch_body<UnpoolCL<T, S, I>>(launch, "unpool_cl_vec", "", Ty::V, cells / Ty::V, pg.C / Ty::V, lim, g,
                                            v, sw, out);
    }
    launch_body<UnpoolGeneric<T, S, I>>(launch, "unpool_generic", "", 1, cells, 1, lim, g, v, sw, out);
  });
}

template <class L>
void dispatch_gather(L& launch, const PoolGeom& pg, Dtype dt, SwitchDtype st, const void* grad_, const void* sw_,
                     void* out_, const Limits& lim) {
  with_types(pg, dt, st, lim, [&](auto ty) {
    using Ty = decltype(ty);
    using T = typename Ty::T;
    using S = typename Ty::S;
    using I = typename Ty::I;
    const Geo<I> g(pg);
    const auto grad = static_cast<const T*>(grad_);
    const auto sw = static_cast<const S*>(sw_);
    const auto out = static_cast<T*>(out_);
    const int64_t outputs = pg.N * pg.C * pg.out_plane();
    if (!pg.channels_last) {
      int64_t work, per_row;
      row_groups(pg.N * pg.C * pg.out[0] * pg.out[1], pg.out[2], Ty::V, work, per_row);
      return launch_body<GatherRows<T, S, I>>(launch, "gather_rows", "", Ty::V, work, per_row, lim, g, grad, sw, out);
    }
    if (cl_vector_ok<T, S>(pg, grad, out, sw)) {
      return launch_body<GatherCL<T, S, I>>(launch, "gather_cl_vec", "", Ty::V, outputs / Ty::V, pg.C / Ty::V, lim,
                                            g, grad, sw, out);
    }
    launch_body<GatherGeneric<T, S, I>>(launch, "gather_generic", "", 1, outputs, 1, lim, g, grad, sw, out);
  });
}

}  // namespace gpu
}  // namespace lightning_vis
