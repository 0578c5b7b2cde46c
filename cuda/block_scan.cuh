// Block-wide exclusive prefix count of 0/1 flags (ballot + shuffle scan), used to give
// each routed token its position in its destination's list without atomics, so the
// order is the source-token order the layouts promise.
#pragma once

namespace jax_ep {

constexpr int kScanThreads = 1024;

struct ScanSmem {
  int warp_offset[32];
  int total;
};

// Returns the number of flagged threads before this one; *total = flagged threads.
__device__ __forceinline__ int block_exclusive_count(bool flag, int* total, ScanSmem& s) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const unsigned mask = __ballot_sync(0xffffffffu, flag);
  const int before_in_warp = __popc(mask & ((1u << lane) - 1u));
  if (lane == 0) s.warp_offset[warp] = __popc(mask);
  __syncthreads();
  if (warp == 0) {
    const int num_warps = blockDim.x >> 5;
    const int mine = lane < num_warps ? s.warp_offset[lane] : 0;
    int incl = mine;
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      const int v = __shfl_up_sync(0xffffffffu, incl, d);
      if (lane >= d) incl += v;
    }
    s.warp_offset[lane] = incl - mine;
    if (lane == 31) s.total = incl;
  }
  __syncthreads();
  const int result = s.warp_offset[warp] + before_in_warp;
  *total = s.total;
  __syncthreads();  // the next call may overwrite the shared state
  return result;
}

}  // namespace jax_ep
