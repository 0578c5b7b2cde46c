// C symbols of the low-latency FFI handlers (registered from module.cc).
#pragma once

#include "xla/ffi/api/c_api.h"

extern "C" {
#ifdef JAX_EP_WITH_CUDA
XLA_FFI_Error* JaxEpLLDispatch(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* JaxEpLLDispatchSend(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* JaxEpLLDispatchRecv(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* JaxEpLLCombine(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* JaxEpLLCombineSend(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* JaxEpLLCombineRecv(XLA_FFI_CallFrame* call_frame);
#endif
}
