// The registry of low-latency regions over several nodes (low_latency_registry.h).
#include "xla_ffi/low_latency_registry.h"

#include <cuda_runtime.h>

#include <map>
#include <mutex>
#include <utility>

namespace jax_ep {
namespace {

std::mutex g_mutex;
std::map<std::pair<int64_t, int>, LLEndpoint> g_regions;  // (id, device) -> region

}  // namespace

std::string register_ll_symmetric(int64_t buffer_id, int device, int rank,
                                  const std::vector<uint64_t>& regions,
                                  const std::vector<int>& pes, size_t num_bytes,
                                  const LLLaunchers* launchers) {
  const int R = int(regions.size());
  const std::string where = "jax_ep.Buffer (low-latency region over several nodes): ";
  if (R < 1 || R > kLLMaxRanks)
    return where + "1 to " + std::to_string(kLLMaxRanks) + " ranks, got " + std::to_string(R);
  if (int(pes.size()) != R || rank < 0 || rank >= R || regions[rank] == 0)
    return where + "bad rank, PEs or own region";
  if (launchers == nullptr || launchers->dispatch == nullptr || launchers->combine == nullptr)
    return where + "no launchers (jax_ep._jax_ep_nvshmem.ll_launchers())";
  if (ll_symmetric_half_bytes(num_bytes) == 0) return where + "region too small";
  LLEndpoint s;
  s.rank = rank;
  s.num_ranks = R;
  s.num_bytes = num_bytes;
  s.half_bytes = ll_symmetric_half_bytes(num_bytes);
  s.symmetric = true;
  s.launchers = launchers;
  for (int r = 0; r < R; ++r) {
    s.peers.region[r] = reinterpret_cast<char*>(regions[r]);
    s.peers.pe[r] = pes[r];
    if (regions[r] == 0) s.peers.remote |= 1ull << r;
  }
  int saved = 0;
  if (cudaGetDevice(&saved) != cudaSuccess) saved = device;
  cudaError_t err = cudaSetDevice(device);
  if (err == cudaSuccess) err = cudaMemset(s.peers.region[rank], 0, kLLHalvesOffset);
  if (err == cudaSuccess) err = cudaDeviceSynchronize();
  cudaSetDevice(saved);
  if (err != cudaSuccess)
    return where + "clearing the header failed: " + cudaGetErrorString(err);
  std::lock_guard<std::mutex> lock(g_mutex);
  g_regions[{buffer_id, device}] = s;
  return "";
}

void unregister_ll_symmetric(int64_t buffer_id) {
  std::vector<int> devices;
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    for (auto it = g_regions.begin(); it != g_regions.end();) {
      if (it->first.first == buffer_id) {
        devices.push_back(it->first.second);
        it = g_regions.erase(it);
      } else {
        ++it;
      }
    }
  }
  int saved = 0;
  if (cudaGetDevice(&saved) != cudaSuccess) saved = 0;
  for (int d : devices)  // no op of this buffer may still run when its memory is freed
    if (cudaSetDevice(d) == cudaSuccess) cudaDeviceSynchronize();
  cudaSetDevice(saved);
  cudaGetLastError();
}

const LLEndpoint* find_ll_symmetric(int64_t buffer_id, int device) {
  std::lock_guard<std::mutex> lock(g_mutex);
  auto it = g_regions.find({buffer_id, device});
  return it == g_regions.end() ? nullptr : &it->second;
}

}  // namespace jax_ep
