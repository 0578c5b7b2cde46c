// C symbols of the FFI handlers (registered by module.cc) and the profiling read-back.
#pragma once

#include <string>

#include "xla/ffi/api/c_api.h"

extern "C" {
#ifdef JAX_EP_WITH_CUDA
// normal_handlers.cc
XLA_FFI_Error* JaxEpDispatchLayout(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* JaxEpDispatch(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* JaxEpCachedDispatch(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* JaxEpCombine(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* JaxEpDispatchOnSideStream(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* JaxEpCachedDispatchOnSideStream(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* JaxEpCombineOnSideStream(XLA_FFI_CallFrame* call_frame);
// side_stream.cc
XLA_FFI_Error* JaxEpSideStreamJoin(XLA_FFI_CallFrame* call_frame);
// low_latency_handlers.cc
XLA_FFI_Error* JaxEpLLDispatch(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* JaxEpLLDispatchSend(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* JaxEpLLDispatchRecv(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* JaxEpLLCombine(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* JaxEpLLCombineSend(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* JaxEpLLCombineRecv(XLA_FFI_CallFrame* call_frame);
#endif
#ifdef JAX_EP_WITH_GROUPED_MATMUL
// grouped_matmul_handlers.cc
XLA_FFI_Error* JaxEpGroupedMatmul(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* JaxEpGroupedMatmulWeightGrad(XLA_FFI_CallFrame* call_frame);
#endif
}

#ifdef JAX_EP_WITH_CUDA
namespace jax_ep {
// Phase timing (profiling builds, JAX_EP_LL_TIMING): waits for every stream of `device`,
// then copies its ring of kLLTimingRing LLTimingRecords (cuda/low_latency/low_latency.h) into *out;
// *out is empty when no timed op ran there. Returns an error message, or "" on success.
std::string ll_timing_read(int device, std::string* out);
}  // namespace jax_ep
#endif
