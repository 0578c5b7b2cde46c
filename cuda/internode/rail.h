// The RDMA hop of the internode kernels: the "rail exchange" between the ranks that share
// a local index (rank (n, g) and every (m, g)), over NVSHMEM (host-visible part; the
// kernels are in rail.cu, compiled into jax_ep_nvshmem).
//
// Each rank holds a symmetric region (nvshmem_malloc, the same offsets on every PE):
// a header of signals, then per op the receive flags and rows of every source node, this
// rank's packed send rows and send flags. An op moves, for every destination node m and
// token t with send_mask[m, t] != 0, one packed row (every array's row of t, or of (m, t)
// for per-node rows) into row (my_node, t) of m's receive area; rows not sent arrive as
// zeros and flag 0. Ordering without host synchronisation:
//   pack (local): copy rows and flags into the symmetric send area, seq += 1;
//   send: per destination, wait until it has freed its receive slots of the previous op
//         (free_sig[m] >= seq - 1), put the flagged rows and the flags, nvshmem_quiet,
//         then add 1 to data_sig[my_node] at the destination (one signal per block);
//   recv: wait until data_sig[n] reaches this op's target for every source n, copy out;
//   ack:  set free_sig[my_node] = seq at every source.
// Every wait traps after kTimeoutNs naming the op, the PE, the peer and the signal values.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace jax_ep::internode {

constexpr int kMaxNodes = 64;
constexpr int kMaxRailArrays = 4;  // payload, FP8 scales, top-k ids, top-k weights

// Op codes, for the timeout messages.
enum RailOp : int { kRailDispatch = 0, kRailCombine = 1, kRailCachedDispatch = 2 };

struct RailHeader {
  uint64_t data_sig[kMaxNodes];  // signal: blocks of source node n add 1 once their rows landed
  uint64_t free_sig[kMaxNodes];  // signal: node m sets the last op whose rows it has read
  uint64_t seq;                  // local: ops run on this region
  uint64_t recv_target;          // local: what every data_sig reaches in the current op
};
constexpr size_t kRailDataOffset = 4096;
static_assert(sizeof(RailHeader) <= kRailDataOffset, "rail header");

constexpr size_t rail_align(size_t n) { return (n + 255) / 256 * 256; }

// Byte offsets (from the region's start) of one op's areas.
struct RailLayout {
  size_t recv_flags, recv_rows, send_rows, send_flags, end;
};
inline RailLayout rail_layout(int num_nodes, int num_tokens, size_t packed_row_bytes,
                              bool per_node_rows) {
  const size_t nt = size_t(num_nodes) * size_t(num_tokens);
  RailLayout l{};
  size_t off = kRailDataOffset;
  l.recv_flags = off;
  off = rail_align(off + 4 * nt);
  l.recv_rows = off;
  off = rail_align(off + nt * packed_row_bytes);
  l.send_rows = off;
  off = rail_align(off + (per_node_rows ? nt : size_t(num_tokens)) * packed_row_bytes);
  l.send_flags = off;
  off = rail_align(off + 4 * nt);
  l.end = off;
  return l;
}

struct RailArgs {
  char* sym;                   // this PE's symmetric region
  int num_nodes, my_node, my_pe;
  int pes[kMaxNodes];          // PE of the rank with this local index on each node
  int num_tokens;              // T
  bool per_node_rows;          // inputs are [N, T, ...] (a row per destination), else [T, ...]
  int num_arrays;
  const char* in[kMaxRailArrays];
  char* out[kMaxRailArrays];   // [N, T, ...]: row (n, t) from source node n
  int row_bytes[kMaxRailArrays];
  int packed_offset[kMaxRailArrays];  // 16-byte aligned offsets inside a packed row
  int packed_row_bytes;
  const int* send_mask;        // [N, T]: nonzero where row t goes to node m
  int* recv_flags;             // [N, T] out: 1 where source node n sent row t
  RailLayout layout;
  int blocks_per_node;         // send kernel: blocks per destination (equal on every PE)
  int recv_blocks;
  int op;                      // RailOp
};

cudaError_t launch_rail_exchange(const RailArgs& args, cudaStream_t stream);

}  // namespace jax_ep::internode
