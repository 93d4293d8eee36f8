// Hand-vectorised rows for the commonest pooling windows (kernel 2 or 3, stride 2, dilation 1 along W, fp32,
// uint8 switches). The compiler's own vectorisation of these strided loops builds each vector from scalar
// loads. AVX2 (8 outputs a step) where the CPU has it, chosen at run time; SSE2 (4 a step), which every
// x86-64 CPU has, for what remains, then a scalar tail.
#pragma once
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

__attribute__((target("avx2"))) inline int64_t unpool_row_k2s2_avx2(const float* v, const uint8_t* sw, int32_t off,
                                                                   float* o, int64_t lo, int64_t hi) {
  const __m256i off0 = _mm256_set1_epi32(off), off1 = _mm256_set1_epi32(off + 1);
  int64_t ow = lo;
  for (; ow + 8 <= hi; ow += 8) {
    const __m256i s = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(sw + ow)));
    const __m256 val = _mm256_loadu_ps(v + ow);
    const __m256 a = _mm256_and_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(s, off0)), val);
    const __m256 b = _mm256_and_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(s, off1)), val);
    const __m256 lo4 = _mm256_unpacklo_ps(a, b), hi4 = _mm256_unpackhi_ps(a, b);  // per lane: a0 b0 a1 b1 | a2 b2 a3 b3
    _mm256_storeu_ps(o + 2 * ow, _mm256_permute2f128_ps(lo4, hi4, 0x20));
    _mm256_storeu_ps(o + 2 * ow + 8, _mm256_permute2f128_ps(lo4, hi4, 0x31));
  }
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
        if ((v > mv) | (v != v)) {
          mv = v;
          iv = offs[i] + j;
        }
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
