// The low-latency dispatch kernels over NVLink stores inside a node and NVSHMEM puts
// across nodes (jax_ep_nvshmem: relocatable device code, device-linked with NVSHMEM).
#include "cuda/low_latency/nvshmem_puts.cuh"
#include "cuda/low_latency/dispatch.cuh"
#include "cuda/low_latency/kernels.h"

namespace jax_ep {

const LLDispatchKernel kLLDispatchKernelsNvshmem[3] = JAX_EP_LL_DISPATCH_TABLE(NvshmemPuts);

}  // namespace jax_ep
