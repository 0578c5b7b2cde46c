// Launch policy of the intranode kernels: grid and block shapes, dynamic shared memory
// and the order of the launches of each op. The kernels themselves live in layout.cu,
// notify.cu, dispatch.cu, combine.cu and staging.cu (kernels.h).
#include <cuda_runtime.h>

#include "cuda/common/block_scan.cuh"  // kScanThreads
#include "cuda/intranode/kernels.h"

namespace jax_ep {

// ---- layout.cu

cudaError_t launch_dispatch_layout(const int* topk_idx, int num_tokens, int num_topk,
                                   int num_experts, int num_ranks, int* tokens_per_rank,
                                   int* tokens_per_expert, bool* is_token_in_rank,
                                   cudaStream_t stream) {
  cudaMemsetAsync(tokens_per_rank, 0, sizeof(int) * num_ranks, stream);
  cudaMemsetAsync(tokens_per_expert, 0, sizeof(int) * num_experts, stream);
  if (num_tokens == 0) return cudaGetLastError();
  const int threads = 256;  // one thread per token, at most 32 blocks
  const int blocks = (num_tokens + threads - 1) / threads < 32 ? (num_tokens + threads - 1) / threads : 32;
  const size_t smem = sizeof(int) * (num_ranks + num_experts);
  kLayoutKernels.dispatch_layout<<<blocks, threads, smem, stream>>>(
      topk_idx, num_tokens, num_topk, num_experts, num_ranks, tokens_per_rank,
      tokens_per_expert, is_token_in_rank);
  return cudaGetLastError();
}

cudaError_t launch_send_positions(const int* topk_idx, int num_tokens, int num_topk,
                                  int num_experts, int num_ranks, Layout layout, int* send_pos,
                                  char* local_buffer, cudaStream_t stream) {
  Workspace* ws = reinterpret_cast<Workspace*>(local_buffer + kWorkspaceOffset);
  if (layout == Layout::kRank) {  // one block per destination rank
    kLayoutKernels.rank_positions<<<num_ranks, kScanThreads, 0, stream>>>(
        topk_idx, num_tokens, num_topk, num_experts, num_ranks, send_pos, ws);
  } else {  // one block per expert
    kLayoutKernels.expert_positions<<<num_experts, kScanThreads, 0, stream>>>(
        topk_idx, num_tokens, num_topk, num_experts, num_ranks, send_pos, ws);
  }
  return cudaGetLastError();
}

// ---- notify.cu

cudaError_t launch_notify_dispatch(const NotifyArgs& args, cudaStream_t stream) {
  kNotifyKernels.notify_dispatch<<<1, kNotifyThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

cudaError_t launch_begin_op(char* local_buffer, const uint64_t* publish, int num_publish,
                            cudaStream_t stream) {
  uint64_t p[5] = {0, 0, 0, 0, 0};
  for (int i = 0; i < num_publish && i < 5; ++i) p[i] = publish[i];
  kNotifyKernels.begin_op<<<1, 1, 0, stream>>>(local_buffer, PeerBases{}, p[0], p[1], p[2],
                                               p[3], p[4], num_publish < 5 ? num_publish : 5);
  return cudaGetLastError();
}

// ---- staging.cu

cudaError_t launch_staged_copy(const StagedCopy& c, cudaStream_t stream) {
  if (c.num == 0) return cudaSuccess;
  kStagedCopyKernel<<<264, kStagedCopyThreads, 0, stream>>>(c);  // 2 blocks per SM
  return cudaGetLastError();
}

// ---- dispatch.cu

cudaError_t launch_intranode_dispatch(const DispatchArgs& args, cudaStream_t stream,
                                      const StagedCopy* staged) {
  // Per device (the attribute belongs to each GPU's context); cheap, no stream work.
  const cudaError_t attr_err = cudaFuncSetAttribute(
      kDispatchKernels.dispatch, cudaFuncAttributeMaxDynamicSharedMemorySize, int(kDispatchSmem));
  if (attr_err != cudaSuccess) return attr_err;
  kDispatchKernels.dispatch<<<args.num_blocks, kDispatchThreads, kDispatchSmem, stream>>>(args);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  if (staged != nullptr && (err = launch_staged_copy(*staged, stream)) != cudaSuccess) return err;
  // The finalize kernel is local work: up to 8 times the communication kernel's blocks.
  const int L = args.num_experts / args.num_ranks;
  const size_t smem = args.layout == Layout::kRank ? sizeof(int) * L : 0;
  const int finalize_blocks = args.num_blocks * 8 < 512 ? args.num_blocks * 8 : 512;
  kDispatchKernels.finalize<<<finalize_blocks, kDispatchThreads, smem, stream>>>(args);
  return cudaGetLastError();
}

cudaError_t launch_cached_dispatch(const CachedDispatchArgs& args, cudaStream_t stream) {
  kDispatchKernels.cached<<<args.num_blocks, kDispatchThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

// ---- combine.cu

cudaError_t launch_intranode_combine(const CombineArgs& args, cudaStream_t stream) {
  const int type = int(args.dtype), layout = int(args.layout);
  if (type < 0 || type > 2 || layout < 0 || layout > 1) return cudaErrorInvalidValue;
  const CombineKernel kernel = kCombineKernels[type][layout];
  // Per device (the attribute belongs to each GPU's context); cheap, no stream work.
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         int(kCombineSmem));
  if (err != cudaSuccess) return err;
  kernel<<<args.num_blocks, kCombineThreads, kCombineSmem, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace jax_ep
