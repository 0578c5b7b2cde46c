// Local routing statistics: which ranks and experts each token goes to, and each
// token's position in its destination's list (no communication).
#include "cuda/block_scan.cuh"
#include "cuda/device_sync.cuh"
#include "cuda/kernels.h"

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

// Rank layout: block r numbers the tokens bound for rank r in token order.
__global__ void __launch_bounds__(kScanThreads)
rank_positions_kernel(const int* __restrict__ topk_idx, int num_tokens, int num_topk,
                      int num_experts, int num_ranks, int* send_pos, Workspace* ws) {
  __shared__ ScanSmem smem;
  const int r = blockIdx.x;
  const int num_local = num_experts / num_ranks;
  int running = 0;
  for (int base = 0; base < num_tokens; base += blockDim.x) {
    const int t = base + threadIdx.x;
    bool hit = false;
    if (t < num_tokens) {
      for (int k = 0; k < num_topk; ++k)
        hit |= dest_rank_of(topk_idx[t * num_topk + k], num_experts, num_local) == r;
    }
    int total;
    const int pos = block_exclusive_count(hit, &total, smem);
    if (t < num_tokens) send_pos[t * num_ranks + r] = hit ? running + pos : -1;
    running += total;
  }
  if (threadIdx.x == 0) ws->my_counts[r] = running;
}

// Expert layout: block e numbers the (token, slot) pairs of expert e in (t, k) order;
// block 0 also marks the masked slots.
__global__ void __launch_bounds__(kScanThreads)
expert_positions_kernel(const int* __restrict__ topk_idx, int num_tokens, int num_topk,
                        int num_experts, int num_ranks, int* send_pos, Workspace* ws) {
  __shared__ ScanSmem smem;
  const int e = blockIdx.x;
  const int n = num_tokens * num_topk;
  int running = 0;
  for (int base = 0; base < n; base += blockDim.x) {
    const int i = base + threadIdx.x;
    const int expert = i < n ? topk_idx[i] : -1;
    const bool hit = expert == e;
    int total;
    const int pos = block_exclusive_count(hit, &total, smem);
    if (hit) send_pos[i] = running + pos;
    if (e == 0 && i < n && (expert < 0 || expert >= num_experts)) send_pos[i] = -1;
    running += total;
  }
  if (threadIdx.x == 0) ws->my_counts[kMaxRanks + e] = running;
}

}  // namespace

cudaError_t launch_dispatch_layout(const int* topk_idx, int num_tokens, int num_topk,
                                   int num_experts, int num_ranks, int* tokens_per_rank,
                                   int* tokens_per_expert, bool* is_token_in_rank,
                                   cudaStream_t stream) {
  cudaMemsetAsync(tokens_per_rank, 0, sizeof(int) * num_ranks, stream);
  cudaMemsetAsync(tokens_per_expert, 0, sizeof(int) * num_experts, stream);
  if (num_tokens == 0) return cudaGetLastError();
  const int threads = 256;
  const int blocks = (num_tokens + threads - 1) / threads < 32 ? (num_tokens + threads - 1) / threads : 32;
  const size_t smem = sizeof(int) * (num_ranks + num_experts);
  dispatch_layout_kernel<<<blocks, threads, smem, stream>>>(
      topk_idx, num_tokens, num_topk, num_experts, num_ranks, tokens_per_rank,
      tokens_per_expert, is_token_in_rank);
  return cudaGetLastError();
}

cudaError_t launch_send_positions(const int* topk_idx, int num_tokens, int num_topk,
                                  int num_experts, int num_ranks, Layout layout, int* send_pos,
                                  char* local_buffer, cudaStream_t stream) {
  Workspace* ws = reinterpret_cast<Workspace*>(local_buffer + kWorkspaceOffset);
  if (layout == Layout::kRank) {
    rank_positions_kernel<<<num_ranks, kScanThreads, 0, stream>>>(
        topk_idx, num_tokens, num_topk, num_experts, num_ranks, send_pos, ws);
  } else {
    expert_positions_kernel<<<num_experts, kScanThreads, 0, stream>>>(
        topk_idx, num_tokens, num_topk, num_experts, num_ranks, send_pos, ws);
  }
  return cudaGetLastError();
}

}  // namespace jax_ep
