// The nanobind module jax_ep._jax_ep_ffi: FFI handler capsules (registered by
// jax_ep/_native.py) and, when built with CUDA, communication-buffer management.
#include <nanobind/nanobind.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cstdint>
#include <string>
#include <vector>

#include "xla_ffi/cuda_handlers.h"
#include "xla_ffi/low_latency_handlers.h"

#ifdef JAX_EP_WITH_CUDA
#include <cuda_runtime.h>

#include "cuda/buffer_layout.h"
#include "cuda/low_latency.h"
#include "xla_ffi/buffer_registry.h"
#endif

namespace nb = nanobind;

namespace {

template <typename Fn>
nb::capsule handler_capsule(Fn* fn) {
  return nb::capsule(reinterpret_cast<void*>(fn));
}

nb::dict cpu_targets() {
  nb::dict d;
  d["jax_ep_cpu_add_one"] = handler_capsule(JaxEpCpuAddOne);
  return d;
}

nb::dict cuda_targets() {
  nb::dict d;
#ifdef JAX_EP_WITH_CUDA
  d["jax_ep_dispatch_layout"] = handler_capsule(JaxEpDispatchLayout);
  d["jax_ep_dispatch"] = handler_capsule(JaxEpDispatch);
  d["jax_ep_cached_dispatch"] = handler_capsule(JaxEpCachedDispatch);
  d["jax_ep_combine"] = handler_capsule(JaxEpCombine);
  d["jax_ep_ll_dispatch"] = handler_capsule(JaxEpLLDispatch);
  d["jax_ep_ll_dispatch_send"] = handler_capsule(JaxEpLLDispatchSend);
  d["jax_ep_ll_dispatch_recv"] = handler_capsule(JaxEpLLDispatchRecv);
  d["jax_ep_ll_combine"] = handler_capsule(JaxEpLLCombine);
  d["jax_ep_ll_combine_send"] = handler_capsule(JaxEpLLCombineSend);
  d["jax_ep_ll_combine_recv"] = handler_capsule(JaxEpLLCombineRecv);
#endif
  return d;
}

}  // namespace

NB_MODULE(_jax_ep_ffi, m) {
  m.doc() = "jax_ep native extension: XLA FFI handlers and NVLink buffer management";
  m.attr("version") = "0.1.0";
#ifdef JAX_EP_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  m.def("cpu_targets", &cpu_targets, "FFI targets for platform 'cpu': name -> capsule");
  m.def("cuda_targets", &cuda_targets, "FFI targets for platform 'CUDA': name -> capsule");
#ifdef JAX_EP_WITH_CUDA
  m.attr("max_ranks") = jax_ep::kMaxRanks;
  m.attr("max_experts") = jax_ep::kMaxExperts;
  m.attr("max_topk") = jax_ep::kMaxTopk;
  m.def("buffer_bytes_for_rows",
        [](int64_t rows) { return int64_t(jax_ep::buffer_bytes_for_rows(size_t(rows))); },
        nb::arg("rows"), "bytes a buffer needs for dispatches of up to `rows` received rows");
  m.def(
      "create_buffer",
      [](int64_t buffer_id, const std::vector<int>& devices, int64_t num_bytes) {
        std::string err;
        {
          nb::gil_scoped_release release;
          err = jax_ep::create_buffer(buffer_id, devices, size_t(num_bytes));
        }
        if (!err.empty()) throw std::runtime_error(err);
      },
      nb::arg("buffer_id"), nb::arg("devices"), nb::arg("num_bytes"),
      "Allocates and peer-maps one buffer per device; devices[r] is EP rank r.");
  m.def(
      "destroy_buffer",
      [](int64_t buffer_id) {
        nb::gil_scoped_release release;
        jax_ep::destroy_buffer(buffer_id);
      },
      nb::arg("buffer_id"), "Frees every device's buffer of this id (waits for the GPUs).");
  m.def(
      "export_buffer",
      [](int64_t buffer_id, int device, int64_t num_bytes, int64_t staging_bytes) {
        std::string blob, err;
        {
          nb::gil_scoped_release release;
          err = jax_ep::export_buffer(buffer_id, device, size_t(num_bytes), size_t(staging_bytes),
                                      &blob);
        }
        if (!err.empty()) throw std::runtime_error(err);
        return nb::bytes(blob.data(), blob.size());
      },
      nb::arg("buffer_id"), nb::arg("device"), nb::arg("num_bytes"), nb::arg("staging_bytes"),
      "Multi-process: allocates this GPU's buffer and staging area; returns the bytes peers "
      "need to map them.");
  m.def(
      "import_peers",
      [](int64_t buffer_id, int device, int rank, const std::vector<nb::bytes>& blobs) {
        std::vector<std::string> b;
        for (const nb::bytes& x : blobs) b.emplace_back(x.c_str(), x.size());
        std::string err;
        {
          nb::gil_scoped_release release;
          err = jax_ep::import_peers(buffer_id, device, rank, b);
        }
        if (!err.empty()) throw std::runtime_error(err);
      },
      nb::arg("buffer_id"), nb::arg("device"), nb::arg("rank"), nb::arg("blobs"),
      "Multi-process: maps every EP rank's buffer (blobs[r] from rank r's export_buffer).");
  m.def(
      "unmap_peers",
      [](int64_t buffer_id) {
        nb::gil_scoped_release release;
        jax_ep::unmap_peers(buffer_id);
      },
      nb::arg("buffer_id"), "Multi-process teardown step 1: closes the peers' mappings.");
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
          err = jax_ep::ll_timing_read(device, &blob);
        }
        if (!err.empty()) throw std::runtime_error(err);
        return nb::bytes(blob.data(), blob.size());
      },
      nb::arg("device"),
      "Low-latency phase timing (profiling builds, CMake -DJAX_EP_LL_TIMING=ON): waits for "
      "the GPU, returns "
      "its ring of records (layout: ll_timing_layout()); empty when none ran there.");
  m.def(
      "ll_timing_layout",
      []() {
        nb::dict d;
        d["ring"] = jax_ep::kLLTimingRing;
        d["max_blocks"] = jax_ep::kLLTimingMaxBlocks;
        d["points"] = int(jax_ep::kLLTimingPoints);
        d["header_words"] = 8;
        d["record_bytes"] = int64_t(sizeof(jax_ep::LLTimingRecord));
        return d;
      },
      "Layout of ll_timing's records: header (op, kind, grid_send, grid_recv, 4 "
      "pad) u64, then ns[max_blocks][points] u64, then clk[max_blocks][points] u64.");
#endif  // JAX_EP_LL_TIMING
#endif
}
