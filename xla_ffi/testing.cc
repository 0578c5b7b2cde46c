// Probes for tests and profiling, in the submodule jax_ep._jax_ep_ffi.testing; the ops
// never need them.
//   cpu_targets(): a trivial CPU custom call (out = x + 1 over f32) that a CPU test runs
//     through jax.ffi.ffi_call (register it with jax_ep._native.load_testing()): it proves
//     that the extension loads and its FFI targets register, on machines without a GPU.
//   device_memory_info(device) (CUDA builds): free and total bytes, for leak checks.
//   ll_timing(device), ll_timing_layout() (profiling builds, JAX_EP_LL_TIMING): the
//     low-latency kernels' phase records (bench/ll_timing.py).
#include <nanobind/nanobind.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>

#include "xla/ffi/api/ffi.h"
#include "xla_ffi/bindings.h"

#ifdef JAX_EP_WITH_CUDA
#include <cuda_runtime.h>

#include "cuda/low_latency/low_latency.h"
#include "xla_ffi/handlers.h"
#endif

namespace ffi = xla::ffi;
namespace nb = nanobind;

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

namespace jax_ep {

void add_testing_bindings(nb::module_& m) {
  m.def(
      "cpu_targets",
      []() {
        nb::dict d;
        d["jax_ep_cpu_add_one"] = nb::capsule(reinterpret_cast<void*>(JaxEpCpuAddOne));
        return d;
      },
      "FFI targets for platform 'cpu': name -> capsule");
#ifdef JAX_EP_WITH_CUDA
  m.def(
      "device_memory_info",
      [](int device) {
        size_t free_b = 0, total_b = 0;
        int saved = 0;
        cudaGetDevice(&saved);
        cudaSetDevice(device);
        cudaError_t err = cudaMemGetInfo(&free_b, &total_b);
        cudaSetDevice(saved);
        if (err != cudaSuccess) throw std::runtime_error(cudaGetErrorString(err));
        return std::make_pair(int64_t(free_b), int64_t(total_b));
      },
      nb::arg("device"), "(free, total) bytes of a GPU (cudaMemGetInfo), for leak checks.");
#ifdef JAX_EP_LL_TIMING
  m.def(
      "ll_timing",
      [](int device) {
        std::string blob, err;
        {
          nb::gil_scoped_release release;
          err = ll_timing_read(device, &blob);
        }
        if (!err.empty()) throw std::runtime_error(err);
        return nb::bytes(blob.data(), blob.size());
      },
      nb::arg("device"),
      "Low-latency phase timing (profiling builds): waits for the GPU, returns its ring of "
      "records (layout: ll_timing_layout()); empty when none ran there.");
  m.def(
      "ll_timing_layout",
      []() {
        nb::dict d;
        d["ring"] = kLLTimingRing;
        d["max_blocks"] = kLLTimingMaxBlocks;
        d["points"] = int(kLLTimingPoints);
        d["header_words"] = 8;
        d["record_bytes"] = int64_t(sizeof(LLTimingRecord));
        return d;
      },
      "Layout of ll_timing's records: header (op, kind, grid_send, grid_recv, 4 "
      "pad) u64, then ns[max_blocks][points] u64, then clk[max_blocks][points] u64.");
#endif  // JAX_EP_LL_TIMING
#endif  // JAX_EP_WITH_CUDA
}

}  // namespace jax_ep
