// Intranode dispatch over NVLink.
//
// After the count exchange (notify.cu) every sender knows the exact row each of its
// tokens takes at every destination, so warps push rows straight into the receivers'
// output buffers (published peer pointers): one NVLink copy per (token, destination
// rank). In the expert layout a token with several experts on one rank is sent once,
// to its first row there; the receiver copies it into the other rows locally
// (dispatch_finalize_kernel), so no separate permute pass and no duplicate NVLink
// traffic. Receivers clear the rows nobody writes (XLA outputs start uninitialised) in
// the same local finalize kernel, which may use more SMs than the communication kernel.
#include "cuda/common/device_sync.cuh"
#include "cuda/common/fp8_cast.cuh"
#include "cuda/intranode/kernels.h"
#include "cuda/common/row_copy.cuh"
#include "cuda/common/tma.cuh"

namespace jax_ep {
namespace {

// One warp's double-buffered bulk-copy pipeline (driven by its lane 0).
struct RowPipe {
  uint64_t* bar;   // [2]
  char* stage[2];
  uint32_t phase;  // bit s: parity the next wait on stage s expects
  int item;

  // Copies `bytes` (multiple of 16) from src to dst[r] for every non-null dst[r].
  __device__ __forceinline__ void copy(const char* src, char* const (&dst)[kMaxRanks],
                                       int bytes) {
    for (int off = 0; off < bytes; off += kStageBytes) {
      const uint32_t n = uint32_t(min(kStageBytes, bytes - off));
      const int s = item & 1;
      ++item;
      bulk_wait_read<1>();  // the stores that last used this stage have read it
      tma_load(stage[s], src + off, n, &bar[s]);
      mbar_wait(&bar[s], (phase >> s) & 1u);
      phase ^= 1u << s;
#pragma unroll
      for (int r = 0; r < kMaxRanks; ++r)
        if (dst[r] != nullptr) tma_store(dst[r] + off, stage[s], n);
      bulk_commit();
    }
  }
};

// Casts bf16 row `src` (H channels, H % 128 == 0) to e4m3 values and f32 scales, per
// 128 channels: a lane casts 8 channels per step, a half-warp shares a scale, and
// kCastUnroll loads are in flight per lane before the first shuffle. Each result goes to
// put(j, values of lane, scale or nothing): vector j of the values (8 bytes). All lanes
// call loaded() once, after the first loads are in flight and before the first put.
constexpr int kCastUnroll = 8;

template <typename Put, typename Loaded>
__device__ __forceinline__ void warp_cast_row_fp8(const char* src, int H, int lane, Put put,
                                                  Loaded loaded) {
  const int n8 = H / 8;  // a multiple of 16
  const int4* s = reinterpret_cast<const int4*>(src);
  for (int j0 = 0; j0 < n8; j0 += 32 * kCastUnroll) {  // warp-uniform trip count
    int4 raw[kCastUnroll];
#pragma unroll
    for (int u = 0; u < kCastUnroll; ++u) {
      const int j = j0 + 32 * u + lane;
      raw[u] = j < n8 ? ld_nc_v4(s + j) : make_int4(0, 0, 0, 0);
    }
    if (j0 == 0) loaded();
#pragma unroll
    for (int u = 0; u < kCastUnroll; ++u) {
      if (j0 + 32 * u >= n8) break;  // warp-uniform: n8 is a multiple of 16, not of 32
      const int j = j0 + 32 * u + lane;
      float f[8], scale;
      bf16x8_to_f32(raw[u], f);
      const uint2 q = cast8_e4m3(f, &scale);
      if (j < n8) put(j, q, (lane & 15) == 0, scale);
    }
  }
}

// The cast row goes through the warp's stage (values, then scales) and leaves with one bulk
// store per destination and part: wide NVLink writes, where the lanes' own 8-byte value and
// 4-byte scale stores were slow. Needs H + H/32 <= stage bytes and (H/32) % 16 == 0.
__device__ __forceinline__ bool cast_fits_stage(int H, int stage_bytes) {
  return H + H / 32 <= stage_bytes && (H / 32) % 16 == 0;
}

__device__ __forceinline__ void warp_cast_row_fp8_staged(const char* src, int H, char* stage,
                                                         char* const (&dq)[kMaxRanks],
                                                         char* const (&ds)[kMaxRanks],
                                                         int lane) {
  float* scales = reinterpret_cast<float*>(stage + H);
  warp_cast_row_fp8(
      src, H, lane,
      [&](int j, uint2 q, bool has_scale, float scale) {
        reinterpret_cast<uint2*>(stage)[j] = q;
        if (has_scale) scales[j / 16] = scale;
      },
      [&] {  // while this row's first loads fly: the last row's stores have read the stage
        if (lane == 0) bulk_wait_read<0>();
        __syncwarp();
      });
  fence_smem_for_bulk();
  __syncwarp();
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < kMaxRanks; ++r) {
      if (dq[r] == nullptr) continue;
      tma_store(dq[r], stage, uint32_t(H));
      tma_store(ds[r], stage + H, uint32_t(H / 32));
    }
    bulk_commit();
  }
  __syncwarp();
}

// Published pointer slots of a dispatch (see launch_notify_dispatch's caller).
enum DispatchSlot { kRecvPayload0 = 0, kRecvPayload1, kRecvIdx, kRecvWeights, kSrcRank,
                    kSrcToken, kSrcSlot };

__device__ __forceinline__ void clear_row(const DispatchArgs& a, int row, int lane) {
  for (int p = 0; p < a.num_payloads; ++p)
    warp_zero_row(a.recv_payload[p] + size_t(row) * a.payload_row_bytes[p],
                  a.payload_row_bytes[p], lane);
  if (a.layout == Layout::kRank) {
    for (int k = lane; k < a.num_topk; k += 32) {
      a.recv_topk_idx[size_t(row) * a.num_topk + k] = -1;
      a.recv_topk_weights[size_t(row) * a.num_topk + k] = 0.f;
    }
  } else if (lane == 0) {
    a.recv_topk_idx[row] = -1;
    a.recv_topk_weights[row] = 0.f;
  }
  if (lane == 0) {
    a.recv_src_rank[row] = -1;
    a.recv_src_token[row] = -1;
    a.recv_src_slot[row] = -1;
  }
}

__global__ void __launch_bounds__(kDispatchThreads) intranode_dispatch_kernel(DispatchArgs a) {
  __shared__ uint64_t s_ptr[kMaxRanks][kMaxPublished];
  extern __shared__ __align__(128) char s_dyn[];
  char* local = a.peers.base[a.me];
  const Workspace* ws = workspace_of(local);
  const uint64_t seq = header_of(local)->seq;  // set by the notify kernel
  const int R = a.num_ranks, K = a.num_topk, E = a.num_experts, L = E / R;
  const int cap = a.capacity;
  const int lane = threadIdx.x & 31;
  const int warps = blockDim.x >> 5;
  const int gwarp = blockIdx.x * warps + (threadIdx.x >> 5);
  const int num_gwarps = gridDim.x * warps;
  const int warp = threadIdx.x >> 5;
  RowPipe pipe;
  pipe.bar = reinterpret_cast<uint64_t*>(s_dyn) + 2 * warp;
  pipe.stage[0] = s_dyn + kBarrierBytes + size_t(warp) * 2 * kStageBytes;
  pipe.stage[1] = pipe.stage[0] + kStageBytes;
  pipe.phase = 0;
  pipe.item = 0;
  if (lane == 0) {
    mbar_init(&pipe.bar[0]);
    mbar_init(&pipe.bar[1]);
  }
  __syncwarp();

  // Sender: push every token to each rank that holds one of its experts.
  load_peer_pointers(a.peers, a.me, R, seq, kSrcSlot + 1, s_ptr, "dispatch");
  for (int t = gwarp; t < a.num_tokens; t += num_gwarps) {
    int e = -1, d = -1;
    float w = 0.f;
    if (lane < K) {
      e = a.topk_idx[size_t(t) * K + lane];
      w = a.topk_weights[size_t(t) * K + lane];
      d = (e >= 0 && e < E) ? e / L : -1;
    }
    int dest_row[kMaxRanks];
    if (a.layout == Layout::kRank) {
      int row = -1;
      if (lane < R) {
        const int pos = a.send_pos[size_t(t) * R + lane];
        row = pos >= 0 ? ws->send_base[lane] + pos : -1;
        if (row >= cap) row = -1;  // dropped: over capacity at the destination
        a.send_pos[size_t(t) * R + lane] = row;
      }
#pragma unroll
      for (int r = 0; r < kMaxRanks; ++r) {
        dest_row[r] = r < R ? __shfl_sync(0xffffffffu, row, r) : -1;
        if (dest_row[r] < 0) continue;
        const size_t rr = size_t(dest_row[r]);
        int* idx = reinterpret_cast<int*>(s_ptr[r][kRecvIdx]);
        float* wts = reinterpret_cast<float*>(s_ptr[r][kRecvWeights]);
        if (lane < K) {
          idx[rr * K + lane] = d == r ? e - r * L : -1;
          wts[rr * K + lane] = d == r ? w : 0.f;
        }
        if (lane == 0) {
          reinterpret_cast<int*>(s_ptr[r][kSrcRank])[rr] = a.me;
          reinterpret_cast<int*>(s_ptr[r][kSrcToken])[rr] = t;
          reinterpret_cast<int*>(s_ptr[r][kSrcSlot])[rr] = -1;
        }
      }
    } else {
      int row = -1;
      if (lane < K) {
        const int pos = a.send_pos[size_t(t) * K + lane];
        row = d >= 0 ? ws->send_base[e] + pos : -1;
        if (row >= cap) row = -1;
        a.send_pos[size_t(t) * K + lane] = row;
      }
#pragma unroll
      for (int r = 0; r < kMaxRanks; ++r) {
        const bool mine = row >= 0 && d == r;
        const unsigned m = __ballot_sync(0xffffffffu, mine);
        dest_row[r] = -1;
        if (m == 0u) continue;
        const int first = __ffs(m) - 1;  // the slot whose row carries the payload
        dest_row[r] = __shfl_sync(0xffffffffu, row, first);
        if (mine) {
          reinterpret_cast<int*>(s_ptr[r][kRecvIdx])[row] = e - r * L;
          reinterpret_cast<float*>(s_ptr[r][kRecvWeights])[row] = w;
          reinterpret_cast<int*>(s_ptr[r][kSrcRank])[row] = a.me;
          reinterpret_cast<int*>(s_ptr[r][kSrcToken])[row] = t;
          reinterpret_cast<int*>(s_ptr[r][kSrcSlot])[row] = lane;
          dup_src_of(a.peers.base[r])[row] = lane == first ? -1 : dest_row[r];
        }
      }
    }
    if (a.cast_fp8_hidden > 0) {
      char* dq[kMaxRanks];
      char* ds[kMaxRanks];
#pragma unroll
      for (int r = 0; r < kMaxRanks; ++r) {
        const bool to_r = dest_row[r] >= 0;
        const size_t row = size_t(to_r ? dest_row[r] : 0);
        dq[r] = to_r ? reinterpret_cast<char*>(s_ptr[r][kRecvPayload0]) +
                           row * a.payload_row_bytes[0] : nullptr;
        ds[r] = to_r ? reinterpret_cast<char*>(s_ptr[r][kRecvPayload1]) +
                           row * a.payload_row_bytes[1] : nullptr;
      }
      const char* src = a.payload[0] + size_t(t) * a.cast_fp8_hidden * 2;
      // the warp's two stages are adjacent: one 2 * kStageBytes area for the cast row
      if (cast_fits_stage(a.cast_fp8_hidden, 2 * kStageBytes)) {
        warp_cast_row_fp8_staged(src, a.cast_fp8_hidden, pipe.stage[0], dq, ds, lane);
      } else {  // direct stores from the lanes
        warp_cast_row_fp8(
            src, a.cast_fp8_hidden, lane,
            [&](int j, uint2 q, bool has_scale, float scale) {
#pragma unroll
              for (int r = 0; r < kMaxRanks; ++r) {
                if (dq[r] == nullptr) continue;
                reinterpret_cast<uint2*>(dq[r])[j] = q;
                if (has_scale) reinterpret_cast<float*>(ds[r])[j / 16] = scale;
              }
            },
            [] {});
      }
      continue;
    }
    for (int p = 0; p < a.num_payloads; ++p) {
      const int rb = a.payload_row_bytes[p];
      char* dst[kMaxRanks];
#pragma unroll
      for (int r = 0; r < kMaxRanks; ++r)
        dst[r] = dest_row[r] >= 0
                     ? reinterpret_cast<char*>(s_ptr[r][kRecvPayload0 + p]) + size_t(dest_row[r]) * rb
                     : nullptr;
      if ((rb & 15) == 0 && rb >= a.min_bulk_row_bytes) {  // bulk copies need 16-byte sizes
        if (lane == 0) pipe.copy(a.payload[p] + size_t(t) * rb, dst, rb);
        __syncwarp();
      } else {
        warp_copy_row(a.payload[p] + size_t(t) * rb, dst, rb, lane);
      }
    }
  }
  if (lane == 0) bulk_wait_all();  // rows written before we tell the receivers
  finish_op(a.peers, a.me, R, "dispatch");
}

// After every row landed: rank layout counts the (row, slot) pairs per local expert;
// expert layout copies each token's payload into its further rows on this rank.
// Local work, so it may use more SMs than the communication kernels.
__global__ void __launch_bounds__(kDispatchThreads) dispatch_finalize_kernel(DispatchArgs a) {
  char* local = a.peers.base[a.me];
  const Workspace* ws = workspace_of(local);
  const int used = ws->used_rows;
  const int lane = threadIdx.x & 31;
  const int L = a.num_experts / a.num_ranks;
  const int gwarp = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  const int num_gwarps = gridDim.x * (blockDim.x >> 5);

  // Clear the rows no sender writes (XLA outputs start uninitialised): rows past the
  // count and, in the expert layout, each group's alignment padding.
  for (int row = used + gwarp; row < a.capacity; row += num_gwarps) clear_row(a, row, lane);
  if (a.layout == Layout::kExpert) {
    for (int l = gwarp; l < L; l += num_gwarps) {
      const int next = l + 1 < L ? min(ws->group_start[l + 1], used) : used;
      for (int row = ws->group_start[l] + ws->group_count[l]; row < next; ++row)
        clear_row(a, row, lane);
    }
  }

  if (a.layout == Layout::kRank) {
    extern __shared__ int s_hist[];
    for (int l = threadIdx.x; l < L; l += blockDim.x) s_hist[l] = 0;
    __syncthreads();
    const size_t n = size_t(used) * a.num_topk;
    for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
         i += size_t(gridDim.x) * blockDim.x) {
      const int l = a.recv_topk_idx[i];
      if (l >= 0) atomicAdd(&s_hist[l], 1);
    }
    __syncthreads();
    for (int l = threadIdx.x; l < L; l += blockDim.x) {
      if (s_hist[l] == 0) continue;
      atomicAdd(&a.recv_per_expert[l], s_hist[l]);
      atomicAdd(&a.group_sizes[l], s_hist[l]);
    }
    return;
  }
  // Real rows only (group by group): padding rows are being cleared concurrently, so
  // their contents must not be read here.
  const int* dup = dup_src_of(local);
  for (int l = 0; l < L; ++l) {
    const int end = min(ws->group_start[l] + ws->group_count[l], used);
    for (int row = ws->group_start[l] + gwarp; row < end; row += num_gwarps) {
      const int from = dup[row];
      if (from < 0) continue;
      for (int p = 0; p < a.num_payloads; ++p) {
        const int rb = a.payload_row_bytes[p];
        warp_copy_row(a.recv_payload[p] + size_t(from) * rb,
                      a.recv_payload[p] + size_t(row) * rb, rb, lane);
      }
    }
  }
}

__global__ void __launch_bounds__(kDispatchThreads) cached_dispatch_kernel(CachedDispatchArgs a) {
  __shared__ uint64_t s_ptr[kMaxRanks][kMaxPublished];
  char* local = a.peers.base[a.me];
  const uint64_t seq = header_of(local)->seq;  // set by the begin kernel
  const int lane = threadIdx.x & 31;
  const int warps = blockDim.x >> 5;
  load_peer_pointers(a.peers, a.me, a.num_ranks, seq, 1, s_ptr, "cached_dispatch");
  for (int row = blockIdx.x * warps + (threadIdx.x >> 5); row < a.capacity;
       row += gridDim.x * warps) {
    const int s = a.recv_src_rank[row];
    char* dst = a.out + size_t(row) * a.row_bytes;
    if (s < 0 || s >= a.num_ranks) {
      warp_zero_row(dst, a.row_bytes, lane);
      continue;
    }
    const int t = a.recv_src_token[row];
    const char* src = reinterpret_cast<const char*>(s_ptr[s][0]) + size_t(t) * a.row_bytes;
    warp_copy_row(src, dst, a.row_bytes, lane);
  }
  finish_op(a.peers, a.me, a.num_ranks, "cached_dispatch");
}

}  // namespace

const DispatchKernels kDispatchKernels = {intranode_dispatch_kernel, dispatch_finalize_kernel,
                                          cached_dispatch_kernel};

}  // namespace jax_ep
