// The intranode kernels as their device files export them: function pointers, so that
// launch.cu alone decides grids, shared memory and attributes, and the device files hold
// device code only. Also the block shapes and shared-memory layouts both sides rely on.
#pragma once

#include <cstddef>
#include <cstdint>

#include "cuda/intranode/intranode.h"

namespace jax_ep {

// ---- layout.cu (rank_positions / expert_positions run kScanThreads threads)
struct LayoutKernels {
  void (*dispatch_layout)(const int* topk_idx, int num_tokens, int num_topk, int num_experts,
                          int num_ranks, int* tokens_per_rank, int* tokens_per_expert,
                          bool* is_token_in_rank);
  void (*rank_positions)(const int* topk_idx, int num_tokens, int num_topk, int num_experts,
                         int num_ranks, int* send_pos, Workspace* ws);
  void (*expert_positions)(const int* topk_idx, int num_tokens, int num_topk, int num_experts,
                           int num_ranks, int* send_pos, Workspace* ws);
};
extern const LayoutKernels kLayoutKernels;

// ---- notify.cu
constexpr int kNotifyThreads = 1024;  // notify_dispatch: one block
struct NotifyKernels {
  void (*begin_op)(char* local, PeerBases unused, uint64_t p0, uint64_t p1, uint64_t p2,
                   uint64_t p3, uint64_t p4, int num_publish);
  void (*notify_dispatch)(NotifyArgs a);
};
extern const NotifyKernels kNotifyKernels;

// ---- dispatch.cu (every kernel runs kDispatchThreads threads)
constexpr int kDispatchThreads = 512;
constexpr int kDispatchWarps = kDispatchThreads / 32;
// Each warp stages rows through two shared-memory buffers: the bulk load of one chunk
// overlaps the bulk stores (to every destination) of the previous one.
constexpr int kStageBytes = 4096;
constexpr size_t kBarrierBytes = 256;  // 2 mbarriers per warp
constexpr size_t kDispatchSmem = kBarrierBytes + size_t(kDispatchWarps) * 2 * kStageBytes;
static_assert(kDispatchWarps * 2 * sizeof(uint64_t) <= kBarrierBytes, "barrier area");
struct DispatchKernels {
  void (*dispatch)(DispatchArgs a);  // kDispatchSmem bytes of dynamic shared memory
  void (*finalize)(DispatchArgs a);
  void (*cached)(CachedDispatchArgs a);
};
extern const DispatchKernels kDispatchKernels;

// ---- combine.cu (kCombineThreads threads, kCombineSmem bytes of dynamic shared memory)
constexpr int kCombineThreads = 256;
// Per warp: two shared-memory stages; a stage holds one chunk of every row of the token
// (pair i at i * chunk), bulk-loaded from the peers while the previous chunk is reduced.
constexpr int kCombineWarps = kCombineThreads / 32;
constexpr int kCombineStage = 8192;
constexpr size_t kCombineBarrierBytes = 128;
constexpr size_t kCombineSmem = kCombineBarrierBytes + size_t(kCombineWarps) * 2 * kCombineStage;
static_assert(kCombineWarps * 2 * sizeof(uint64_t) <= kCombineBarrierBytes, "barrier area");
using CombineKernel = void (*)(CombineArgs a);
// [ElemType][Layout]: the kernel for y's dtype and the layout (its most rows per token).
extern const CombineKernel kCombineKernels[3][2];

// ---- staging.cu
constexpr int kStagedCopyThreads = 512;
extern void (*const kStagedCopyKernel)(StagedCopy c);

}  // namespace jax_ep
