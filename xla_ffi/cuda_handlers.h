// C symbols of the FFI handlers (registered from module.cc).
#pragma once

#include "xla/ffi/api/c_api.h"

extern "C" {
// CPU (always built): proves FFI registration end to end.
XLA_FFI_Error* JaxEpCpuAddOne(XLA_FFI_CallFrame* call_frame);
#ifdef JAX_EP_WITH_CUDA
XLA_FFI_Error* JaxEpDispatchLayout(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* JaxEpDispatch(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* JaxEpCachedDispatch(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* JaxEpCombine(XLA_FFI_CallFrame* call_frame);
#endif
}
