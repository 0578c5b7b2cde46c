// The low-latency combine kernels over NVLink stores (one NVLink domain).
#include "cuda/low_latency/combine.cuh"
#include "cuda/low_latency/kernels.h"

namespace jax_ep {

const LLCombineKernel kLLCombineKernels[3][3] = JAX_EP_LL_COMBINE_TABLE(NvlinkStores);

}  // namespace jax_ep
