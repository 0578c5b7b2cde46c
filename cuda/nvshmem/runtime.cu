// NVSHMEM runtime for jax_ep (see runtime.h), host side: initialisation from a unique id,
// symmetric allocations, finalisation, and the launches of the ring test (ring.cu).
//
// Compiled with relocatable device code and device-linked (inside the static library
// jax_ep_nvshmem) against libnvshmem_device.a. NVSHMEM's device state
// (nvshmemi_device_state_d) is a __constant__ of that device image; nvshmemi_init_thread,
// the host half of libnvshmem_device.a linked into the same module, hands the host library
// a callback that finds the symbol in this image, so the state is set at init without
// nvshmemx_cumodule_init (which is only for cubins loaded with cuModuleLoad).
#include <cuda_runtime.h>
#include <nvshmem.h>
#include <nvshmemx.h>

#include <cstdint>
#include <cstring>
#include <mutex>
#include <set>
#include <string>

#include "cuda/nvshmem/ring.h"
#include "cuda/nvshmem/runtime.h"

namespace jax_ep::nvshmem {
namespace {

std::mutex g_mu;
bool g_initialized = false;
int g_device = -1;
std::set<uintptr_t> g_live;  // nvshmem_malloc'd pointers not yet freed

std::string cuda_error(const char* what, cudaError_t e) {
  return std::string("jax_ep.nvshmem: ") + what + " failed: " + cudaGetErrorString(e);
}

#define JAX_EP_CUDA_RETURN(what, expr)                   \
  do {                                                   \
    cudaError_t e_ = (expr);                             \
    if (e_ != cudaSuccess) return cuda_error(what, e_);  \
  } while (0)

std::string not_initialized(const char* what) {
  return std::string("jax_ep.nvshmem: ") + what +
         " needs NVSHMEM initialised first (jax_ep.nvshmem.initialize())";
}

}  // namespace

std::string get_unique_id(std::string* id_out) {
  nvshmemx_uniqueid_t id = NVSHMEMX_UNIQUEID_INITIALIZER;
  int status = nvshmemx_get_uniqueid(&id);
  if (status != 0)
    return "jax_ep.nvshmem: nvshmemx_get_uniqueid failed (status " + std::to_string(status) +
           "); set NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME to a reachable network interface";
  static_assert(sizeof(id) == kUniqueIdBytes, "unexpected nvshmemx_uniqueid_t size");
  id_out->assign(reinterpret_cast<const char*>(&id), sizeof(id));
  return "";
}

std::string init(int device, int rank, int num_ranks, const std::string& unique_id) {
  std::lock_guard<std::mutex> lock(g_mu);
  if (g_initialized) {
    if (device != g_device || rank != nvshmem_my_pe() || num_ranks != nvshmem_n_pes())
      return "jax_ep.nvshmem: already initialised as PE " + std::to_string(nvshmem_my_pe()) +
             " of " + std::to_string(nvshmem_n_pes()) + " on CUDA device " +
             std::to_string(g_device) + "; finalize() first";
    return "";
  }
  if (unique_id.size() != kUniqueIdBytes)
    return "jax_ep.nvshmem: the unique id has " + std::to_string(unique_id.size()) +
           " bytes, expected " + std::to_string(kUniqueIdBytes);
  if (rank < 0 || num_ranks < 1 || rank >= num_ranks)
    return "jax_ep.nvshmem: bad rank " + std::to_string(rank) + " of " +
           std::to_string(num_ranks);
  if (nvshmemx_init_status() >= NVSHMEM_STATUS_IS_INITIALIZED)
    return "jax_ep.nvshmem: NVSHMEM is already initialised in this process by another "
           "library; jax_ep needs to initialise it itself";
  JAX_EP_CUDA_RETURN("cudaSetDevice", cudaSetDevice(device));
  JAX_EP_CUDA_RETURN("cudaFree(0) (creating the CUDA context)", cudaFree(nullptr));

  nvshmemx_uniqueid_t id;
  std::memcpy(&id, unique_id.data(), sizeof(id));
  nvshmemx_init_attr_t attr = NVSHMEMX_INIT_ATTR_INITIALIZER;
  int status = nvshmemx_set_attr_uniqueid_args(rank, num_ranks, &id, &attr);
  if (status != 0)
    return "jax_ep.nvshmem: nvshmemx_set_attr_uniqueid_args failed (status " +
           std::to_string(status) + ")";
  // nvshmemx_init_attr() would exit() the process on failure; this is its body without
  // the exit, so Python gets an exception instead.
  nvshmemx_init_init_attr_ver_only(attr);
  int provided = 0;
  nvshmemi_version_t version = {NVSHMEM_VENDOR_MAJOR_VERSION, NVSHMEM_VENDOR_MINOR_VERSION,
                                NVSHMEM_VENDOR_PATCH_VERSION};
  status = nvshmemi_init_thread(NVSHMEM_THREAD_SERIALIZED, &provided,
                                NVSHMEMX_INIT_WITH_UNIQUEID, &attr, version);
  if (status != 0)
    return "jax_ep.nvshmem: NVSHMEM initialisation failed (status " + std::to_string(status) +
           ", PE " + std::to_string(rank) + " of " + std::to_string(num_ranks) +
           "); run with NVSHMEM_DEBUG=INFO for details";
  if (nvshmem_my_pe() != rank || nvshmem_n_pes() != num_ranks) {
    std::string err = "jax_ep.nvshmem: NVSHMEM came up as PE " +
                      std::to_string(nvshmem_my_pe()) + " of " +
                      std::to_string(nvshmem_n_pes()) + ", expected " + std::to_string(rank) +
                      " of " + std::to_string(num_ranks);
    nvshmem_finalize();
    return err;
  }
  g_initialized = true;
  g_device = device;
  return "";
}

std::string finalize() {
  std::lock_guard<std::mutex> lock(g_mu);
  if (!g_initialized) return "";
  JAX_EP_CUDA_RETURN("cudaSetDevice", cudaSetDevice(g_device));
  for (uintptr_t p : g_live) nvshmem_free(reinterpret_cast<void*>(p));  // collective, in order
  g_live.clear();
  nvshmem_finalize();
  g_initialized = false;
  g_device = -1;
  return "";
}

Info info() {
  std::lock_guard<std::mutex> lock(g_mu);
  Info out;
  out.initialized = g_initialized;
  out.version_major = NVSHMEM_VENDOR_MAJOR_VERSION;
  out.version_minor = NVSHMEM_VENDOR_MINOR_VERSION;
  out.version_patch = NVSHMEM_VENDOR_PATCH_VERSION;
  if (g_initialized) {
    out.pe = nvshmem_my_pe();
    out.num_pes = nvshmem_n_pes();
    out.device = g_device;
  }
  return out;
}

std::string symmetric_alloc(size_t num_bytes, uintptr_t* ptr_out) {
  std::lock_guard<std::mutex> lock(g_mu);
  if (!g_initialized) return not_initialized("symmetric_alloc");
  if (num_bytes == 0) return "jax_ep.nvshmem: symmetric_alloc needs num_bytes > 0";
  JAX_EP_CUDA_RETURN("cudaSetDevice", cudaSetDevice(g_device));
  void* p = nvshmem_malloc(num_bytes);
  if (p == nullptr) {
    size_t free_b = 0, total_b = 0;
    cudaMemGetInfo(&free_b, &total_b);
    return "jax_ep.nvshmem: nvshmem_malloc(" + std::to_string(num_bytes) +
           ") failed on PE " + std::to_string(nvshmem_my_pe()) + " (GPU has " +
           std::to_string(free_b >> 20) + " MiB free). The symmetric heap is limited by "
           "NVSHMEM_SYMMETRIC_SIZE (default 1 GiB; set it before initialize()), and by the "
           "GPU memory XLA leaves free (XLA_PYTHON_CLIENT_MEM_FRACTION)";
  }
  *ptr_out = reinterpret_cast<uintptr_t>(p);
  g_live.insert(*ptr_out);
  return "";
}

std::string symmetric_free(uintptr_t ptr) {
  std::lock_guard<std::mutex> lock(g_mu);
  if (!g_initialized) return not_initialized("symmetric_free");
  if (g_live.erase(ptr) == 0)
    return "jax_ep.nvshmem: symmetric_free got a pointer that symmetric_alloc did not return "
           "(or that was already freed)";
  JAX_EP_CUDA_RETURN("cudaSetDevice", cudaSetDevice(g_device));
  nvshmem_free(reinterpret_cast<void*>(ptr));
  return "";
}

std::string peer_pointer(uintptr_t ptr, int pe, uintptr_t* out) {
  std::lock_guard<std::mutex> lock(g_mu);
  if (!g_initialized) return not_initialized("peer_pointer");
  if (pe < 0 || pe >= nvshmem_n_pes())
    return "jax_ep.nvshmem: peer_pointer: PE " + std::to_string(pe) + " out of range";
  JAX_EP_CUDA_RETURN("cudaSetDevice", cudaSetDevice(g_device));
  *out = reinterpret_cast<uintptr_t>(nvshmem_ptr(reinterpret_cast<void*>(ptr), pe));
  return "";
}

size_t num_live_allocations() {
  std::lock_guard<std::mutex> lock(g_mu);
  return g_live.size();
}

std::string ring_test(size_t num_bytes, int iterations, RingResult* result) {
  std::lock_guard<std::mutex> lock(g_mu);
  if (!g_initialized) return not_initialized("ring_test");
  if (num_bytes == 0 || iterations < 1)
    return "jax_ep.nvshmem: ring_test needs num_bytes > 0 and iterations >= 1";
  JAX_EP_CUDA_RETURN("cudaSetDevice", cudaSetDevice(g_device));
  const int me = nvshmem_my_pe(), npes = nvshmem_n_pes();

  // Collective allocations (every PE, same order): data, then signal + id.
  auto* sym = static_cast<uint8_t*>(nvshmem_malloc(2 * num_bytes));
  auto* flags = static_cast<uint64_t*>(nvshmem_malloc(2 * sizeof(uint64_t)));
  if (sym == nullptr || flags == nullptr)
    return "jax_ep.nvshmem: ring_test could not allocate " + std::to_string(2 * num_bytes) +
           " symmetric bytes (NVSHMEM_SYMMETRIC_SIZE)";
  uint64_t* sig = flags;
  int* id = reinterpret_cast<int*>(flags + 1);
  result->peer_is_p2p = nvshmem_ptr(sym, (me + 1) % npes) != nullptr;

  std::string err;
  cudaStream_t stream = nullptr;
  unsigned long long* counters = nullptr;
  unsigned long long host_counters[2] = {0, 0};
  cudaError_t e = cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
  if (e == cudaSuccess) e = cudaMalloc(&counters, sizeof(host_counters));
  if (e == cudaSuccess) e = cudaMemsetAsync(counters, 0, sizeof(host_counters), stream);
  if (e == cudaSuccess) e = cudaMemsetAsync(flags, 0, 2 * sizeof(uint64_t), stream);
  if (e == cudaSuccess) e = cudaMemsetAsync(id, 0xff, sizeof(int), stream);
  if (e == cudaSuccess) {
    // Every PE's flags are zero before anyone puts; rounds are separated by barriers, so a
    // PE never overwrites a receive buffer its neighbour is still checking.
    nvshmemx_barrier_all_on_stream(stream);
    for (int r = 1; r <= iterations && e == cudaSuccess; ++r) {
      kRingKernel<<<1, kRingThreads, 0, stream>>>(sym, sig, id, num_bytes, uint64_t(r),
                                                  counters, counters + 1);
      e = cudaGetLastError();
      if (e == cudaSuccess) nvshmemx_barrier_all_on_stream(stream);
    }
  }
  if (e == cudaSuccess)
    e = cudaMemcpyAsync(host_counters, counters, sizeof(host_counters), cudaMemcpyDeviceToHost,
                        stream);
  if (e == cudaSuccess) e = cudaStreamSynchronize(stream);
  if (e != cudaSuccess) err = cuda_error("ring_test", e);
  if (counters) cudaFree(counters);
  if (stream) cudaStreamDestroy(stream);
  // Collective frees; after a CUDA error the other PEs may be stuck, but skipping these
  // would leave every healthy PE waiting in its own nvshmem_free instead.
  nvshmem_free(flags);
  nvshmem_free(sym);
  result->mismatched_bytes = int64_t(host_counters[0]);
  result->bad_ids = int64_t(host_counters[1]);
  result->ok = err.empty() && host_counters[0] == 0 && host_counters[1] == 0;
  return err;
}

}  // namespace jax_ep::nvshmem
