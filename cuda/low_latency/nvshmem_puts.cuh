// The NvshmemPuts transport of the low-latency kernels (device.cuh): what a rank does to
// reach a rank of another node, over NVSHMEM's standard device API (every transport: P2P,
// IB through the proxy, IBGDA). Included only by the *_nvshmem.cu files of jax_ep_nvshmem.
#pragma once

#include <nvshmem.h>
#include <nvshmemx.h>

#include <cstddef>
#include <cstdint>

namespace jax_ep {
namespace {

struct NvshmemPuts {
  static constexpr bool kPuts = true;
  // Every thread of the block calls it with the same arguments; returns once issued.
  static __device__ __forceinline__ void put_block(void* dst, const void* src, size_t bytes,
                                                   int pe) {
    nvshmemx_putmem_nbi_block(dst, src, bytes, pe);
  }
  static __device__ __forceinline__ void put_int(int* dst, int v, int pe) {
    nvshmem_int_p(dst, v, pe);
  }
  static __device__ __forceinline__ void put_float(float* dst, float v, int pe) {
    nvshmem_float_p(dst, v, pe);
  }
  // Completes this thread's puts at their destinations.
  static __device__ __forceinline__ void quiet() { nvshmem_quiet(); }
  static __device__ __forceinline__ void signal(uint64_t* sig, uint64_t v, int pe) {
    nvshmemx_signal_op(sig, v, NVSHMEM_SIGNAL_SET, pe);
  }
  static __device__ __forceinline__ uint64_t fetch(uint64_t* sig) {
    return nvshmem_signal_fetch(sig);
  }
  // Returns at once when the value is there; orders the data the signal covers.
  static __device__ __forceinline__ void wait_at_least(uint64_t* sig, uint64_t v) {
    nvshmem_signal_wait_until(sig, NVSHMEM_CMP_GE, v);
  }
};

}  // namespace
}  // namespace jax_ep
