#include "xla_ffi/buffer_registry.h"

#include <cuda_runtime.h>
#include <unistd.h>

#include <cstring>
#include <functional>
#include <map>
#include <mutex>
#include <utility>

namespace jax_ep {
namespace {

std::mutex g_mutex;
std::map<std::pair<int64_t, int>, BufferState> g_buffers;  // (id, device) -> state

std::string cuda_error(const std::string& what, int device, cudaError_t err) {
  return std::string("jax_ep.Buffer: ") + what + " on GPU " + std::to_string(device) +
         " failed: " + cudaGetErrorString(err);
}

// Restores the calling thread's current device on scope exit.
struct DeviceGuard {
  int saved = 0;
  DeviceGuard() { cudaGetDevice(&saved); }
  ~DeviceGuard() { cudaSetDevice(saved); }
};

// ---------------------------------------------------------------- multi-process state
// What one process tells its peers about its GPU (travels as bytes through the
// jax.distributed key-value store, so it is plain data).
constexpr uint64_t kBlobMagic = 0x32305f70655f786aull;  // "jx_ep_02"
struct IpcBlob {
  uint64_t magic;
  int64_t pid;
  uint64_t host;  // hash of the host name: pid alone does not identify a process
  int32_t device;
  int32_t pad;
  uint64_t num_bytes;
  uint64_t staging_bytes;
  uint64_t comm_ptr;     // the buffer, in the exporter's address space
  uint64_t staging_ptr;  // its staging area, likewise
  cudaIpcMemHandle_t comm_handle;
  cudaIpcMemHandle_t staging_handle;
};

struct Exported {
  char* ptr = nullptr;
  char* staging = nullptr;
  size_t num_bytes = 0, staging_bytes = 0;
};

std::map<std::pair<int64_t, int>, Exported> g_exported;
std::map<std::pair<int64_t, int>, std::vector<char*>> g_mappings;  // IPC-opened peers

uint64_t host_hash() {
  char name[256] = {};
  gethostname(name, sizeof(name) - 1);
  return std::hash<std::string>{}(name);
}

// Current device = the importing device.
void close_mappings(std::vector<char*>& opened) {
  for (char* c : opened) cudaIpcCloseMemHandle(c);
  opened.clear();
  cudaGetLastError();
}

}  // namespace

std::string create_buffer(int64_t buffer_id, const std::vector<int>& devices, size_t num_bytes) {
  const int n = int(devices.size());
  if (n < 1 || n > kMaxRanks)
    return "jax_ep.Buffer: the EP group must have 1 to " + std::to_string(kMaxRanks) +
           " GPUs of this process, got " + std::to_string(n);
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    for (int d : devices)
      if (g_buffers.count({buffer_id, d}))
        return "jax_ep.Buffer: buffer id " + std::to_string(buffer_id) + " already exists";
  }
  DeviceGuard guard;
  std::vector<char*> ptrs(n, nullptr);
  auto fail = [&](std::string msg) {
    for (int i = 0; i < n; ++i)
      if (ptrs[i]) { cudaSetDevice(devices[i]); cudaFree(ptrs[i]); }
    return msg;
  };
  for (int i = 0; i < n; ++i) {
    cudaError_t err = cudaSetDevice(devices[i]);
    if (err != cudaSuccess) return fail(cuda_error("cudaSetDevice", devices[i], err));
    err = cudaMalloc(&ptrs[i], num_bytes);
    if (err != cudaSuccess) {
      ptrs[i] = nullptr;
      size_t free_b = 0, total_b = 0;
      cudaGetLastError();
      cudaMemGetInfo(&free_b, &total_b);
      return fail(cuda_error("allocating " + std::to_string(num_bytes) + " bytes", devices[i], err) +
                  " (" + std::to_string(free_b) + " bytes free outside XLA's pool; lower "
                  "XLA_PYTHON_CLIENT_MEM_FRACTION or num_nvl_bytes)");
    }
    // Zero state: sequence numbers start at 0 on every rank.
    err = cudaMemset(ptrs[i], 0, num_bytes);
    if (err != cudaSuccess) return fail(cuda_error("cudaMemset", devices[i], err));
  }
  for (int i = 0; i < n; ++i) {
    cudaSetDevice(devices[i]);
    for (int j = 0; j < n; ++j) {
      if (i == j) continue;
      int can = 0;
      cudaDeviceCanAccessPeer(&can, devices[i], devices[j]);
      if (!can)
        return fail("jax_ep.Buffer: GPU " + std::to_string(devices[i]) + " cannot access GPU " +
                    std::to_string(devices[j]) + " directly (no NVLink/P2P); the intranode "
                    "kernels need peer access between every pair of the EP group");
      cudaError_t err = cudaDeviceEnablePeerAccess(devices[j], 0);
      if (err == cudaErrorPeerAccessAlreadyEnabled) cudaGetLastError();  // XLA enabled it
      else if (err != cudaSuccess) return fail(cuda_error("enabling peer access", devices[i], err));
    }
    cudaError_t err = cudaDeviceSynchronize();
    if (err != cudaSuccess) return fail(cuda_error("cudaDeviceSynchronize", devices[i], err));
  }
  std::lock_guard<std::mutex> lock(g_mutex);
  for (int i = 0; i < n; ++i) {
    BufferState s;
    s.rank = i;
    s.num_ranks = n;
    s.device = devices[i];
    s.num_bytes = num_bytes;
    for (int j = 0; j < n; ++j) s.peers[j] = ptrs[j];
    g_buffers[{buffer_id, devices[i]}] = s;
  }
  return "";
}

std::string export_buffer(int64_t buffer_id, int device, size_t num_bytes,
                          size_t staging_bytes, std::string* blob) {
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    if (g_buffers.count({buffer_id, device}) || g_exported.count({buffer_id, device}))
      return "jax_ep.Buffer: buffer id " + std::to_string(buffer_id) + " already exists";
  }
  DeviceGuard guard;
  cudaError_t err = cudaSetDevice(device);
  if (err != cudaSuccess) return cuda_error("cudaSetDevice", device, err);
  IpcBlob b{};
  b.magic = kBlobMagic;
  b.pid = int64_t(getpid());
  b.host = host_hash();
  b.device = device;
  b.num_bytes = num_bytes;
  b.staging_bytes = staging_bytes;
  char* ptr = nullptr;
  char* staging = nullptr;
  auto fail = [&](const std::string& what, cudaError_t e) {
    if (ptr) cudaFree(ptr);
    if (staging) cudaFree(staging);
    cudaGetLastError();
    return cuda_error(what, device, e);
  };
  err = cudaMalloc(&ptr, num_bytes);
  if (err != cudaSuccess) {
    ptr = nullptr;
    return fail("allocating " + std::to_string(num_bytes) + " bytes", err) +
           " (lower XLA_PYTHON_CLIENT_MEM_FRACTION or num_nvl_bytes)";
  }
  err = cudaMalloc(&staging, staging_bytes);
  if (err != cudaSuccess) {
    staging = nullptr;
    return fail("allocating the " + std::to_string(staging_bytes) + "-byte staging area", err) +
           " (lower XLA_PYTHON_CLIENT_MEM_FRACTION or num_staging_bytes)";
  }
  err = cudaMemset(ptr, 0, num_bytes);  // sequence numbers start at 0 on every rank
  if (err == cudaSuccess) err = cudaDeviceSynchronize();
  if (err != cudaSuccess) return fail("clearing the buffer", err);
  err = cudaIpcGetMemHandle(&b.comm_handle, ptr);
  if (err == cudaSuccess) err = cudaIpcGetMemHandle(&b.staging_handle, staging);
  if (err != cudaSuccess) return fail("exporting the buffer (IPC)", err);
  b.comm_ptr = reinterpret_cast<uint64_t>(ptr);
  b.staging_ptr = reinterpret_cast<uint64_t>(staging);
  blob->assign(reinterpret_cast<const char*>(&b), sizeof(b));
  std::lock_guard<std::mutex> lock(g_mutex);
  g_exported[{buffer_id, device}] = Exported{ptr, staging, num_bytes, staging_bytes};
  return "";
}

std::string import_peers(int64_t buffer_id, int device, int rank,
                         const std::vector<std::string>& blobs) {
  const int n = int(blobs.size());
  if (n < 1 || n > kMaxRanks)
    return "jax_ep.Buffer: the EP group must have 1 to " + std::to_string(kMaxRanks) +
           " GPUs, got " + std::to_string(n);
  if (rank < 0 || rank >= n) return "jax_ep.Buffer: rank out of range";
  std::vector<IpcBlob> b(n);
  for (int r = 0; r < n; ++r) {
    if (blobs[r].size() != sizeof(IpcBlob))
      return "jax_ep.Buffer: rank " + std::to_string(r) + " sent a malformed buffer export (" +
             std::to_string(blobs[r].size()) + " bytes); are all processes running the same "
             "jax_ep build?";
    std::memcpy(&b[r], blobs[r].data(), sizeof(IpcBlob));
    if (b[r].magic != kBlobMagic)
      return "jax_ep.Buffer: rank " + std::to_string(r) + " sent an export of another jax_ep "
             "version";
  }
  for (int r = 0; r < n; ++r) {  // every blob is decoded now
    if (b[r].num_bytes != b[rank].num_bytes)
      return "jax_ep.Buffer: ranks disagree on num_nvl_bytes (" +
             std::to_string(b[r].num_bytes) + " on rank " + std::to_string(r) + " vs " +
             std::to_string(b[rank].num_bytes) + " here); pass the same value everywhere";
  }
  DeviceGuard guard;
  cudaError_t err = cudaSetDevice(device);
  if (err != cudaSuccess) return cuda_error("cudaSetDevice", device, err);
  const int64_t my_pid = int64_t(getpid());
  const uint64_t my_host = host_hash();

  std::lock_guard<std::mutex> lock(g_mutex);
  auto ex = g_exported.find({buffer_id, device});
  if (ex == g_exported.end())
    return "jax_ep.Buffer: import_peers before export_buffer for id " + std::to_string(buffer_id);
  BufferState s;
  s.rank = rank;
  s.num_ranks = n;
  s.device = device;
  s.num_bytes = ex->second.num_bytes;
  s.multi_process = true;
  s.staging = ex->second.staging;
  s.staging_bytes = ex->second.staging_bytes;
  std::vector<char*> opened;
  auto open = [&](const cudaIpcMemHandle_t& h, int r, const char* what, char** out) {
    void* m = nullptr;
    cudaError_t e = cudaIpcOpenMemHandle(&m, h, cudaIpcMemLazyEnablePeerAccess);
    if (e != cudaSuccess) {
      cudaGetLastError();
      close_mappings(opened);
      return cuda_error(std::string("opening the ") + what + " of EP rank " + std::to_string(r) +
                        " (IPC; is there NVLink/P2P between the GPUs?)", device, e);
    }
    opened.push_back(static_cast<char*>(m));
    *out = static_cast<char*>(m);
    return std::string();
  };
  for (int r = 0; r < n; ++r) {
    if (r == rank) {
      s.peers[r] = ex->second.ptr;
      continue;
    }
    if (b[r].host != my_host) {
      close_mappings(opened);
      return "jax_ep.Buffer: EP rank " + std::to_string(r) + " is on another host; the "
             "intranode kernels need every rank of the EP group in one NVLink domain";
    }
    if (b[r].pid == my_pid) {  // a GPU of this process: plain peer access
      s.peers[r] = reinterpret_cast<char*>(b[r].comm_ptr);
      err = cudaDeviceEnablePeerAccess(b[r].device, 0);
      if (err == cudaErrorPeerAccessAlreadyEnabled) err = cudaSuccess;
      cudaGetLastError();
      if (err != cudaSuccess) {
        close_mappings(opened);
        return cuda_error("enabling peer access to GPU " + std::to_string(b[r].device), device,
                          err);
      }
      continue;  // same address space: ptr_delta stays 0
    }
    std::string why = open(b[r].comm_handle, r, "buffer", &s.peers[r]);
    if (!why.empty()) return why;
    char* staging = nullptr;
    why = open(b[r].staging_handle, r, "staging area", &staging);
    if (!why.empty()) return why;
    s.ptr_delta[r] = int64_t(reinterpret_cast<uint64_t>(staging) - b[r].staging_ptr);
  }
  g_mappings[{buffer_id, device}] = std::move(opened);
  g_buffers[{buffer_id, device}] = s;
  return "";
}

void unmap_peers(int64_t buffer_id) {
  DeviceGuard guard;
  std::lock_guard<std::mutex> lock(g_mutex);
  for (auto it = g_mappings.begin(); it != g_mappings.end();) {
    if (it->first.first != buffer_id) { ++it; continue; }
    cudaSetDevice(it->first.second);
    cudaDeviceSynchronize();  // our kernels may still read peers' memory
    close_mappings(it->second);
    it = g_mappings.erase(it);
  }
}

void destroy_buffer(int64_t buffer_id) {
  unmap_peers(buffer_id);  // no-op in one process, or when the caller already did it
  std::vector<BufferState> gone;
  std::vector<std::pair<int, Exported>> exported;
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    for (auto it = g_buffers.begin(); it != g_buffers.end();) {
      if (it->first.first == buffer_id) {
        gone.push_back(it->second);
        it = g_buffers.erase(it);
      } else {
        ++it;
      }
    }
    for (auto it = g_exported.begin(); it != g_exported.end();) {
      if (it->first.first == buffer_id) {
        exported.push_back({it->first.second, it->second});
        it = g_exported.erase(it);
      } else {
        ++it;
      }
    }
  }
  DeviceGuard guard;
  for (const BufferState& s : gone) {  // every peer may still be reading: drain all first
    cudaSetDevice(s.device);
    cudaDeviceSynchronize();
  }
  for (const BufferState& s : gone) {
    if (s.multi_process) continue;  // freed below, from the export record
    cudaSetDevice(s.device);
    cudaFree(s.peers[s.rank]);
  }
  for (const auto& e : exported) {
    cudaSetDevice(e.first);
    cudaDeviceSynchronize();
    cudaFree(e.second.ptr);
    cudaFree(e.second.staging);
  }
}

const BufferState* find_buffer(int64_t buffer_id, int device) {
  std::lock_guard<std::mutex> lock(g_mutex);
  auto it = g_buffers.find({buffer_id, device});
  return it == g_buffers.end() ? nullptr : &it->second;
}

}  // namespace jax_ep
