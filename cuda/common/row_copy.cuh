// Warp-wide row copies: one source row to up to kMaxRanks destination rows (local or
// peer memory), in 16-byte vectors when the row size allows, with several loads in
// flight per lane before the first store (NVLink and HBM both need the parallelism).
#pragma once

#include <cstdint>

#include "cuda/common/buffer_layout.h"

namespace jax_ep {

constexpr int kCopyUnroll = 8;

__device__ __forceinline__ int4 ld_nc_v4(const int4* p) {
  int4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.s32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// Copies `bytes` from src to every non-null dst[r] (r < kMaxRanks). Row starts must be
// aligned to the vector width that `bytes` allows (XLA buffers are 64-byte aligned and
// rows are `bytes` apart, so this holds).
template <typename Vec>
__device__ __forceinline__ void warp_copy_vec(const char* src, char* const (&dst)[kMaxRanks],
                                              int bytes, int lane) {
  const int n = bytes / int(sizeof(Vec));
  const Vec* s = reinterpret_cast<const Vec*>(src);
  for (int c0 = lane; c0 < n; c0 += 32 * kCopyUnroll) {
    Vec v[kCopyUnroll];
#pragma unroll
    for (int u = 0; u < kCopyUnroll; ++u) {
      const int c = c0 + 32 * u;
      if (c < n) {
        if constexpr (sizeof(Vec) == 16) v[u] = ld_nc_v4(s + c);
        else v[u] = s[c];
      }
    }
#pragma unroll
    for (int r = 0; r < kMaxRanks; ++r) {
      if (dst[r] == nullptr) continue;
      Vec* d = reinterpret_cast<Vec*>(dst[r]);
#pragma unroll
      for (int u = 0; u < kCopyUnroll; ++u) {
        const int c = c0 + 32 * u;
        if (c < n) d[c] = v[u];
      }
    }
  }
}

__device__ __forceinline__ void warp_copy_row(const char* src, char* const (&dst)[kMaxRanks],
                                              int bytes, int lane) {
  if ((bytes & 15) == 0) warp_copy_vec<int4>(src, dst, bytes, lane);
  else if ((bytes & 3) == 0) warp_copy_vec<int>(src, dst, bytes, lane);
  else warp_copy_vec<char>(src, dst, bytes, lane);
}

// Single destination.
__device__ __forceinline__ void warp_copy_row(const char* src, char* dst, int bytes, int lane) {
  char* d[kMaxRanks];
#pragma unroll
  for (int r = 0; r < kMaxRanks; ++r) d[r] = nullptr;
  d[0] = dst;
  warp_copy_row(src, d, bytes, lane);
}

__device__ __forceinline__ void warp_zero_row(char* dst, int bytes, int lane) {
  if ((bytes & 15) == 0) {
    int4* d = reinterpret_cast<int4*>(dst);
    for (int c = lane; c < bytes / 16; c += 32) d[c] = make_int4(0, 0, 0, 0);
  } else if ((bytes & 3) == 0) {
    int* d = reinterpret_cast<int*>(dst);
    for (int c = lane; c < bytes / 4; c += 32) d[c] = 0;
  } else {
    for (int c = lane; c < bytes; c += 32) dst[c] = 0;
  }
}

}  // namespace jax_ep
