// Cross-GPU synchronisation primitives: system-scope acquire/release flags in peer
// memory and spin-waits that trap with a readable message instead of hanging.
#pragma once

#include <cstdint>
#include <cstdio>

#include "cuda/common/buffer_layout.h"

namespace jax_ep {

// A wait this long means a peer never arrived (a rank skipped the op, or ranks ran
// different op sequences on one buffer): fail loudly rather than hang the job.
constexpr uint64_t kTimeoutNs = 20ull * 1000 * 1000 * 1000;

__device__ __forceinline__ uint64_t global_timer_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ __forceinline__ uint64_t ld_acquire_sys(const uint64_t* p) {
  uint64_t v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ uint32_t ld_acquire_sys(const uint32_t* p) {
  uint32_t v;
  asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void st_release_sys(uint64_t* p, uint64_t v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ void red_add_release_sys(uint32_t* p, uint32_t v) {
  asm volatile("red.release.sys.global.add.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

static __device__ __noinline__ void trap_timeout(const char* op, const char* what, int rank, int peer,
                                          uint64_t seen, uint64_t wanted) {
  printf("jax_ep: %s timed out on rank %d waiting for %s of peer %d (saw %llu, want %llu); "
         "every rank must run the same ops on a Buffer\n",
         op, rank, what, peer, (unsigned long long)seen, (unsigned long long)wanted);
  asm volatile("trap;");
}

// Spins until *flag >= target (64-bit flags tagged with the op sequence number).
__device__ __forceinline__ void wait_at_least(const uint64_t* flag, uint64_t target,
                                              const char* op, const char* what, int rank,
                                              int peer) {
  uint64_t v = ld_acquire_sys(flag);
  if (v >= target) return;
  const uint64_t start = global_timer_ns();
  while ((v = ld_acquire_sys(flag)) < target) {
    if (global_timer_ns() - start > kTimeoutNs) trap_timeout(op, what, rank, peer, v, target);
  }
}

// Spins until *counter == target (32-bit arrival counters, reset by their owner).
__device__ __forceinline__ void wait_equal(const uint32_t* counter, uint32_t target,
                                           const char* op, const char* what, int rank) {
  uint32_t v = ld_acquire_sys(counter);
  if (v == target) return;
  const uint64_t start = global_timer_ns();
  while ((v = ld_acquire_sys(counter)) != target) {
    if (global_timer_ns() - start > kTimeoutNs) trap_timeout(op, what, rank, -1, v, target);
  }
}

__device__ __forceinline__ BufferHeader* header_of(char* base) {
  return reinterpret_cast<BufferHeader*>(base + kHeaderOffset);
}
__device__ __forceinline__ int* count_matrix_of(char* base) {
  return reinterpret_cast<int*>(base + kCountMatrixOffset);
}
__device__ __forceinline__ Workspace* workspace_of(char* base) {
  return reinterpret_cast<Workspace*>(base + kWorkspaceOffset);
}
__device__ __forceinline__ int* dup_src_of(char* base) {
  return reinterpret_cast<int*>(base + kDupSrcOffset);
}

// Block-level: thread r < num_ranks waits until rank r published this op's pointers,
// then copies them to shared memory (ptrs[r][i]).
__device__ __forceinline__ void load_peer_pointers(const PeerBases& peers, int me, int num_ranks,
                                                   uint64_t seq, int count,
                                                   uint64_t (*ptrs)[kMaxPublished],
                                                   const char* op) {
  const int r = threadIdx.x;
  if (r < num_ranks) {
    BufferHeader* h = header_of(peers.base[r]);
    wait_at_least(&h->ptr_seq, seq, op, "published pointers", me, r);
    for (int i = 0; i < count; ++i) {
      const uint64_t v = h->published[i];  // 0 = nothing published in this slot
      ptrs[r][i] = v == 0 ? 0 : v + uint64_t(peers.ptr_delta[r]);
    }
  }
  __syncthreads();
}

// Block-level end of an op that touched peers' published buffers: tell every rank that
// this block is done with them, then (block 0) wait until every block of every rank is
// done with ours, and reset the counter for the next op.
__device__ __forceinline__ void finish_op(const PeerBases& peers, int me, int num_ranks,
                                          const char* op) {
  __threadfence_system();
  __syncthreads();
  if (threadIdx.x < num_ranks) {
    red_add_release_sys(&header_of(peers.base[threadIdx.x])->done_count, 1u);
  }
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    BufferHeader* h = header_of(peers.base[me]);
    wait_equal(&h->done_count, uint32_t(num_ranks) * gridDim.x, op, "all ranks done", me);
    h->done_count = 0;  // nobody adds again before we publish the next op's pointers
    __threadfence_system();
  }
}

}  // namespace jax_ep
