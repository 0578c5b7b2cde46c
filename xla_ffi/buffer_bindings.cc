// Communication-buffer management (xla_ffi/buffer_registry.h) and the limits the kernels
// are compiled for, as attributes of jax_ep._jax_ep_ffi (CUDA builds only).
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda/common/buffer_layout.h"
#include "cuda/low_latency/low_latency.h"
#include "xla_ffi/bindings.h"
#include "xla_ffi/buffer_registry.h"
#include "xla_ffi/low_latency_registry.h"

namespace nb = nanobind;

namespace jax_ep {

void add_buffer_bindings(nb::module_& m) {
  // jax_ep/backends/cuda/_ffi.py reads these (FALLBACK_LIMITS where CUDA is not built).
  nb::dict limits;
  limits["max_ranks"] = kMaxRanks;
  limits["max_experts"] = kMaxExperts;
  limits["max_topk"] = kMaxTopk;
  limits["ll_max_tokens_per_rank"] = kLLMaxTokensPerRank;
  limits["ll_offset"] = int64_t(kLowLatencyOffset);
  limits["ll_data_offset"] = int64_t(kLLDataOffset);
  limits["ll_halves_offset"] = int64_t(kLLHalvesOffset);
  limits["ll_max_ranks"] = kLLMaxRanks;
  limits["dup_src_offset"] = int64_t(kDupSrcOffset);
  m.attr("limits") = limits;
  m.def("buffer_bytes_for_rows",
        [](int64_t rows) { return int64_t(buffer_bytes_for_rows(size_t(rows))); },
        nb::arg("rows"), "bytes a buffer needs for dispatches of up to `rows` received rows");
  m.def(
      "create_buffer",
      [](int64_t buffer_id, const std::vector<int>& devices, int64_t num_bytes) {
        std::string err;
        {
          nb::gil_scoped_release release;
          err = create_buffer(buffer_id, devices, size_t(num_bytes));
        }
        if (!err.empty()) throw std::runtime_error(err);
      },
      nb::arg("buffer_id"), nb::arg("devices"), nb::arg("num_bytes"),
      "Allocates and peer-maps one buffer per device; devices[r] is EP rank r.");
  m.def(
      "destroy_buffer",
      [](int64_t buffer_id) {
        nb::gil_scoped_release release;
        destroy_buffer(buffer_id);
      },
      nb::arg("buffer_id"), "Frees every device's buffer of this id (waits for the GPUs).");
  m.def(
      "export_buffer",
      [](int64_t buffer_id, int device, int64_t num_bytes, int64_t staging_bytes) {
        std::string blob, err;
        {
          nb::gil_scoped_release release;
          err = export_buffer(buffer_id, device, size_t(num_bytes), size_t(staging_bytes),
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
          err = import_peers(buffer_id, device, rank, b);
        }
        if (!err.empty()) throw std::runtime_error(err);
      },
      nb::arg("buffer_id"), nb::arg("device"), nb::arg("rank"), nb::arg("blobs"),
      "Multi-process: maps every EP rank's buffer (blobs[r] from rank r's export_buffer).");
  m.def(
      "unmap_peers",
      [](int64_t buffer_id) {
        nb::gil_scoped_release release;
        unmap_peers(buffer_id);
      },
      nb::arg("buffer_id"), "Multi-process teardown step 1: closes the peers' mappings.");
  m.def(
      "register_ll_symmetric",
      [](int64_t buffer_id, int device, int rank, const std::vector<uint64_t>& regions,
         const std::vector<int>& pes, int64_t num_bytes, nb::capsule launchers) {
        std::string err;
        {
          nb::gil_scoped_release release;
          err = register_ll_symmetric(buffer_id, device, rank, regions, pes, size_t(num_bytes),
                                      static_cast<const LLLaunchers*>(launchers.data()));
        }
        if (!err.empty()) throw std::runtime_error(err);
      },
      nb::arg("buffer_id"), nb::arg("device"), nb::arg("rank"), nb::arg("regions"),
      nb::arg("pes"), nb::arg("num_bytes"), nb::arg("launchers"),
      "EP group over several nodes: registers this GPU's symmetric low-latency region "
      "(regions[r]: rank r's region as mapped here, 0 across nodes; zeroes the header) and "
      "the launchers from jax_ep._jax_ep_nvshmem.ll_launchers().");
  m.def(
      "unregister_ll_symmetric",
      [](int64_t buffer_id) {
        nb::gil_scoped_release release;
        unregister_ll_symmetric(buffer_id);
      },
      nb::arg("buffer_id"), "Forgets a Buffer's symmetric low-latency region (waits for the GPU).");
}

}  // namespace jax_ep
