// Host-side entry points of the intranode (normal) kernels (plain C++: included by the FFI
// handlers), all defined in launch.cu. Every launcher enqueues on `stream`, never
// synchronises, and returns the launch error.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/common/buffer_layout.h"
#include "cuda/common/types.h"

namespace jax_ep {

// ---- layout.cu: local routing statistics (no communication).
cudaError_t launch_dispatch_layout(const int* topk_idx, int num_tokens, int num_topk,
                                   int num_experts, int num_ranks, int* tokens_per_rank,
                                   int* tokens_per_expert, bool* is_token_in_rank,
                                   cudaStream_t stream);

// Per-column positions of this rank's tokens: rank layout send_pos[t, r] = index of t
// among the tokens bound for r (-1 if not); expert layout send_pos[t, k] = index of
// (t, k) among the slots of expert e = topk_idx[t, k]. Fills the count row of `ws`.
cudaError_t launch_send_positions(const int* topk_idx, int num_tokens, int num_topk,
                                  int num_experts, int num_ranks, Layout layout, int* send_pos,
                                  char* local_buffer, cudaStream_t stream);

// ---- notify.cu: count exchange between ranks, start of an op.
struct NotifyArgs {
  PeerBases peers;
  int me, num_ranks, num_experts, capacity, expert_alignment;
  Layout layout;
  uint64_t publish[kMaxPublished];  // this rank's receive buffers, for the senders
  int num_publish;
  int* num_recv;                    // [] outputs
  int* num_overflow;
  int* recv_per_expert;             // [L]
  int* group_sizes;                 // [L]
  int* needed_per_expert;           // [L] expert layout: rows before capacity and padding
                                    // (the internode path sums them over nodes); rank: 0
};
cudaError_t launch_notify_dispatch(const NotifyArgs& args, cudaStream_t stream);

// Starts an op that only publishes pointers (cached dispatch, combine).
cudaError_t launch_begin_op(char* local_buffer, const uint64_t* publish, int num_publish,
                            cudaStream_t stream);

// ---- dispatch.cu
struct DispatchArgs {
  PeerBases peers;
  int me, num_ranks, num_experts, num_tokens, num_topk, capacity;
  Layout layout;
  int num_payloads;
  const char* payload[2];
  int payload_row_bytes[2];
  const int* topk_idx;
  const float* topk_weights;
  int* send_pos;           // in: local positions, out: rows at the destination
  // This rank's outputs (receiver side; the same pointers were published to peers).
  char* recv_payload[2];
  int* recv_topk_idx;      // [cap, K] rank layout, [cap] expert layout
  float* recv_topk_weights;
  int* recv_src_rank;
  int* recv_src_token;
  int* recv_src_slot;
  int* recv_per_expert;    // rank layout: counted after the data landed
  int* group_sizes;
  int num_blocks;
  int threads_per_block;
  // Row copies: 0 = per-lane 16-byte loads/stores, 1 = bulk (TMA) copies through shared
  // memory; rows that are not a multiple of 16 bytes always take the per-lane path.
  int min_bulk_row_bytes;  // rows at least this large use bulk copies
  // > 0: payload[0] is bf16 [T, cast_fp8_hidden], cast on the way to e4m3 values
  // (recv_payload[0], H bytes a row) and f32 scales per 128 channels (recv_payload[1]);
  // num_payloads and payload_row_bytes then describe the two outputs.
  int cast_fp8_hidden;
};
// ---- staging.cu: one process per GPU; rows travel through the staging area.
struct StagedCopy {
  const char* src[kMaxPublished];
  char* dst[kMaxPublished];
  int row_bytes[kMaxPublished];
  int num;                       // slots in use (0: nothing to copy)
  const int* num_rows;           // rows to copy, read on the device (nullptr: fixed_rows)
  int fixed_rows;
};
cudaError_t launch_staged_copy(const StagedCopy& c, cudaStream_t stream);

// `staged` (one process per GPU, else nullptr): copies the received rows from the staging
// area into the outputs between the communication and the finalize kernels.
cudaError_t launch_intranode_dispatch(const DispatchArgs& args, cudaStream_t stream,
                                      const StagedCopy* staged = nullptr);

// Cached dispatch: out[row] = x of (recv_src_rank[row], recv_src_token[row]), zeros
// where recv_src_rank < 0. Pulls rows from the peers' x.
struct CachedDispatchArgs {
  PeerBases peers;
  int me, num_ranks, num_tokens, capacity, row_bytes;
  const int* recv_src_rank;
  const int* recv_src_token;
  char* out;
  int num_blocks;
};
cudaError_t launch_cached_dispatch(const CachedDispatchArgs& args, cudaStream_t stream);

// ---- combine.cu: out[t] = sum over the rows of t (all ranks, ascending;
// within a rank in row order) of weights[row] * y[row], accumulated in fp32.
struct CombineArgs {
  PeerBases peers;
  int me, num_ranks, num_tokens, num_topk, capacity, width;
  Layout layout;
  ElemType dtype;
  bool has_weights;
  const int* send_pos;  // [T, R] or [T, K]
  void* out;            // [T, width]
  int num_blocks;
};
cudaError_t launch_intranode_combine(const CombineArgs& args, cudaStream_t stream);

}  // namespace jax_ep
