// The side stream of the normal ops (Buffer(side_stream=True)): a handler launches its
// kernels on a library stream of its GPU instead of XLA's stream, and a separate join
// custom call makes XLA's stream wait for them. XLA schedules the work between the two
// like any other instructions, so compute placed there runs while the exchange is in
// flight (jax_ep/overlap.py pins that order with optimization barriers).
//
//   XLA stream:  ... -> record `ready` ------------------------------ wait `done[slot]` -> ...
//   side stream:              wait `ready` -> the op's kernels -> record `done[slot]`
//
// Every op of a side-stream Buffer runs on this one stream, so consecutive exchanges stay
// in issue order. The stream has the GPU's highest priority: an exchange's blocks are
// scheduled ahead of queued matmul blocks. Slots are chosen per call site by the Python
// side; a join waits for the last launch recorded under its slot.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "xla/ffi/api/ffi.h"

namespace jax_ep {

// One op's launch on the side stream: begin() (slot >= 0) makes the side stream wait for
// everything issued so far on `xla_stream` and returns it; the destructor records the
// slot's event after the op's kernels. slot < 0: the op runs on `xla_stream` itself.
class SideStreamLaunch {
 public:
  SideStreamLaunch(cudaStream_t xla_stream, int32_t device, int64_t slot, std::string op)
      : xla_stream_(xla_stream), device_(device), slot_(slot), op_(std::move(op)) {}
  SideStreamLaunch(const SideStreamLaunch&) = delete;
  SideStreamLaunch& operator=(const SideStreamLaunch&) = delete;
  ~SideStreamLaunch();
  // The stream the op launches on, or an error (stream or event creation failed).
  xla::ffi::ErrorOr<cudaStream_t> begin();

 private:
  cudaStream_t xla_stream_;
  int32_t device_;
  int64_t slot_;
  std::string op_;
  cudaStream_t side_ = nullptr;
  cudaEvent_t done_ = nullptr;
};

}  // namespace jax_ep

extern "C" XLA_FFI_Error* JaxEpSideStreamJoin(XLA_FFI_CallFrame* call_frame);

// Defines the handler `name` over `impl` and `binding`, which XLA may capture into CUDA
// graphs, and `name##OnSideStream`, the same handler for side-stream launches, which it
// may not (a graph cannot hold a wait on an event recorded outside it).
#define JAX_EP_DEFINE_HANDLER_WITH_SIDE_STREAM(name, impl, binding)                 \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, impl, binding,                                \
                                {xla::ffi::Traits::kCmdBufferCompatible});          \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name##OnSideStream, impl, binding)
