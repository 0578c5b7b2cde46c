// Launch policy of the low-latency kernels, for the kernel tables of either transport
// (launch.cu: NVLink stores; launch_nvshmem.cu: stores and NVSHMEM puts): grid sizes,
// dynamic shared memory, and the choice between one cooperative launch of both phases
// (fused ops, when the whole grid can be co-resident) and one launch per phase.
#pragma once

#include <cuda_runtime.h>

#include <map>
#include <mutex>
#include <tuple>
#include <utility>

#include "cuda/low_latency/kernels.h"

namespace jax_ep {
namespace ll_launch {

inline int clamp_grid(int work, int num_blocks) {
  int g = work < num_blocks ? work : num_blocks;
  return g < 1 ? 1 : g;
}

// Blocks of `kernel` that can all be resident at once on the current GPU (0 when the GPU
// has no cooperative launch). Cached: the handlers run once per op and GPU.
template <typename Args>
int max_coresident(void (*kernel)(Args, int), int threads, size_t smem) {
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  static std::mutex mu;
  static std::map<std::tuple<int, const void*, int, size_t>, int> cache;
  const auto key = std::make_tuple(device, reinterpret_cast<const void*>(kernel), threads, smem);
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = cache.find(key);
    if (it != cache.end()) return it->second;
  }
  int coop = 0, sms = 0, per_sm = 0, result = 0;
  if (cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, device) == cudaSuccess &&
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) == cudaSuccess &&
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem) ==
          cudaSuccess &&
      coop)
    result = per_sm * sms;
  cudaGetLastError();  // a failed query must not look like a failed launch later
  std::lock_guard<std::mutex> lock(mu);
  cache[key] = result;
  return result;
}

template <typename Args>
cudaError_t launch_one(void (*kernel)(Args, int), const Args& a, int phases, int grid,
                       size_t smem, bool cooperative, cudaStream_t stream) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(unsigned(grid));
  cfg.blockDim = dim3(unsigned(a.num_threads));
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeCooperative;
  attr[0].val.cooperative = 1;
  cfg.attrs = cooperative ? attr : nullptr;
  cfg.numAttrs = cooperative ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, kernel, a, phases);
}

// cudaFuncSetAttribute(MaxDynamicSharedMemorySize) once per (device, kernel) and size: a
// host-side cost that every launch would otherwise pay.
template <typename Args>
cudaError_t ensure_smem(void (*kernel)(Args, int), size_t smem) {
  if (smem <= 48 * 1024) return cudaSuccess;
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  static std::mutex mu;
  static std::map<std::pair<int, const void*>, size_t> done;
  const auto key = std::make_pair(device, reinterpret_cast<const void*>(kernel));
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = done.find(key);
    if (it != done.end() && it->second >= smem) return cudaSuccess;
  }
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  if (err != cudaSuccess) return err;
  std::lock_guard<std::mutex> lock(mu);
  size_t& v = done[key];
  if (v < smem) v = smem;
  return cudaSuccess;
}

// Runs `phases` of an op: both in one cooperative launch when it can hold a grid of
// co-resident blocks (then a block spinning in its recv phase can never keep a block of
// the same grid from sending), else one launch per phase.
template <typename Args>
cudaError_t run_phases(void (*kernel)(Args, int), const Args& a, int phases, int send_work,
                       int recv_work, size_t send_smem, cudaStream_t stream) {
  cudaError_t serr = ensure_smem(kernel, send_smem);
  if (serr != cudaSuccess) return serr;
  if (phases == kLLBoth) {
    const int cap = max_coresident(kernel, a.num_threads, send_smem);
    if (cap > 0) {
      int grid = clamp_grid(send_work > recv_work ? send_work : recv_work, a.num_blocks);
      if (grid > cap) grid = cap;
      if (launch_one(kernel, a, kLLBoth, grid, send_smem, true, stream) == cudaSuccess)
        return cudaSuccess;
      cudaGetLastError();  // not launched: fall back to two launches
    }
  }
  if (phases & kLLSend) {
    cudaError_t err = launch_one(kernel, a, kLLSend, clamp_grid(send_work, a.num_blocks),
                                 send_smem, false, stream);
    if (err != cudaSuccess) return err;
  }
  if (phases & kLLRecv)
    return launch_one(kernel, a, kLLRecv, clamp_grid(recv_work, a.num_blocks), 0, false, stream);
  return cudaSuccess;
}

}  // namespace ll_launch

inline cudaError_t launch_ll_dispatch_with(const LLDispatchKernel (&kernels)[3],
                                           const LLDispatchArgs& a, int phases,
                                           cudaStream_t stream) {
  const int type = int(a.x_type);
  if (type < 0 || type > 2) return cudaErrorInvalidValue;
  const int send_work = a.num_tokens > 0 ? a.num_tokens : 1;
  const size_t smem = (phases & kLLSend)
      ? align_up(ll_dispatch_row_stride(size_t(a.hidden),
                                        a.x_type == ElemType::kF32 ? 4 : 2, a.use_fp8), 16)
      : 0;
  return ll_launch::run_phases(kernels[type], a, phases, send_work, a.num_experts, smem, stream);
}

inline cudaError_t launch_ll_combine_with(const LLCombineKernel (&kernels)[3][3],
                                          const LLCombineArgs& a, int phases,
                                          cudaStream_t stream) {
  const int type = int(a.y_type);
  if (type < 0 || type > 2) return cudaErrorInvalidValue;
  // 16-byte vectors when every row (and so every vector) is 16-byte aligned.
  const size_t row_bytes = size_t(a.width) * (a.y_type == ElemType::kF32 ? 4 : 2);
  const int vec = row_bytes % 16 == 0 ? 0 : (row_bytes % 4 == 0 ? 1 : 2);
  return ll_launch::run_phases(kernels[type][vec], a, phases, a.num_experts,
                               a.num_tokens > 0 ? a.num_tokens : 1, 0, stream);
}

}  // namespace jax_ep
