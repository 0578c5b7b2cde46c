// The rail exchange kernels (see rail.h): pack, send (NVSHMEM puts + signals), receive,
// acknowledge. Device code of jax_ep_nvshmem (relocatable, device-linked with NVSHMEM).
#include <nvshmem.h>
#include <nvshmemx.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>

#include "cuda/common/device_sync.cuh"
#include "cuda/internode/rail.h"

namespace jax_ep::internode {
namespace {

constexpr int kThreads = 512;
constexpr int kMaxBlocks = 132;

__device__ const char* op_name(int op) {
  switch (op) {
    case kRailDispatch: return "internode dispatch";
    case kRailCombine: return "internode combine";
    default: return "internode cached_dispatch";
  }
}

__device__ __forceinline__ RailHeader* header_of(char* sym) {
  return reinterpret_cast<RailHeader*>(sym);
}

// Copies (or zeroes, src == nullptr) `bytes` with the widest vector that both addresses
// and the size allow.
template <typename V>
__device__ __forceinline__ void warp_move(char* dst, const char* src, int bytes, int lane) {
  V* d = reinterpret_cast<V*>(dst);
  const V* s = reinterpret_cast<const V*>(src);
  for (int i = lane; i < bytes / int(sizeof(V)); i += 32) d[i] = s ? s[i] : V{};
}
__device__ __forceinline__ void warp_copy(char* dst, const char* src, int bytes, int lane) {
  const uintptr_t mis = reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src) |
                        uintptr_t(bytes);
  if ((mis & 15) == 0) warp_move<int4>(dst, src, bytes, lane);
  else if ((mis & 3) == 0) warp_move<int>(dst, src, bytes, lane);
  else if ((mis & 1) == 0) warp_move<short>(dst, src, bytes, lane);
  else warp_move<char>(dst, src, bytes, lane);
}

// Polls an NVSHMEM signal of this PE until it reaches `target`; traps after kTimeoutNs.
__device__ void wait_signal(uint64_t* sig, uint64_t target, int op, const char* what, int pe,
                            int node, int peer_pe) {
  uint64_t v = nvshmem_signal_fetch(sig);
  if (v < target) {
    const uint64_t start = global_timer_ns();
    while ((v = nvshmem_signal_fetch(sig)) < target) {
      if (global_timer_ns() - start > kTimeoutNs) {
        printf("jax_ep: %s timed out on PE %d waiting for %s of node %d (PE %d): signal %llu, "
               "want >= %llu; every rank must run the same ops on a Buffer\n",
               op_name(op), pe, what, node, peer_pe, (unsigned long long)v,
               (unsigned long long)target);
        asm volatile("trap;");
      }
    }
  }
  nvshmem_signal_wait_until(sig, NVSHMEM_CMP_GE, target);  // orders the signalled data
}

__global__ void __launch_bounds__(kThreads) pack_kernel(RailArgs a) {
  const int T = a.num_tokens, N = a.num_nodes, P = a.packed_row_bytes;
  const int rows = (a.per_node_rows ? N : 1) * T;
  char* staging = a.sym + a.layout.send_rows;
  const int lane = threadIdx.x & 31;
  const int warps = gridDim.x * blockDim.x / 32;
  for (int r = (blockIdx.x * blockDim.x + threadIdx.x) / 32; r < rows; r += warps)
    for (int i = 0; i < a.num_arrays; ++i)
      warp_copy(staging + size_t(r) * P + a.packed_offset[i],
                a.in[i] + size_t(r) * a.row_bytes[i], a.row_bytes[i], lane);
  int* flags = reinterpret_cast<int*>(a.sym + a.layout.send_flags);
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < N * T; i += gridDim.x * blockDim.x)
    flags[i] = a.send_mask[i] != 0;
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    RailHeader* h = header_of(a.sym);
    h->seq += 1;
    h->recv_target += uint64_t(a.blocks_per_node);
  }
}

// Block (m, b): the b-th chunk of tokens for destination node m.
__global__ void __launch_bounds__(kThreads) send_kernel(RailArgs a) {
  const int m = blockIdx.x / a.blocks_per_node, b = blockIdx.x % a.blocks_per_node;
  RailHeader* h = header_of(a.sym);
  const uint64_t seq = h->seq;
  const int pe = a.pes[m];
  if (threadIdx.x == 0)
    wait_signal(&h->free_sig[m], seq - 1, a.op, "free receive slots", a.my_pe, m, pe);
  __syncthreads();
  const int T = a.num_tokens, P = a.packed_row_bytes;
  const int chunk = (T + a.blocks_per_node - 1) / a.blocks_per_node;
  const int t0 = min(T, b * chunk), t1 = min(T, t0 + chunk);
  const int* flags = reinterpret_cast<const int*>(a.sym + a.layout.send_flags) + size_t(m) * T;
  const char* staging = a.sym + a.layout.send_rows + (a.per_node_rows ? size_t(m) * T * P : 0);
  // Symmetric addresses: the same offsets name the destination's receive area.
  char* dst_rows = a.sym + a.layout.recv_rows + size_t(a.my_node) * T * P;
  int* dst_flags = reinterpret_cast<int*>(a.sym + a.layout.recv_flags) + size_t(a.my_node) * T;
  const int warp = threadIdx.x / 32, warps = blockDim.x / 32;
  for (int t = t0 + warp; t < t1; t += warps)
    if (flags[t]) nvshmemx_putmem_nbi_warp(dst_rows + size_t(t) * P, staging + size_t(t) * P,
                                           size_t(P), pe);
  if (t1 > t0) nvshmemx_putmem_nbi_block(dst_flags + t0, flags + t0, size_t(t1 - t0) * 4, pe);
  nvshmem_quiet();  // every thread's puts are complete before the block signals
  __syncthreads();
  if (threadIdx.x == 0) nvshmemx_signal_op(&h->data_sig[a.my_node], 1, NVSHMEM_SIGNAL_ADD, pe);
}

__global__ void __launch_bounds__(kThreads) recv_kernel(RailArgs a) {
  RailHeader* h = header_of(a.sym);
  const int N = a.num_nodes, T = a.num_tokens, P = a.packed_row_bytes;
  if (threadIdx.x < N)
    wait_signal(&h->data_sig[threadIdx.x], h->recv_target, a.op, "rows", a.my_pe, threadIdx.x,
                a.pes[threadIdx.x]);
  __syncthreads();
  const int* flags = reinterpret_cast<const int*>(a.sym + a.layout.recv_flags);
  const char* rows = a.sym + a.layout.recv_rows;
  const int lane = threadIdx.x & 31;
  const int warps = gridDim.x * blockDim.x / 32;
  for (int r = (blockIdx.x * blockDim.x + threadIdx.x) / 32; r < N * T; r += warps) {
    const bool sent = flags[r] != 0;
    if (lane == 0) a.recv_flags[r] = sent;
    for (int i = 0; i < a.num_arrays; ++i)
      warp_copy(a.out[i] + size_t(r) * a.row_bytes[i],
                sent ? rows + size_t(r) * P + a.packed_offset[i] : nullptr, a.row_bytes[i], lane);
  }
}

__global__ void ack_kernel(RailArgs a) {
  RailHeader* h = header_of(a.sym);
  const uint64_t seq = h->seq;
  for (int m = threadIdx.x; m < a.num_nodes; m += blockDim.x)
    nvshmemx_signal_op(&h->free_sig[a.my_node], seq, NVSHMEM_SIGNAL_SET, a.pes[m]);
}

int blocks_for(int rows) { return std::max(1, std::min(kMaxBlocks, (rows + 15) / 16)); }

}  // namespace

cudaError_t launch_rail_exchange(const RailArgs& a, cudaStream_t stream) {
  const int rows = (a.per_node_rows ? a.num_nodes : 1) * a.num_tokens;
  pack_kernel<<<blocks_for(rows), kThreads, 0, stream>>>(a);
  send_kernel<<<a.num_nodes * a.blocks_per_node, kThreads, 0, stream>>>(a);
  recv_kernel<<<a.recv_blocks, kThreads, 0, stream>>>(a);
  ack_kernel<<<1, 64, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace jax_ep::internode
