// Block-wide exclusive prefix sum (shuffle scans), used to give each routed token its
// position in its destination's list without atomics, so the order is the source-token
// order the layouts promise.
#pragma once

namespace jax_ep {

constexpr int kScanThreads = 1024;

struct ScanSmem {
  int warp_offset[32];
  int total;
};

// Returns the sum of `value` over the threads before this one; *total = the block's sum.
__device__ __forceinline__ int block_exclusive_sum(int value, int* total, ScanSmem& s) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int incl = value;
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const int v = __shfl_up_sync(0xffffffffu, incl, d);
    if (lane >= d) incl += v;
  }
  if (lane == 31) s.warp_offset[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    const int num_warps = blockDim.x >> 5;
    const int mine = lane < num_warps ? s.warp_offset[lane] : 0;
    int w_incl = mine;
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      const int v = __shfl_up_sync(0xffffffffu, w_incl, d);
      if (lane >= d) w_incl += v;
    }
    s.warp_offset[lane] = w_incl - mine;
    if (lane == 31) s.total = w_incl;
  }
  __syncthreads();
  const int result = s.warp_offset[warp] + incl - value;
  *total = s.total;
  __syncthreads();  // the next call may overwrite the shared state
  return result;
}

}  // namespace jax_ep
