// The low-latency ops' launch entry points over NVLink stores inside a node and NVSHMEM
// puts across nodes (jax_ep_nvshmem); the handlers of _jax_ep_ffi get them through
// ll_launchers_nvshmem (a capsule of jax_ep._jax_ep_nvshmem).
#include "cuda/low_latency/launch_policy.cuh"

namespace jax_ep {
namespace {

cudaError_t launch_dispatch(const LLDispatchArgs& a, int phases, cudaStream_t stream) {
  return launch_ll_dispatch_with(kLLDispatchKernelsNvshmem, a, phases, stream);
}

cudaError_t launch_combine(const LLCombineArgs& a, int phases, cudaStream_t stream) {
  return launch_ll_combine_with(kLLCombineKernelsNvshmem, a, phases, stream);
}

}  // namespace

const LLLaunchers* ll_launchers_nvshmem() {
  static const LLLaunchers launchers{launch_dispatch, launch_combine};
  return &launchers;
}

}  // namespace jax_ep
