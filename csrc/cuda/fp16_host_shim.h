// __half and __nv_bfloat16 for a simulator build on a machine without a CUDA toolkit (no cuda_fp16.h): storage
// types with the four conversions the kernel bodies use, round-to-nearest-even as the toolkit's host code does
// (the fp16 algorithm is the branch-free one of the FP16 library that c10::Half also uses). Never compiled into the
// shipped extension: nvcc and a toolkit-equipped simulator build take the real headers (single_source.h).
#pragma once
#include <cstdint>
#include <cstring>

struct __half {
  uint16_t x;
};
struct __nv_bfloat16 {
  uint16_t x;
};

namespace lightning_vis {
namespace shim {
inline uint32_t bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
}  // namespace shim
}  // namespace lightning_vis

inline float __half2float(__half h) {
  using namespace lightning_vis::shim;
  const uint32_t w = static_cast<uint32_t>(h.x) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = from_bits((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
  return from_bits(sign | (two_w < (1u << 27) ? bits(denormalized) : bits(normalized)));
}

inline __half __float2half_rn(float f) {
  using namespace lightning_vis::shim;
  float base = (f < 0 ? -f : f) * 0x1.0p+112f * 0x1.0p-110f;
  const uint32_t w = bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = from_bits((bias >> 1) + 0x07800000u) + base;
  const uint32_t b = bits(base);
  const uint32_t nonsign = ((b >> 13) & 0x7C00u) + (b & 0x0FFFu);
  return __half{static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign))};
}

inline float __bfloat162float(__nv_bfloat16 h) {
  return lightning_vis::shim::from_bits(static_cast<uint32_t>(h.x) << 16);
}

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  const uint32_t u = lightning_vis::shim::bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return __nv_bfloat16{0x7FFF};  // NaN
  return __nv_bfloat16{static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16)};
}
