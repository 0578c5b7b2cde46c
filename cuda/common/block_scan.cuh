// Block-wide exclusive prefix sum of per-warp counts (shuffle scan), used to give each
// routed token its position in its destination's list without atomics, so the order is
// the source-token order the layouts promise.
#pragma once

namespace jax_ep {

constexpr int kScanThreads = 1024;

struct ScanSmem {
  int warp_offset[32];
  int total;
};

// Every thread of warp w passes that warp's count c_w; returns c_0 + ... + c_{w-1} and
// sets *total to the sum over the block's warps.
__device__ __forceinline__ int block_exclusive_warp_sum(int warp_count, int* total,
                                                        ScanSmem& s) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) s.warp_offset[warp] = warp_count;
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
  const int result = s.warp_offset[warp];
  *total = s.total;
  __syncthreads();  // the next call may overwrite the shared state
  return result;
}

}  // namespace jax_ep
