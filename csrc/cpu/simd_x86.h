// Hand-vectorised rows for the commonest pooling windows (kernel 2 or 3, stride 2, dilation 1 along W, fp32,
// uint8 switches). The compiler's own vectorisation of these strided loops builds each vector from scalar
// loads. AVX2 (8 outputs a step) where the CPU has it, chosen at run time; SSE2 (4 a step), which every
// x86-64 CPU has, for what remains, then a scalar tail.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define LIGHTNING_VIS_SSE2 1

namespace lightning_vis {
namespace simd {

inline bool has_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2");
  return yes;
}

// Even elements p[0], p[2], ..., p[14] of 16 floats (shuffle_ps works per 128-bit lane: fix the order after).
__attribute__((target("avx2"))) inline __m256 even8(const float* p) {
  const __m256 a = _mm256_loadu_ps(p), b = _mm256_loadu_ps(p + 8);
  return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0))),
                                                _MM_SHUFFLE(3, 1, 2, 0)));
}

__attribute__((target("avx2"))) inline __m256 odd8(const float* p) {  // p[1], p[3], ..., p[15]
  const __m256 a = _mm256_loadu_ps(p), b = _mm256_loadu_ps(p + 8);
  return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1))),
                                                _MM_SHUFFLE(3, 1, 2, 0)));
}

// Reads stop at the last input the block needs, except a 3-tap block, which reads one float further: it runs
// only while another output follows it (ow + 9 <= hi), so that float is inside the row.
template <int R, int KW>
__attribute__((target("avx2"))) int64_t pool_row_s2_avx2(const float* const* rows, const int32_t* offs, float* y,
                                                        uint8_t* sw, int64_t lo, int64_t hi) {
  int64_t ow = lo;
  for (; ow + 8 + (KW == 3) <= hi; ow += 8) {
    __m256 m = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
    __m256i idx = _mm256_set1_epi32(offs[0]);
    for (int i = 0; i < R; ++i) {
      const float* p = rows[i] + ow * 2;
      for (int j = 0; j < KW; ++j) {  // tap j of outputs ow..ow+7: p[2 * n + j]
        const __m256 v = j == 1 ? odd8(p) : even8(p + j);
        const __m256 take = _mm256_or_ps(_mm256_cmp_ps(v, m, _CMP_GT_OQ), _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        m = _mm256_blendv_ps(m, v, take);
        idx = _mm256_blendv_epi8(idx, _mm256_set1_epi32(offs[i] + j), _mm256_castps_si256(take));
      }
    }
    _mm256_storeu_ps(y + ow, m);
    const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(idx), _mm256_extracti128_si256(idx, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(sw + ow), _mm_packus_epi16(w, w));
  }
  return ow;
}

// 8 outputs of a kernel-2 stride-2 row group: R input rows, taps (i, j) numbered i * 2 + j.
template <int R>
__attribute__((target("avx2"), always_inline)) inline void pool_block8_k2s2(const float* const* rows, int64_t ow,
                                                                           float* y, uint8_t* sw) {
  __m256 m = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256i idx = _mm256_setzero_si256();
  for (int i = 0; i < R; ++i) {
    const float* p = rows[i] + ow * 2;
    for (int j = 0; j < 2; ++j) {
      const __m256 v = j ? odd8(p) : even8(p);
      const __m256 take = _mm256_or_ps(_mm256_cmp_ps(v, m, _CMP_GT_OQ), _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
      m = _mm256_blendv_ps(m, v, take);
      idx = _mm256_blendv_epi8(idx, _mm256_set1_epi32(i * 2 + j), _mm256_castps_si256(take));
    }
  }
  _mm256_storeu_ps(y + ow, m);
  const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(idx), _mm256_extracti128_si256(idx, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(sw + ow), _mm_packus_epi16(w, w));
}

// Whole chunks of rows for kernel 2 / stride 2 / no padding / no dilation along H and W, and along T either the
// same (KT = 2) or untouched (KT = 1: kernel 1, stride 1). Output rows r in [begin, end) of the planar
// (N*C, OT, OH, OW) output; pointers advance without per-row dispatch. Windows are always inside the input.
// A row's last 8 outputs are computed by one more block aligned to its end (recomputing a few is harmless).
template <int KT>
__attribute__((target("avx2"))) void pool_rows_k2s2_avx2(const float* x, float* y, uint8_t* sw, int64_t begin,
                                                        int64_t end, int64_t T, int64_t H, int64_t W, int64_t OT,
                                                        int64_t OH, int64_t OW) {
  constexpr int R = 2 * KT;
  int64_t oh = begin % OH, ot = (begin / OH) % OT, plane = begin / (OH * OT);
  for (int64_t r = begin; r < end; ++r) {
    const float* rows[R];
    for (int it = 0; it < KT; ++it)
      for (int ih = 0; ih < 2; ++ih) rows[it * 2 + ih] = x + ((plane * T + KT * ot + it) * H + 2 * oh + ih) * W;
    float* yr = y + r * OW;
    uint8_t* sr = sw + r * OW;
    if (OW >= 8) {
      for (int64_t ow = 0; ow + 8 <= OW; ow += 8) pool_block8_k2s2<R>(rows, ow, yr, sr);
      if (OW % 8) pool_block8_k2s2<R>(rows, OW - 8, yr, sr);
    } else {
      for (int64_t ow = 0; ow < OW; ++ow) {  // branch-free: random data would defeat the predictor
        float mv = -std::numeric_limits<float>::infinity();
        int32_t iv = 0;
        for (int i = 0; i < R; ++i) {
          for (int j = 0; j < 2; ++j) {
            const float v = rows[i][ow * 2 + j];
            const bool take = (v > mv) | (v != v);
            mv = take ? v : mv;
            iv = take ? i * 2 + j : iv;
          }
        }
        yr[ow] = mv;
        sr[ow] = static_cast<uint8_t>(iv);
      }
    }
    if (++oh == OH) {
      oh = 0;
      if (++ot == OT) {
        ot = 0;
        ++plane;
      }
    }
  }
}

// 16 cells of an unpooled row: pooled columns ow..ow+7, each writing its 2 cells.
__attribute__((target("avx2"), always_inline)) inline void unpool_block8_k2s2(const float* vr, const uint8_t* s,
                                                                             __m256i off0, __m256i off1, int64_t ow,
                                                                             float* o) {
  const __m256i sv = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(s + ow)));
  const __m256 val = _mm256_loadu_ps(vr + ow);
  const __m256 a = _mm256_and_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(sv, off0)), val);
  const __m256 b = _mm256_and_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(sv, off1)), val);
  const __m256 lo4 = _mm256_unpacklo_ps(a, b), hi4 = _mm256_unpackhi_ps(a, b);  // per lane: a0 b0 a1 b1 | a2 b2 ..
  _mm256_storeu_ps(o + 2 * ow, _mm256_permute2f128_ps(lo4, hi4, 0x20));
  _mm256_storeu_ps(o + 2 * ow + 8, _mm256_permute2f128_ps(lo4, hi4, 0x31));
}

// The adjoint: input rows r in [begin, end) of the planar (N*C, T, H, W) output, same geometry as above.
// Cells no window covers (an odd last row or column) are zero.
template <int KT>
__attribute__((target("avx2"))) void unpool_rows_k2s2_avx2(const float* v, const uint8_t* sw, float* out,
                                                          int64_t begin, int64_t end, int64_t T, int64_t H, int64_t W,
                                                          int64_t OT, int64_t OH, int64_t OW) {
  int64_t h = begin % H, t = (begin / H) % T, plane = begin / (H * T);
  for (int64_t r = begin; r < end; ++r) {
    float* o = out + r * W;
    const int64_t ot = t / KT, oh = h / 2;
    if (ot >= OT || oh >= OH) {
      std::fill(o, o + W, 0.0f);
    } else {
      const int64_t base = ((plane * OT + ot) * OH + oh) * OW;
      const float* vr = v + base;
      const uint8_t* s = sw + base;
      const int32_t off = static_cast<int32_t>(((t % KT) * 2 + h % 2) * 2);
      if (OW >= 8) {
        const __m256i off0 = _mm256_set1_epi32(off), off1 = _mm256_set1_epi32(off + 1);
        for (int64_t ow = 0; ow + 8 <= OW; ow += 8) unpool_block8_k2s2(vr, s, off0, off1, ow, o);
        if (OW % 8) unpool_block8_k2s2(vr, s, off0, off1, OW - 8, o);
      } else {
        for (int64_t ow = 0; ow < OW; ++ow) {
          const int32_t sv = s[ow];
          const float val = vr[ow];
          o[2 * ow] = sv == off ? val : 0.0f;
          o[2 * ow + 1] = sv == off + 1 ? val : 0.0f;
        }
      }
      for (int64_t w = 2 * OW; w < W; ++w) o[w] = 0.0f;
    }
    if (++h == H) {
      h = 0;
      if (++t == T) {
        t = 0;
        ++plane;
      }
    }
  }
}

__attribute__((target("avx2"))) inline int64_t unpool_row_k2s2_avx2(const float* v, const uint8_t* sw, int32_t off,
                                                                   float* o, int64_t lo, int64_t hi) {
  const __m256i off0 = _mm256_set1_epi32(off), off1 = _mm256_set1_epi32(off + 1);
  int64_t ow = lo;
  for (; ow + 8 <= hi; ow += 8) unpool_block8_k2s2(v, sw, off0, off1, ow, o);
  return ow;
}

// take = v > m or v is NaN; m, idx = take ? (v, off) : (m, idx)
inline void take_max(__m128 v, __m128i off, __m128& m, __m128i& idx) {
  const __m128 take = _mm_or_ps(_mm_cmpgt_ps(v, m), _mm_cmpunord_ps(v, v));
  m = _mm_or_ps(_mm_and_ps(take, v), _mm_andnot_ps(take, m));
  const __m128i t = _mm_castps_si128(take);
  idx = _mm_or_si128(_mm_and_si128(t, off), _mm_andnot_si128(t, idx));
}

inline void store_u8x4(uint8_t* p, __m128i idx) {
  const __m128i w = _mm_packs_epi32(idx, idx);
  const int32_t b = _mm_cvtsi128_si32(_mm_packus_epi16(w, w));
  std::memcpy(p, &b, 4);
}

// Max over R window rows x KW taps (2 or 3) at stride 2 for outputs [lo, hi); rows point at input position
// -pad. Returns hi.
template <int R, int KW>
int64_t pool_row_s2(const float* const* rows, const int32_t* offs, float* y, uint8_t* sw, int64_t lo, int64_t hi) {
  int64_t ow = has_avx2() ? pool_row_s2_avx2<R, KW>(rows, offs, y, sw, lo, hi) : lo;
  for (; ow + 4 + (KW == 3) <= hi; ow += 4) {  // same bound on reads as the AVX2 loop
    __m128 m = _mm_set1_ps(-std::numeric_limits<float>::infinity());
    __m128i idx = _mm_set1_epi32(offs[0]);
    for (int i = 0; i < R; ++i) {
      const float* p = rows[i] + ow * 2;
      const __m128 a = _mm_loadu_ps(p), b = _mm_loadu_ps(p + 4);
      take_max(_mm_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0)), _mm_set1_epi32(offs[i]), m, idx);
      take_max(_mm_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1)), _mm_set1_epi32(offs[i] + 1), m, idx);
      if (KW == 3) {  // tap 2: p[2], p[4], p[6], p[8]
        const __m128 c = _mm_loadu_ps(p + 2), e = _mm_loadu_ps(p + 6);
        take_max(_mm_shuffle_ps(c, e, _MM_SHUFFLE(2, 0, 2, 0)), _mm_set1_epi32(offs[i] + 2), m, idx);
      }
    }
    _mm_storeu_ps(y + ow, m);
    store_u8x4(sw + ow, idx);
  }
  for (; ow < hi; ++ow) {  // scalar tail, same rule
    float mv = -std::numeric_limits<float>::infinity();
    int32_t iv = offs[0];
    for (int i = 0; i < R; ++i) {
      for (int j = 0; j < KW; ++j) {
        const float v = rows[i][ow * 2 + j];
        const bool take = (v > mv) | (v != v);
        mv = take ? v : mv;
        iv = take ? offs[i] + j : iv;
      }
    }
    y[ow] = mv;
    sw[ow] = static_cast<uint8_t>(iv);
  }
  return ow;
}

// Unpool along a row tiled by windows of 2 cells: o[2 ow + j] = switch == off + j ? value : 0.
// o points at output position -pad. Returns hi.
inline int64_t unpool_row_k2s2(const float* v, const uint8_t* sw, int32_t off, float* o, int64_t lo, int64_t hi) {
  const __m128i off0 = _mm_set1_epi32(off), off1 = _mm_set1_epi32(off + 1), zero = _mm_setzero_si128();
  int64_t ow = has_avx2() ? unpool_row_k2s2_avx2(v, sw, off, o, lo, hi) : lo;
  for (; ow + 4 <= hi; ow += 4) {
    int32_t packed;
    std::memcpy(&packed, sw + ow, 4);
    const __m128i s = _mm_unpacklo_epi16(_mm_unpacklo_epi8(_mm_cvtsi32_si128(packed), zero), zero);
    const __m128 val = _mm_loadu_ps(v + ow);
    const __m128 a = _mm_and_ps(_mm_castsi128_ps(_mm_cmpeq_epi32(s, off0)), val);
    const __m128 b = _mm_and_ps(_mm_castsi128_ps(_mm_cmpeq_epi32(s, off1)), val);
    _mm_storeu_ps(o + 2 * ow, _mm_unpacklo_ps(a, b));
    _mm_storeu_ps(o + 2 * ow + 4, _mm_unpackhi_ps(a, b));
  }
  for (; ow < hi; ++ow) {  // scalar tail
    const int32_t s = sw[ow];
    o[2 * ow] = s == off ? v[ow] : 0.0f;
    o[2 * ow + 1] = s == off + 1 ? v[ow] : 0.0f;
  }
  return ow;
}

}  // namespace simd
}  // namespace lightning_vis
#endif
