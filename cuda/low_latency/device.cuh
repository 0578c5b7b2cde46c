// Device helpers of the low-latency kernels (dispatch.cu, combine.cu): typed 16-byte
// vectors, the region's header and halves, the flag protocol (op numbers, waits that trap,
// begin / finish of a phase), phase timing (profiling builds) and block-wide row copies.
//
// One kernel per op and direction, run in phases (cuda/LOW_LATENCY.md has the numbers):
//   send: write rows into the peers' receive slots (half = op parity), then release one
//         flag per destination block, tagged with the op number and the row count;
//   recv: wait for this op's flags, move/reduce the rows into XLA's outputs, and (last
//         block) bump the local op counter.
// The fused ops run both phases in ONE cooperative launch (every block sends, then
// receives; co-residency guaranteed, so a block spinning in its recv phase can never
// keep another block of its grid from sending); the split ops run one phase per launch.
// Why this is safe without any clean-up launch: a rank's send of op c+2 (same half)
// runs after its recv of op c+1, which waited for at least one flag of op c+1 from every
// peer, which each peer released after its recv of op c. So nobody overwrites a half (or
// a flag) that is still read. This needs each send to be followed by its recv before the
// next send (checked) and every recv to wait for a flag from every peer (it waits for all
// of this op's flags).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstdio>

#include "cuda/common/device_sync.cuh"
#include "cuda/low_latency/low_latency.h"

namespace jax_ep {
namespace {

// 16-byte loads in flight per thread in the block-wide copies.
constexpr int kUnroll = 8;

template <typename T> struct Elem;
template <> struct Elem<float> {
  static __device__ __forceinline__ float to_f32(float v) { return v; }
  static __device__ __forceinline__ float from_f32(float v) { return v; }
};
template <> struct Elem<__nv_bfloat16> {
  static __device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_f32(float v) { return __float2bfloat16_rn(v); }
};
template <> struct Elem<__half> {
  static __device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_f32(float v) { return __float2half_rn(v); }
};

// V elements of T as one 16-byte vector.
template <typename T, int V>
union Pack {
  int4 raw;
  T v[V];
  __device__ __forceinline__ Pack() {}
};

// Loads: `nc` for XLA inputs (read-only while the kernel runs), `cg` (L2, coherent) for
// receive slots that peers write while the kernel runs: never the non-coherent path.
template <typename V> __device__ __forceinline__ V ld_nc(const V* p) { return __ldg(p); }
template <typename V> __device__ __forceinline__ V ld_cg(const V* p) { return __ldcg(p); }

// ------------------------------------------------------------------ shared helpers

__device__ __forceinline__ LowLatencyHeader* ll_header(char* region) {
  return reinterpret_cast<LowLatencyHeader*>(region);
}
__device__ __forceinline__ char* ll_half(char* region, uint64_t op, size_t half_bytes) {
  return region + kLLHalvesOffset + size_t(op & 1) * half_bytes;
}
// Symmetric regions only: the rows this rank puts to other nodes are copied here first.
__device__ __forceinline__ char* ll_staging(char* region, size_t half_bytes) {
  return region + kLLHalvesOffset + 2 * half_bytes;
}
__device__ __forceinline__ uint64_t flag_value(uint64_t op, int count) {
  return (op << 32) | uint64_t(uint32_t(count));
}
__device__ __forceinline__ uint64_t read_seq(const LowLatencyHeader* h) {
  return *reinterpret_cast<const volatile uint64_t*>(&h->seq);
}
__device__ __forceinline__ bool is_remote(const LLPeers& p, int rank) {
  return ((p.remote >> rank) & 1ull) != 0;
}

// ------------------------------------------------------------------ transports
// The kernels are templates over how a row reaches another rank. NvlinkStores: stores
// through the mapped regions only (one NVLink domain). NvshmemPuts (nvshmem_puts.cuh,
// compiled into jax_ep_nvshmem only): the same stores inside the node, NVSHMEM puts to the
// ranks of other nodes (is_remote). Code for puts sits under `if constexpr (Tr::kPuts)`.
struct NvlinkStores {
  static constexpr bool kPuts = false;
};

static __device__ __noinline__ void ll_fail(const char* op, const char* why, int rank, int peer,
                                             int expert, unsigned long long seen,
                                             unsigned long long want) {
  printf("jax_ep: %s on rank %d: %s (peer %d, expert %d; flag holds op %llu, want op %llu). "
         "Every rank must run the same low-latency ops on a Buffer, each *_send followed by "
         "its *_recv\n", op, rank, why, peer, expert, seen, want);
  asm volatile("trap;");
}

// Waits for this op's flag and returns the row count it carries; traps after kTimeoutNs.
// A flag a rank of another node signalled is polled through NVSHMEM, then waited on once
// more with nvshmem_signal_wait_until, which orders the rows it covers before our loads.
template <typename Tr>
__device__ __forceinline__ int wait_flag(uint64_t* flag, uint64_t op, bool remote,
                                         const char* name, int rank, int peer, int expert) {
  auto load = [&]() -> uint64_t {
    if constexpr (Tr::kPuts) {
      if (remote) return Tr::fetch(flag);
    }
    return ld_acquire_sys(flag);
  };
  uint64_t v = load();
  if ((v >> 32) < op) {
    const uint64_t start = global_timer_ns();
    while (((v = load()) >> 32) < op) {
      if (global_timer_ns() - start > kTimeoutNs)
        ll_fail(name, "timed out waiting for a peer", rank, peer, expert, v >> 32, op);
    }
  }
  if constexpr (Tr::kPuts) {
    if (remote) Tr::wait_at_least(flag, op << 32);
  }
  if ((v >> 32) != op) ll_fail(name, "flag from a later op", rank, peer, expert, v >> 32, op);
  return int(uint32_t(v));
}

// Sets flag `index` of half `parity` at rank `rank` to `value`, after everything this
// thread (and, through bar.sync, its block) wrote: a release store through the mapped
// region, or an NVSHMEM signal at the symmetric address (the puts it covers completed by
// nvshmem_quiet before).
template <typename Tr>
__device__ __forceinline__ void release_flag(const LLPeers& p, int me, int rank, int parity,
                                             int index, uint64_t value) {
  if constexpr (Tr::kPuts) {
    if (is_remote(p, rank)) {
      Tr::signal(&ll_header(p.region[me])->flags[parity][index], value, p.pe[rank]);
      return;
    }
  }
  st_release_sys(&ll_header(p.region[rank])->flags[parity][index], value);
}

// Counter add with acquire-release semantics at GPU scope: releases what the calling
// block stored before its last barrier (cumulative through bar.sync), and acquires what
// earlier adders released. (DeepEP's pattern; no thread-wide system fence.)
__device__ __forceinline__ uint32_t atom_add_acq_rel_gpu(uint32_t* p, uint32_t v) {
  uint32_t old;
  asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], %2;" : "=r"(old) : "l"(p), "r"(v)
               : "memory");
  return old;
}

// Start of a send, thread 0 only (no barrier): the op number (= ops done + 1) into *s_op,
// where the block sees it after its next barrier; block 0 records it.
__device__ __forceinline__ void record_send(char* local, int* ticket, const char* name,
                                            int rank, uint64_t* s_op) {
  if (threadIdx.x == 0) {
    LowLatencyHeader* h = ll_header(local);
    const uint64_t op = read_seq(h) + 1;
    if (blockIdx.x == 0) {
      volatile uint64_t* pending = &h->send_pending;
      if (*pending == op)
        ll_fail(name, "a second *_send before the previous op's *_recv", rank, -1, -1, op, op);
      *pending = op;
      if (ticket != nullptr) *ticket = int(op);
    }
    *s_op = op;
  }
}

// Block-level start of a send: record_send, then the barrier that publishes the op.
__device__ __forceinline__ uint64_t begin_send(char* local, int* ticket, const char* name,
                                               int rank, uint64_t* s_op) {
  record_send(local, ticket, name, rank, s_op);
  __syncthreads();
  return *s_op;
}

// Block-level start of a recv: the op number, checked against the send's ticket.
__device__ __forceinline__ uint64_t begin_recv(char* local, const int* expect_ticket,
                                               const char* name, int rank, uint64_t* s_op) {
  if (threadIdx.x == 0) {
    const uint64_t op = read_seq(ll_header(local)) + 1;
    if (expect_ticket != nullptr && uint64_t(uint32_t(*expect_ticket)) != (op & 0xffffffffull))
      ll_fail(name, "*_recv does not belong to the last *_send", rank, -1, -1,
              uint64_t(uint32_t(*expect_ticket)), op);
    *s_op = op;
  }
  __syncthreads();
  return *s_op;
}

// Block-level start of a launch: the send's op number when it runs the send phase, else
// the recv's (checked against the send's ticket).
template <typename Args>
__device__ __forceinline__ uint64_t begin_phases(char* local, const Args& a, int phases,
                                                 const char* name, uint64_t* s_op) {
  return (phases & kLLSend) ? begin_send(local, a.ticket, name, a.me, s_op)
                            : begin_recv(local, a.expect_ticket, name, a.me, s_op);
}

// Block-level end of a recv: the last block to finish marks the op done locally. Every
// block read seq before it arrives here, so no block of this op can see the new value.
// No fence: seq and the arrival counter are read only by later launches on this GPU,
// which the kernel boundary orders (a fence here would make each block wait for its row
// stores to drain before it arrives).
__device__ __forceinline__ void finish_recv(char* local, uint64_t op) {
  __syncthreads();
  if (threadIdx.x == 0) {
    LowLatencyHeader* h = ll_header(local);
    const unsigned prev = atomicAdd(&h->recv_arrivals, 1u);
    if (prev + 1 == gridDim.x) {
      h->recv_arrivals = 0;
      *reinterpret_cast<volatile uint64_t*>(&h->seq) = op;
    }
  }
}

// ------------------------------------------------------------------ phase timing
// Compiled in only with -DJAX_EP_LL_TIMING (kLLTiming); otherwise every helper is empty.

// Clock pair at kernel entry (taken before the op number is known).
struct LLStamp {
  uint64_t ns, clk;
};
__device__ __forceinline__ LLStamp ll_stamp(const LLTimingRecord* ring) {
  LLStamp s{0, 0};
  if (kLLTiming && ring != nullptr && threadIdx.x == 0) {
    s.ns = global_timer_ns();
    s.clk = uint64_t(clock64());
  }
  return s;
}
// Thread 0 records point `p` of this block in op's record (no-op when timing is off).
__device__ __forceinline__ void ll_mark(LLTimingRecord* ring, uint64_t op, int p) {
  if (!kLLTiming || ring == nullptr || threadIdx.x != 0 ||
      blockIdx.x >= unsigned(kLLTimingMaxBlocks))
    return;
  LLTimingRecord& r = ring[op % kLLTimingRing];
  r.ns[blockIdx.x][p] = global_timer_ns();
  r.clk[blockIdx.x][p] = uint64_t(clock64());
}
// After begin_send / begin_recv: the entry stamp, the point "op known" (send launches) and,
// from block 0, the record's header.
__device__ __forceinline__ void ll_mark_begin(LLTimingRecord* ring, uint64_t op, int phases,
                                              const LLStamp& entry, int kind) {
  if (!kLLTiming || ring == nullptr || threadIdx.x != 0 ||
      blockIdx.x >= unsigned(kLLTimingMaxBlocks))
    return;
  LLTimingRecord& r = ring[op % kLLTimingRing];
  const int p = (phases & kLLSend) ? kLLTEntry : kLLTRecvEntry;
  r.ns[blockIdx.x][p] = entry.ns;
  r.clk[blockIdx.x][p] = entry.clk;
  if (phases & kLLSend) ll_mark(ring, op, kLLTOp);
  if (blockIdx.x == 0) {
    r.op = op;
    r.kind = uint64_t(kind);
    if (phases & kLLSend) r.grid_send = gridDim.x;
    if (phases & kLLRecv) r.grid_recv = gridDim.x;
  }
}
// Block-uniform: a barrier only when timing, so that a mark means "the whole block got here".
__device__ __forceinline__ void ll_sync_if(const LLTimingRecord* ring) {
  if (kLLTiming && ring != nullptr) __syncthreads();
}

// The block-wide copy loop both row copies below share: `rows` rows of `per_row` Vecs,
// flattened over (row, vector) so every thread has up to kUnroll independent loads in
// flight before its stores. load(i, c) reads vector c of row i; store(i, c, v) writes it.
template <typename Vec, typename Load, typename Store>
__device__ __forceinline__ void block_copy_flat(int rows, int per_row, Load load, Store store) {
  const int total = rows * per_row;
  for (int base = threadIdx.x; base < total; base += blockDim.x * kUnroll) {
    Vec v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int idx = base + u * int(blockDim.x);
      if (idx < total) {
        const int i = idx / per_row;
        v[u] = load(i, idx - i * per_row);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int idx = base + u * int(blockDim.x);
      if (idx < total) {
        const int i = idx / per_row;
        store(i, idx - i * per_row, v[u]);
      }
    }
  }
}

// Block-wide copy of `rows` rows of `row_bytes` (a multiple of sizeof(Vec)) from src (rows
// src_stride apart) to dst (rows dst_stride apart).
template <typename Vec, bool kCoherent>
__device__ __forceinline__ void block_copy_rows(char* dst, size_t dst_stride, const char* src,
                                                size_t src_stride, int rows, int row_bytes) {
  block_copy_flat<Vec>(
      rows, row_bytes / int(sizeof(Vec)),
      [&](int i, int c) {
        const Vec* p = reinterpret_cast<const Vec*>(src + size_t(i) * src_stride) + c;
        return kCoherent ? ld_cg(p) : ld_nc(p);
      },
      [&](int i, int c, const Vec& v) {
        reinterpret_cast<Vec*>(dst + size_t(i) * dst_stride)[c] = v;
      });
}

// Block-wide zero of `bytes` contiguous bytes (dst aligned to, and bytes a multiple of, Vec).
template <typename Vec>
__device__ __forceinline__ void block_zero(char* dst, size_t bytes) {
  Vec* d = reinterpret_cast<Vec*>(dst);
  const Vec z{};
  const size_t n = bytes / sizeof(Vec);
  for (size_t c = threadIdx.x; c < n; c += blockDim.x) d[c] = z;
}

}  // namespace
}  // namespace jax_ep
