#include "xla_ffi/buffer_registry.h"

#include <cuda_runtime.h>

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

void destroy_buffer(int64_t buffer_id) {
  std::vector<BufferState> gone;
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
  }
  DeviceGuard guard;
  for (const BufferState& s : gone) {  // every peer may still be reading: drain all first
    cudaSetDevice(s.device);
    cudaDeviceSynchronize();
  }
  for (const BufferState& s : gone) {
    cudaSetDevice(s.device);
    cudaFree(s.peers[s.rank]);
  }
}

const BufferState* find_buffer(int64_t buffer_id, int device) {
  std::lock_guard<std::mutex> lock(g_mutex);
  auto it = g_buffers.find({buffer_id, device});
  return it == g_buffers.end() ? nullptr : &it->second;
}

}  // namespace jax_ep
