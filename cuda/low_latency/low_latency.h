// Low-latency (decode) kernels: host launch API and the layout of the low-latency
// region (plain C++: included by the FFI handlers).
//
// Region (one EP group inside a node: at kLowLatencyOffset of each GPU's communication
// buffer, past everything the normal kernels use; a group over several nodes: an NVSHMEM
// symmetric allocation of its own, the same offsets on every PE):
//   LowLatencyHeader                       op counter, arrival counter, flags, send counters
//   half 0 | half 1                        receive slots, alternating by op parity
//   send staging (symmetric region only)   rows bound for other nodes, the puts' source
// Each half holds either a dispatch's slots or a combine's:
//   dispatch: rows [R (source rank), M, row], one per (token, destination rank) (a token
//             crosses NVLink once per rank, whatever its number of experts there), then
//             per (local expert l, source rank s) block u = l*R + s the i-th token's row
//             index in the source's rows, its token id and its row scale:
//             list_row, list_token [E, M] int32, list_scale [E, M] f32;
//   combine:  rows [E, M, row] (rows of this rank's tokens, back from the expert owners).
// Dispatch and combine share one op counter, so consecutive low-latency ops always use
// different halves.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "cuda/common/buffer_layout.h"
#include "cuda/common/types.h"

namespace jax_ep {

constexpr int kLLMaxTokensPerRank = 1024;  // M
// Ranks of one EP group (a node holds at most kMaxRanks of them; the rest are reached by
// NVSHMEM puts). The send kernels keep the destination ranks of a token in 64 bits.
constexpr int kLLMaxRanks = 64;
// Threads per block the kernels are compiled for: at most 16 warps (the handlers clamp
// num_warps), so the compiler may use up to 128 registers without spilling.
constexpr int kLLMaxThreads = 512;
// The normal kernels use [0, buffer_bytes_for_rows(cap)); 64 MiB leaves room for
// 16M received rows there (the default normal Buffer is 16 MiB).
constexpr size_t kLowLatencyOffset = size_t(64) << 20;

struct alignas(128) LowLatencyHeader {
  // Low-latency ops completed on this rank (local; the last block of each *_recv bumps it).
  uint64_t seq;
  // Op number of the last *_send (local; detects two sends without a recv in between).
  uint64_t send_pending;
  // Blocks of the running *_recv kernel that are done (local; reset by the last one).
  uint32_t recv_arrivals;
  uint32_t pad[27];
  // flags[parity][i], written by peers: (op << 32) | row count. Dispatch: i = l*R + src
  // rank; combine: i = global expert id.
  uint64_t flags[2][kMaxExperts];
  // Dispatch send (local): rows of the running op written so far per destination expert,
  // summed over the send blocks; the block that completes an expert's count releases its
  // flag and resets the counter to 0 (the next op is a later launch).
  uint32_t send_rows[kMaxExperts];
};

// kLLDataOffset is mirrored in FALLBACK_LIMITS (jax_ep/backends/cuda/_ffi.py).
static_assert(sizeof(LowLatencyHeader) == 20608, "update FALLBACK_LIMITS['ll_data_offset']");
// The halves' offset inside a region, and the region's inside a communication buffer.
constexpr size_t kLLHalvesOffset = align_up(sizeof(LowLatencyHeader), 4096);
constexpr size_t kLLDataOffset = kLowLatencyOffset + kLLHalvesOffset;
static_assert(kLowLatencyOffset >= buffer_bytes_for_rows(1 << 20),
              "the low-latency region must start past the normal kernels' region");

// Bytes of one slot row (16-byte aligned). FP8 rows: H e4m3 values then H/128 f32 scales.
constexpr size_t ll_dispatch_row_stride(size_t hidden, size_t elem_bytes, bool use_fp8) {
  return align_up(use_fp8 ? hidden + hidden / 128 * 4 : hidden * elem_bytes, 16);
}
constexpr size_t ll_combine_row_stride(size_t width, size_t elem_bytes) {
  return align_up(width * elem_bytes, 16);
}
// Offset of the lists (list_row, then list_token, then list_scale) inside a dispatch half.
constexpr size_t ll_dispatch_list_offset(size_t ranks, size_t max_tokens, size_t stride) {
  return align_up(ranks * max_tokens * stride, 256);
}
constexpr size_t ll_dispatch_half_bytes(size_t experts, size_t ranks, size_t max_tokens,
                                        size_t stride) {
  return ll_dispatch_list_offset(ranks, max_tokens, stride) + 3 * experts * max_tokens * 4;
}
constexpr size_t ll_combine_half_bytes(size_t experts, size_t max_tokens, size_t stride) {
  return experts * max_tokens * stride;
}
// Total buffer bytes for ops whose half needs `half_bytes`.
constexpr size_t ll_buffer_bytes(size_t half_bytes) {
  return kLLDataOffset + 2 * align_up(half_bytes, 4096);
}
// Bytes of each half in a buffer of `num_bytes` (0 when the buffer ends before the data).
constexpr size_t ll_half_bytes_available(size_t num_bytes) {
  return num_bytes <= kLLDataOffset ? 0 : (num_bytes - kLLDataOffset) / 2 / 4096 * 4096;
}
// A symmetric region (EP group over several nodes) holds a third block of the halves'
// size: the staging rows the puts read (NVSHMEM's remote transports read registered memory
// only, never XLA's buffers or shared memory).
constexpr size_t ll_symmetric_region_bytes(size_t half_bytes) {
  return kLLHalvesOffset + 3 * align_up(half_bytes, 4096);
}
constexpr size_t ll_symmetric_half_bytes(size_t region_bytes) {
  return region_bytes <= kLLHalvesOffset ? 0 : (region_bytes - kLLHalvesOffset) / 3 / 4096 * 4096;
}

// Where the kernels find every rank of the EP group: region[r] is rank r's region as this
// GPU addresses it (its own and its node's, over NVLink), or nullptr for a rank of another
// node, which is reached by NVSHMEM puts to PE pe[r] at the symmetric address of this
// GPU's own region (bit r of `remote`). One NVLink domain: every region is mapped, remote 0.
struct LLPeers {
  char* region[kLLMaxRanks];
  int pe[kLLMaxRanks];
  uint64_t remote;
};

// ------------------------------------------------------------------ phase timing
// Profiling builds only (CMake -DJAX_EP_LL_TIMING=ON defines JAX_EP_LL_TIMING; bench/
// ll_timing.py reads the records back). The handlers then pass a ring of records in a
// cudaMalloc'd debug buffer (one per GPU, owned by xla_ffi/low_latency_handlers.cc); thread
// 0 of every block writes %globaltimer (ns, comparable across GPUs up to their clock
// offset) and clock64 (SM cycles, exact within a block) at each point it passes. A record
// holds one op: slot op % kLLTimingRing (dispatch and combine share the op counter, so the
// header says which op and kind it is). Other builds compile no timing code into the kernels.
#ifdef JAX_EP_LL_TIMING
constexpr bool kLLTiming = true;
#else
constexpr bool kLLTiming = false;
#endif
enum LLTimingPoint : int {
  kLLTEntry = 0,       // entry of the launch that runs the send phase
  kLLTOp = 1,          // op number known (begin_send's barrier passed)
  kLLTStaged = 2,      // dispatch: last token's row staged (x loaded, FP8 cast)
  kLLTRowsIssued = 3,  // dispatch: last token's rows stored; combine: all rows stored
  kLLTListsIssued = 4, // dispatch: last token's positions counted, list entries stored
  kLLTReleased = 5,    // send: the block's counter adds / flag releases issued
  kLLTRecvEntry = 6,   // recv phase starts (fused: after the send; split: recv launch entry)
  kLLTFlagsSeen = 7,   // recv: dispatch: all of the block's unit flags; combine: first token's K flags
  kLLTRecvCopied = 8,  // recv: rows gathered (dispatch) / reduced (combine), block barrier passed
  kLLTCounts = 9,      // recv: dispatch: recv_count written; combine: the remaining flags seen
  kLLTExit = 10,       // recv: after finish_recv (the block's last instruction)
  kLLTPositions = 11,  // dispatch send: last token's positions counted (its barrier passed)
  kLLTimingPoints = 12
};
constexpr int kLLTimingRing = 16;
constexpr int kLLTimingMaxBlocks = 1024;  // blocks past this are not recorded
struct LLTimingRecord {
  // Header, written by block 0: op number, kind (1 dispatch, 2 combine), grid of the launch
  // that ran the send phase, grid of the launch that ran the recv phase.
  uint64_t op, kind, grid_send, grid_recv, pad[4];
  uint64_t ns[kLLTimingMaxBlocks][kLLTimingPoints];   // %globaltimer, 0 = not passed yet
  uint64_t clk[kLLTimingMaxBlocks][kLLTimingPoints];  // clock64
};

// Which phases one launch runs: the fused ops run both (one cooperative kernel; a send
// kernel then a recv kernel where the grid cannot be co-resident), the split ops one each.
enum LLPhases : int { kLLSend = 1, kLLRecv = 2, kLLBoth = 3 };

struct LLDispatchArgs {
  LLPeers peers;
  int me, num_ranks, num_experts, num_tokens, num_topk, max_tokens, hidden;
  ElemType x_type;
  bool use_fp8;
  bool zero_padding;  // recv: zero the rows past each (expert, source rank) count
  size_t half_bytes;  // bytes of each half (and of the staging block): same on every rank
  // Sender.
  const void* x;            // [T, H], H * sizeof(x) % 16 == 0
  const int* topk_idx;      // [T, K]
  const float* slot_scale;  // [T, K] or nullptr (not with use_fp8): row = x * (sum of its slots' scales)
  int* send_pos;            // [T, K] out
  int* ticket;              // [1] out (split form) or nullptr
  // Receiver.
  void* recv_x;             // [L, R*M, H] x's dtype, or e4m3 values
  float* recv_scales;       // [L, R*M, H/128] (FP8) or nullptr
  int* recv_count;          // [L]
  int* recv_src_token;      // [L, R*M]
  int* recv_count_per_rank; // [L, R]
  const int* expect_ticket; // [1] from the send (split form) or nullptr
  int num_blocks, num_threads;
  LLTimingRecord* timing;   // ring of kLLTimingRing records, or nullptr (timing off)
};
cudaError_t launch_ll_dispatch(const LLDispatchArgs& args, int phases, cudaStream_t stream);

struct LLCombineArgs {
  LLPeers peers;
  int me, num_ranks, num_experts, num_tokens, num_topk, max_tokens, width;
  ElemType y_type;
  size_t half_bytes;
  // Sender (expert side).
  const void* y;                  // [L, R*M, W]
  const int* recv_count_per_rank; // [L, R] from the dispatch
  int* ticket;                    // [1] out or nullptr
  // Receiver (home side).
  const int* topk_idx;            // [T, K]
  const float* topk_weights;      // [T, K]
  const int* send_pos;            // [T, K] from the dispatch
  void* out;                      // [T, W] y's dtype
  const int* expect_ticket;       // [1] or nullptr
  int num_blocks, num_threads;
  LLTimingRecord* timing;         // ring of kLLTimingRing records, or nullptr (timing off)
};
cudaError_t launch_ll_combine(const LLCombineArgs& args, int phases, cudaStream_t stream);

// The launch entry points of one transport: NVLink stores (launch_ll_dispatch / _combine
// above, in _jax_ep_ffi), or stores inside a node and NVSHMEM puts across nodes (compiled
// into jax_ep_nvshmem, handed to the handlers through register_ll_symmetric).
using LLDispatchLauncher = cudaError_t (*)(const LLDispatchArgs&, int, cudaStream_t);
using LLCombineLauncher = cudaError_t (*)(const LLCombineArgs&, int, cudaStream_t);
struct LLLaunchers {
  LLDispatchLauncher dispatch;
  LLCombineLauncher combine;
};
// jax_ep_nvshmem only (launch_nvshmem.cu): the launchers over stores and NVSHMEM puts.
const LLLaunchers* ll_launchers_nvshmem();

}  // namespace jax_ep
