// NVSHMEM host bootstrap for jax_ep: unique-id initialisation (one process per GPU), the
// symmetric heap, teardown, and a device-side ring test that proves the device library is
// linked and initialised. Implemented in cuda/nvshmem/runtime.cu and ring.cu (compiled
// with relocatable device code and device-linked against libnvshmem_device.a); exposed to
// Python by the extension module jax_ep._jax_ep_nvshmem (xla_ffi/nvshmem_bootstrap.cc).
//
// Every function returns an empty string on success and an error message otherwise; none
// of them exits the process on an error NVSHMEM reports through a status code (NVSHMEM
// itself may still abort on internal failures).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace jax_ep::nvshmem {

constexpr size_t kUniqueIdBytes = 128;  // sizeof(nvshmemx_uniqueid_t)

struct Info {
  bool initialized = false;
  int pe = -1;
  int num_pes = 0;
  int device = -1;  // CUDA ordinal this process's PE runs on
  int version_major = 0, version_minor = 0, version_patch = 0;  // NVSHMEM built against
};

struct RingResult {
  bool ok = false;
  int64_t mismatched_bytes = 0;  // summed over iterations
  int64_t bad_ids = 0;           // iterations where nvshmem_int_p's value was wrong
  bool peer_is_p2p = false;      // nvshmem_ptr() reaches the next PE (NVLink/PCIe P2P)
};

// Creates a unique id (process 0 only; the others receive it through the KV store).
std::string get_unique_id(std::string* id_out);

// cudaSetDevice(device), then NVSHMEM init with the unique id: collective over all PEs.
std::string init(int device, int rank, int num_ranks, const std::string& unique_id);

// Frees the heap allocations still live, then finalises NVSHMEM: collective.
std::string finalize();

Info info();

// nvshmem_malloc / nvshmem_free: collective (every PE, same sizes, same order).
std::string symmetric_alloc(size_t num_bytes, uintptr_t* ptr_out);
std::string symmetric_free(uintptr_t ptr);
// nvshmem_ptr on the host: *out is PE `pe`'s copy of `ptr` mapped here, or 0.
std::string peer_pointer(uintptr_t ptr, int pe, uintptr_t* out);
size_t num_live_allocations();

// Collective: each PE puts a pattern of `num_bytes` into the next PE's symmetric buffer
// (put-with-signal + nvshmem_int_p) and checks what the previous PE put into its own.
std::string ring_test(size_t num_bytes, int iterations, RingResult* result);

}  // namespace jax_ep::nvshmem
