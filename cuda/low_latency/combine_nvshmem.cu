// The low-latency combine kernels over NVLink stores inside a node and NVSHMEM puts
// across nodes (jax_ep_nvshmem: relocatable device code, device-linked with NVSHMEM).
#include "cuda/low_latency/nvshmem_puts.cuh"
#include "cuda/low_latency/combine.cuh"
#include "cuda/low_latency/kernels.h"

namespace jax_ep {

const LLCombineKernel kLLCombineKernelsNvshmem[3][3] = JAX_EP_LL_COMBINE_TABLE(NvshmemPuts);

}  // namespace jax_ep
