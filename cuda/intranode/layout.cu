// Local routing statistics: which ranks and experts each token goes to, and each
// token's position in its destination's list (no communication).
#include "cuda/common/block_scan.cuh"
#include "cuda/common/device_sync.cuh"
#include "cuda/intranode/kernels.h"

namespace jax_ep {
namespace {

__device__ __forceinline__ int dest_rank_of(int expert, int num_experts, int num_local) {
  return (expert >= 0 && expert < num_experts) ? expert / num_local : -1;
}

// One thread per token: is_token_in_rank and the per-rank / per-expert counts.
__global__ void dispatch_layout_kernel(const int* __restrict__ topk_idx, int num_tokens,
                                       int num_topk, int num_experts, int num_ranks,
                                       int* tokens_per_rank, int* tokens_per_expert,
                                       bool* is_token_in_rank) {
  extern __shared__ int s_counts[];  // [num_ranks + num_experts]
  const int n = num_ranks + num_experts;
  for (int i = threadIdx.x; i < n; i += blockDim.x) s_counts[i] = 0;
  __syncthreads();
  const int num_local = num_experts / num_ranks;
  for (int t = blockIdx.x * blockDim.x + threadIdx.x; t < num_tokens;
       t += gridDim.x * blockDim.x) {
    unsigned in_rank = 0;
    for (int k = 0; k < num_topk; ++k) {
      const int e = topk_idx[t * num_topk + k];
      const int r = dest_rank_of(e, num_experts, num_local);
      if (r >= 0) {
        in_rank |= 1u << r;
        atomicAdd(&s_counts[num_ranks + e], 1);
      }
    }
    for (int r = 0; r < num_ranks; ++r) {
      const bool hit = (in_rank >> r) & 1u;
      is_token_in_rank[t * num_ranks + r] = hit;
      if (hit) atomicAdd(&s_counts[r], 1);
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    if (s_counts[i] == 0) continue;
    if (i < num_ranks) atomicAdd(&tokens_per_rank[i], s_counts[i]);
    else atomicAdd(&tokens_per_expert[i - num_ranks], s_counts[i]);
  }
}

// Each warp of a block numbers the hits of one contiguous segment of the items: pass 1
// counts them with ballots (and keeps each lane's first 32 answers in a register), one
// block scan gives every warp its offset, pass 2 writes the positions. Order is item
// order, loads stay coalesced, and a block synchronises once (a block scan per 1024
// items makes these kernels barrier-bound).
template <typename Hit, typename Write>
__device__ __forceinline__ int number_hits(int num_items, Hit hit, Write write, ScanSmem& smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int seg = ((num_items + warps - 1) / warps + 31) / 32 * 32;
  const int begin = min(num_items, warp * seg), end = min(num_items, begin + seg);
  int count = 0;
  unsigned seen = 0;  // this lane's hits of the first 32 rounds: pass 2 reloads no more
  for (int base = begin, round = 0; base < end; base += 32, ++round) {
    const int i = base + lane;
    const bool h = i < end && hit(i);
    if (round < 32) seen |= unsigned(h) << round;
    count += __popc(__ballot_sync(0xffffffffu, h));
  }
  int total;
  int running = block_exclusive_warp_sum(count, &total, smem);
  for (int base = begin, round = 0; base < end; base += 32, ++round) {
    const int i = base + lane;
    const bool h = round < 32 ? ((seen >> round) & 1u) != 0 : (i < end && hit(i));
    const unsigned m = __ballot_sync(0xffffffffu, h);
    if (i < end) write(i, h ? running + __popc(m & ((1u << lane) - 1u)) : -1);
    running += __popc(m);
  }
  return total;
}

// Rank layout: block r numbers the tokens bound for rank r in token order.
__global__ void __launch_bounds__(kScanThreads)
rank_positions_kernel(const int* __restrict__ topk_idx, int num_tokens, int num_topk,
                      int num_experts, int num_ranks, int* send_pos, Workspace* ws) {
  __shared__ ScanSmem smem;
  const int r = blockIdx.x;
  const int num_local = num_experts / num_ranks;
  const int total = number_hits(
      num_tokens,
      [&](int t) {
        bool hit = false;
        for (int k = 0; k < num_topk; ++k)
          hit |= dest_rank_of(topk_idx[t * num_topk + k], num_experts, num_local) == r;
        return hit;
      },
      [&](int t, int pos) { send_pos[t * num_ranks + r] = pos; }, smem);
  if (threadIdx.x == 0) ws->my_counts[r] = total;
}

// Expert layout: block e numbers the (token, slot) pairs of expert e in (t, k) order;
// block 0 also marks the masked slots.
__global__ void __launch_bounds__(kScanThreads)
expert_positions_kernel(const int* __restrict__ topk_idx, int num_tokens, int num_topk,
                        int num_experts, int num_ranks, int* send_pos, Workspace* ws) {
  __shared__ ScanSmem smem;
  const int e = blockIdx.x;
  const int total = number_hits(
      num_tokens * num_topk, [&](int i) { return topk_idx[i] == e; },
      [&](int i, int pos) {
        if (pos >= 0) send_pos[i] = pos;
        else if (e == 0 && (topk_idx[i] < 0 || topk_idx[i] >= num_experts)) send_pos[i] = -1;
      },
      smem);
  if (threadIdx.x == 0) ws->my_counts[kMaxRanks + e] = total;
}

}  // namespace

const LayoutKernels kLayoutKernels = {dispatch_layout_kernel, rank_positions_kernel,
                                      expert_positions_kernel};

}  // namespace jax_ep
