// Hopper bulk copies (the TMA engine, 1-D form) between global memory (local or a
// peer's, over NVLink) and shared memory. One thread moves kilobytes per instruction,
// so a few SMs can keep NVLink busy where per-lane loads/stores would need many more.
#pragma once

#include <cstdint>
#include <cstdio>

#include "cuda/common/device_sync.cuh"

namespace jax_ep {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void mbar_init(uint64_t* bar) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_addr(bar)));
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}

// Global -> shared; completion (bytes landed) is tracked by `bar`.
__device__ __forceinline__ void tma_load(void* smem_dst, const void* src, uint32_t bytes,
                                         uint64_t* bar) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;"
               ::"r"(smem_addr(bar)), "r"(bytes) : "memory");
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
      ::"r"(smem_addr(smem_dst)), "l"(src), "r"(bytes), "r"(smem_addr(bar)) : "memory");
}

__device__ __forceinline__ bool mbar_try_wait(uint64_t* bar, uint32_t phase) {
  uint32_t done;
  asm volatile(
      "{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; "
      "selp.u32 %0, 1, 0, p; }"
      : "=r"(done) : "r"(smem_addr(bar)), "r"(phase) : "memory");
  return done != 0;
}

// Waits for a bulk load; traps (rather than hangs) if it never lands.
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t phase) {
  if (mbar_try_wait(bar, phase)) return;
  const uint64_t start = global_timer_ns();
  while (!mbar_try_wait(bar, phase)) {
    if (global_timer_ns() - start > kTimeoutNs) {
      printf("jax_ep: a bulk (TMA) load timed out in block %d warp %d\n", int(blockIdx.x),
             int(threadIdx.x / 32));
      asm volatile("trap;");
    }
  }
}

// Shared -> global (any GPU's memory); grouped with bulk_commit / bulk_wait_*.
__device__ __forceinline__ void tma_store(void* dst, const void* smem_src, uint32_t bytes) {
  asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;"
               ::"l"(dst), "r"(smem_addr(smem_src)), "r"(bytes) : "memory");
}

__device__ __forceinline__ void bulk_commit() {
  asm volatile("cp.async.bulk.commit_group;" ::: "memory");
}

// Until at most N groups are still reading their shared memory.
template <int N>
__device__ __forceinline__ void bulk_wait_read() {
  asm volatile("cp.async.bulk.wait_group.read %0;" ::"n"(N) : "memory");
}

// Orders this thread's ordinary shared-memory writes before later bulk copies that read
// them (the bulk copy engine is a separate "async proxy").
__device__ __forceinline__ void fence_smem_for_bulk() {
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}

// Until every group has fully completed (its writes performed).
__device__ __forceinline__ void bulk_wait_all() {
  asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
  asm volatile("fence.proxy.async;" ::: "memory");
}

}  // namespace jax_ep
