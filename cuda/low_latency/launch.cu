// The low-latency ops' launch entry points over NVLink stores (one NVLink domain).
#include "cuda/low_latency/launch_policy.cuh"

namespace jax_ep {

cudaError_t launch_ll_dispatch(const LLDispatchArgs& a, int phases, cudaStream_t stream) {
  return launch_ll_dispatch_with(kLLDispatchKernels, a, phases, stream);
}

cudaError_t launch_ll_combine(const LLCombineArgs& a, int phases, cudaStream_t stream) {
  return launch_ll_combine_with(kLLCombineKernels, a, phases, stream);
}

}  // namespace jax_ep
