// The NVSHMEM ring test kernel (device code; runtime.cu launches it): proves that the
// device library is linked and initialised.
#include <nvshmem.h>
#include <nvshmemx.h>

#include <cstdint>
#include <cstdio>

#include "cuda/common/device_sync.cuh"
#include "cuda/nvshmem/ring.h"

namespace jax_ep::nvshmem {
namespace {

__device__ __forceinline__ uint8_t pattern(int pe, size_t i, uint64_t round) {
  return uint8_t((uint64_t(pe) * 131u + uint64_t(i) * 7u + round * 29u + 1u) & 0xffu);
}

// One block. sym = [send n | recv n]; sig and id are symmetric too. Each PE:
//   - writes its PE id into the next PE's `id` (nvshmem_int_p), fenced before the data;
//   - puts its send buffer into the next PE's recv buffer with a signal (= round);
//   - waits for its own signal from the previous PE and checks the received bytes and id.
__global__ void ring_kernel(uint8_t* sym, uint64_t* sig, int* id, size_t n, uint64_t round,
                            unsigned long long* bad_bytes, unsigned long long* bad_ids) {
  const int me = nvshmem_my_pe();
  const int npes = nvshmem_n_pes();
  const int next = (me + 1) % npes;
  const int prev = (me + npes - 1) % npes;
  uint8_t* send = sym;
  uint8_t* recv = sym + n;
  for (size_t i = threadIdx.x; i < n; i += blockDim.x) send[i] = pattern(me, i, round);
  if (threadIdx.x == 0) {
    nvshmem_int_p(id, me, next);
    nvshmem_fence();  // the id lands before the signalled data below
  }
  __syncthreads();
  nvshmemx_putmem_signal_nbi_block(recv, send, n, sig, round, NVSHMEM_SIGNAL_SET, next);
  if (threadIdx.x == 0) {
    // Poll with a timeout (a dead peer must not hang the GPU), then let the wait give the
    // ordering guarantee for the signalled data (it returns at once).
    const uint64_t start = global_timer_ns();
    while (nvshmem_signal_fetch(sig) != round) {
      if (global_timer_ns() - start > kTimeoutNs) {
        printf("jax_ep.nvshmem ring_test: PE %d timed out waiting for PE %d (round %llu)\n", me,
               prev, (unsigned long long)round);
        asm volatile("trap;");
      }
    }
    nvshmem_signal_wait_until(sig, NVSHMEM_CMP_EQ, round);
  }
  __syncthreads();
  unsigned long long bad = 0;
  for (size_t i = threadIdx.x; i < n; i += blockDim.x) bad += (recv[i] != pattern(prev, i, round));
  if (bad) atomicAdd(bad_bytes, bad);
  if (threadIdx.x == 0) {
    if (*reinterpret_cast<volatile int*>(id) != prev) atomicAdd(bad_ids, 1ull);
    nvshmem_quiet();  // this PE's puts are complete before the buffers are reused
  }
}

}  // namespace

const RingKernel kRingKernel = ring_kernel;

}  // namespace jax_ep::nvshmem
