// The FP8 recipe of jax_ep.fp8.per_token_cast, as XLA compiles it on the GPU, for kernels
// that cast rows on the way (low-latency dispatch, normal dispatch with cast_fp8):
//   amax = max(max|x|, 1e-4) over 128 channels; q = e4m3_satfinite_rn(x * div.full(448,
//   amax)); scale = amax * f32(1/448)  (XLA's algebraic simplifier turns "/ 448" into it).
// Bitwise equal to the XLA cast for finite inputs (NaN inputs are not matched).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <cstdint>

namespace jax_ep {

constexpr float kE4m3Max = 448.0f;
constexpr float kAmaxFloor = 1e-4f;
constexpr float kInvE4m3Max = 1.0f / 448.0f;

__device__ __forceinline__ float div_full(float a, float b) {
  float r;  // XLA lowers f32 division with -nvptx-prec-divf32=1, i.e. div.full.f32
  asm("div.full.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}

// Eight channels per lane; lanes 16i .. 16i+15 hold one 128-channel group (every lane of
// the warp must call, shuffles). Returns the lane's eight e4m3 values packed little-end
// first; *scale = the group's scale.
__device__ __forceinline__ uint2 cast8_e4m3(const float (&f)[8], float* scale) {
  float amax = 0.0f;
#pragma unroll
  for (int i = 0; i < 8; ++i) amax = fmaxf(amax, fabsf(f[i]));
#pragma unroll
  for (int d = 8; d > 0; d >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, d));
  amax = fmaxf(amax, kAmaxFloor);
  const float mul = div_full(kE4m3Max, amax);
  uint32_t packed[2] = {0u, 0u};
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const __nv_fp8_storage_t v =
        __nv_cvt_float_to_fp8(__fmul_rn(f[i], mul), __NV_SATFINITE, __NV_E4M3);
    packed[i / 4] |= uint32_t(v) << (8 * (i % 4));
  }
  *scale = __fmul_rn(amax, kInvE4m3Max);
  return make_uint2(packed[0], packed[1]);
}

__device__ __forceinline__ void bf16x8_to_f32(int4 raw, float (&f)[8]) {
  const __nv_bfloat162* p = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 v = __bfloat1622float2(p[i]);
    f[2 * i] = v.x;
    f[2 * i + 1] = v.y;
  }
}

}  // namespace jax_ep
