// A trivial CPU custom call (out = x + 1 over f32) that a CPU test runs through
// jax.ffi.ffi_call: it proves that the extension loads and its FFI targets register,
// on machines without a GPU.
#include "xla/ffi/api/ffi.h"
#include "xla_ffi/cuda_handlers.h"

namespace ffi = xla::ffi;

namespace {

ffi::Error AddOneImpl(ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> out) {
  const size_t n = x.element_count();
  const float* in = x.typed_data();
  float* o = out->typed_data();
  for (size_t i = 0; i < n; ++i) o[i] = in[i] + 1.0f;
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxEpCpuAddOne, AddOneImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
