// The extension module jax_ep._jax_ep_nvshmem: NVSHMEM bootstrap bindings (see
// cuda/nvshmem/runtime.h). A module of its own, so that only it depends on
// libnvshmem_host.so: jax_ep._jax_ep_ffi imports where NVSHMEM is missing, and
// jax_ep/nvshmem.py imports this one lazily, after preloading the host library.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "cuda/nvshmem/runtime.h"
#include "cuda/internode/rail.h"
#include "cuda/low_latency/low_latency.h"
#include "xla_ffi/rail_handlers.h"

namespace nb = nanobind;

namespace {

void check(const std::string& err) {
  if (!err.empty()) throw std::runtime_error(err);
}

}  // namespace

void register_nvshmem_bindings(nb::module_& m) {
  namespace nv = jax_ep::nvshmem;
  m.attr("unique_id_bytes") = nv::kUniqueIdBytes;
  m.def("get_unique_id", []() {
    std::string id;
    check(nv::get_unique_id(&id));
    return nb::bytes(id.data(), id.size());
  }, "A new NVSHMEM unique id (128 bytes); process 0 makes it, every process passes it to init.");
  m.def("init", [](int device, int rank, int num_ranks, nb::bytes unique_id) {
    std::string id(unique_id.c_str(), unique_id.size());
    std::string err;
    {
      nb::gil_scoped_release release;
      err = nv::init(device, rank, num_ranks, id);
    }
    check(err);
  }, nb::arg("device"), nb::arg("rank"), nb::arg("num_ranks"), nb::arg("unique_id"),
     "cudaSetDevice(device) and NVSHMEM init from the unique id (collective).");
  m.def("finalize", []() {
    std::string err;
    {
      nb::gil_scoped_release release;
      err = nv::finalize();
    }
    check(err);
  }, "Frees live symmetric allocations, then finalises NVSHMEM (collective).");
  m.def("info", []() {
    nv::Info i = nv::info();
    nb::dict d;
    d["initialized"] = i.initialized;
    d["pe"] = i.pe;
    d["num_pes"] = i.num_pes;
    d["device"] = i.device;
    d["version"] = nb::make_tuple(i.version_major, i.version_minor, i.version_patch);
    return d;
  }, "State of this process's PE and the NVSHMEM version built against.");
  m.def("symmetric_alloc", [](int64_t num_bytes) {
    if (num_bytes <= 0) throw std::invalid_argument("jax_ep.nvshmem: num_bytes must be > 0");
    uintptr_t p = 0;
    std::string err;
    {
      nb::gil_scoped_release release;
      err = nv::symmetric_alloc(size_t(num_bytes), &p);
    }
    check(err);
    return uint64_t(p);
  }, nb::arg("num_bytes"), "nvshmem_malloc (collective); returns the device address.");
  m.def("symmetric_free", [](uint64_t ptr) {
    std::string err;
    {
      nb::gil_scoped_release release;
      err = nv::symmetric_free(uintptr_t(ptr));
    }
    check(err);
  }, nb::arg("ptr"), "nvshmem_free (collective).");
  m.def("num_live_allocations", []() { return nv::num_live_allocations(); });
  m.def("ring_test", [](int64_t num_bytes, int iterations) {
    if (num_bytes <= 0) throw std::invalid_argument("jax_ep.nvshmem: num_bytes must be > 0");
    nv::RingResult r;
    std::string err;
    {
      nb::gil_scoped_release release;
      err = nv::ring_test(size_t(num_bytes), iterations, &r);
    }
    check(err);
    nb::dict d;
    d["ok"] = r.ok;
    d["mismatched_bytes"] = r.mismatched_bytes;
    d["bad_ids"] = r.bad_ids;
    d["peer_is_p2p"] = r.peer_is_p2p;
    return d;
  }, nb::arg("num_bytes"), nb::arg("iterations") = 1,
     "Collective device-side test: a pattern travels to the next PE (put-with-signal).");
}

void register_internode_bindings(nb::module_& m) {
  namespace in = jax_ep::internode;
  m.def("cuda_targets", []() {
    nb::dict d;
    d["jax_ep_rail_exchange"] = nb::capsule(reinterpret_cast<void*>(JaxEpRailExchange));
    return d;
  }, "FFI targets for platform 'CUDA' (the internode exchange): name -> capsule");
  m.def("register_rail", [](int64_t buffer_id, uint64_t ptr, int64_t num_bytes, int my_node,
                            int my_pe, const std::vector<int>& pes) {
    check(in::register_rail(buffer_id, uintptr_t(ptr), size_t(num_bytes), my_node, my_pe, pes));
  }, nb::arg("buffer_id"), nb::arg("ptr"), nb::arg("num_bytes"), nb::arg("my_node"),
     nb::arg("my_pe"), nb::arg("pes"),
     "Registers a Buffer's symmetric region for the internode exchange (zeroes its header).");
  m.def("unregister_rail", [](int64_t buffer_id) { check(in::unregister_rail(buffer_id)); },
        nb::arg("buffer_id"));
  m.attr("rail_data_offset") = in::kRailDataOffset;
  m.attr("max_nodes") = in::kMaxNodes;
  m.def("ll_launchers", []() {
    return nb::capsule(const_cast<jax_ep::LLLaunchers*>(jax_ep::ll_launchers_nvshmem()));
  }, "The low-latency kernels' launchers over stores and NVSHMEM puts, for "
     "jax_ep._jax_ep_ffi.register_ll_symmetric.");
  m.def("peer_pointer", [](uint64_t ptr, int pe) {
    uintptr_t out = 0;
    check(jax_ep::nvshmem::peer_pointer(uintptr_t(ptr), pe, &out));
    return uint64_t(out);
  }, nb::arg("ptr"), nb::arg("pe"),
     "nvshmem_ptr: PE `pe`'s copy of the symmetric address `ptr` as this GPU can load and "
     "store it (0 where only puts reach it).");
}

NB_MODULE(_jax_ep_nvshmem, m) {
  m.doc() = "jax_ep NVSHMEM (one process per GPU): init, symmetric heap, ring test, and the "
            "internode exchange's FFI target";
  register_nvshmem_bindings(m);
  register_internode_bindings(m);
}
