// Intranode combine over NVLink: each rank pulls the rows of its own tokens from every
// rank's y (published peer pointers) and reduces them in fp32, in the reference order:
// per source-of-rows rank ascending, a partial over that rank's rows in row order, the
// partials summed in rank order. Pulling (rather than pushing partials) keeps the
// payload on the wire in y's dtype and the reduction order fixed: deterministic.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/common/device_sync.cuh"
#include "cuda/intranode/kernels.h"
#include "cuda/common/row_copy.cuh"
#include "cuda/common/tma.cuh"

namespace jax_ep {
namespace {

enum CombineSlot { kY = 0, kWeights, kSrcRank, kSrcToken, kSrcSlot };

// py[i] with a run-time i, without moving the array to local memory.
template <int kMaxPairs>
__device__ __forceinline__ const char* py_at(const char* const (&py)[kMaxPairs], int i) {
  const char* p = nullptr;
#pragma unroll
  for (int j = 0; j < kMaxPairs; ++j)
    if (j == i) p = py[j];
  return p;
}

// 16 bytes of T <-> floats.
template <typename T> struct Pack;
template <> struct Pack<__nv_bfloat16> {
  static constexpr int kN = 8;
  __device__ static void to_float(const int4& v, float* f) {
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) { float2 p = __bfloat1622float2(h[i]); f[2 * i] = p.x; f[2 * i + 1] = p.y; }
  }
  __device__ static int4 from_float(const float* f) {
    int4 v;
    __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
    return v;
  }
};
template <> struct Pack<__half> {
  static constexpr int kN = 8;
  __device__ static void to_float(const int4& v, float* f) {
    const __half2* h = reinterpret_cast<const __half2*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) { float2 p = __half22float2(h[i]); f[2 * i] = p.x; f[2 * i + 1] = p.y; }
  }
  __device__ static int4 from_float(const float* f) {
    int4 v;
    __half2* h = reinterpret_cast<__half2*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = __floats2half2_rn(f[2 * i], f[2 * i + 1]);
    return v;
  }
};
template <> struct Pack<float> {
  static constexpr int kN = 4;
  __device__ static void to_float(const int4& v, float* f) {
    f[0] = __int_as_float(v.x); f[1] = __int_as_float(v.y);
    f[2] = __int_as_float(v.z); f[3] = __int_as_float(v.w);
  }
  __device__ static int4 from_float(const float* f) {
    return make_int4(__float_as_int(f[0]), __float_as_int(f[1]), __float_as_int(f[2]),
                     __float_as_int(f[3]));
  }
};

// kMaxPairs: most rows one token can have (R in the rank layout, K in the expert layout).
// One 16-byte vector of a token's output: the sum over its num_pairs staged rows (pair i at
// stage + i * chunk) in the reference order: a partial per source rank (bit i of rank_start:
// pair i opens the next rank's), the partials added in rank order; weighted rows as
// __fmul_rn then __fadd_rn (no FMA: the reference's rounding).
template <typename T, int kMaxPairs>
__device__ __forceinline__ int4 reduce_vector(const char* stage, int chunk, int v, int num_pairs,
                                              uint32_t rank_start,
                                              const float (&pw)[kMaxPairs], bool has_weights) {
  constexpr int kN = Pack<T>::kN;
  float acc[kN], part[kN], f[kN];
#pragma unroll
  for (int j = 0; j < kN; ++j) acc[j] = 0.f, part[j] = 0.f;
#pragma unroll
  for (int i = 0; i < kMaxPairs; ++i) {
    if (i >= num_pairs) break;
    if ((rank_start >> i) & 1u) {  // next rank: close this rank's partial
#pragma unroll
      for (int j = 0; j < kN; ++j) acc[j] += part[j], part[j] = 0.f;
    }
    const int4 raw = *reinterpret_cast<const int4*>(stage + i * chunk + v * 16);
    Pack<T>::to_float(raw, f);
    if (has_weights) {
#pragma unroll
      for (int j = 0; j < kN; ++j) part[j] = __fadd_rn(part[j], __fmul_rn(f[j], pw[i]));
    } else {
#pragma unroll
      for (int j = 0; j < kN; ++j) part[j] += f[j];
    }
  }
#pragma unroll
  for (int j = 0; j < kN; ++j) acc[j] += part[j];
  return Pack<T>::from_float(acc);
}

// Expert layout: the rank holding row `row` of token t's slot `slot` is the one rank whose
// handle says that row came from (me, t, slot); -1 if none does. All R lookups are issued
// before any is compared (R independent loads in flight).
__device__ __forceinline__ int expert_row_owner(const uint64_t (*s_ptr)[kMaxPublished], int R,
                                                int me, int t, int slot, int row) {
  int sr[kMaxRanks], st[kMaxRanks], ss[kMaxRanks];
#pragma unroll
  for (int r = 0; r < kMaxRanks; ++r) {
    if (r >= R) continue;
    sr[r] = reinterpret_cast<const int*>(s_ptr[r][kSrcRank])[row];
    st[r] = reinterpret_cast<const int*>(s_ptr[r][kSrcToken])[row];
    ss[r] = reinterpret_cast<const int*>(s_ptr[r][kSrcSlot])[row];
  }
  int owner = -1;
#pragma unroll
  for (int r = 0; r < kMaxRanks; ++r)
    if (r < R && owner < 0 && sr[r] == me && st[r] == t && ss[r] == slot) owner = r;
  return owner;
}

template <typename T, int kMaxPairs>
__global__ void __launch_bounds__(kCombineThreads) intranode_combine_kernel(CombineArgs a) {
  __shared__ uint64_t s_ptr[kMaxRanks][kMaxPublished];
  extern __shared__ __align__(128) char s_dyn[];
  char* local = a.peers.base[a.me];
  const uint64_t seq = header_of(local)->seq;  // set by the begin kernel
  const int R = a.num_ranks, K = a.num_topk;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int warps = blockDim.x >> 5;
  const int row_bytes = a.width * int(sizeof(T));
  uint64_t* bar = reinterpret_cast<uint64_t*>(s_dyn) + 2 * warp;
  char* stage[2];
  stage[0] = s_dyn + kCombineBarrierBytes + size_t(warp) * 2 * kCombineStage;
  stage[1] = stage[0] + kCombineStage;
  if (lane == 0) {
    mbar_init(&bar[0]);
    mbar_init(&bar[1]);
  }
  __syncwarp();
  uint32_t phase = 0;
  load_peer_pointers(a.peers, a.me, R, seq, kSrcSlot + 1, s_ptr, "combine");

  for (int t = blockIdx.x * warps + warp; t < a.num_tokens; t += gridDim.x * warps) {
    // 1) This token's rows: (rank, row) in reduction order.
    int my_rank = -1, my_row = -1;
    if (a.layout == Layout::kRank) {
      if (lane < R) {
        my_row = a.send_pos[size_t(t) * R + lane];
        my_rank = my_row >= 0 ? lane : -1;
      }
    } else if (lane < K) {
      my_row = a.send_pos[size_t(t) * K + lane];
      if (my_row >= 0) my_rank = expert_row_owner(s_ptr, R, a.me, t, lane, my_row);
    }
    const bool valid = my_rank >= 0;
    const long long key = valid ? (long long)my_rank * a.capacity + my_row : -1;
    int order = 0;  // position of this lane's row in the reduction order
    const unsigned valid_mask = __ballot_sync(0xffffffffu, valid);
    for (unsigned m = valid_mask; m; m &= m - 1) {
      const int j = __ffs(m) - 1;
      const long long kj = __shfl_sync(0xffffffffu, key, j);
      if (kj < key) ++order;
    }
    const int num_pairs = __popc(valid_mask);
    float my_w = 1.f;
    if (valid && a.has_weights)
      my_w = reinterpret_cast<const float*>(s_ptr[my_rank][kWeights])[my_row];

    int pr[kMaxPairs];
    float pw[kMaxPairs];
    const char* py[kMaxPairs];
#pragma unroll
    for (int i = 0; i < kMaxPairs; ++i) {
      const unsigned who = __ballot_sync(0xffffffffu, valid && order == i);
      const int src = who ? __ffs(who) - 1 : 0;
      pr[i] = __shfl_sync(0xffffffffu, my_rank, src);
      const int row = __shfl_sync(0xffffffffu, my_row, src);
      pw[i] = __shfl_sync(0xffffffffu, my_w, src);
      py[i] = i < num_pairs
                  ? reinterpret_cast<const char*>(s_ptr[pr[i]][kY]) + size_t(row) * row_bytes
                  : nullptr;
    }

    uint32_t rank_start = 0;  // bit i: pair i's rank differs from pair i-1's
#pragma unroll
    for (int i = 1; i < kMaxPairs; ++i)
      if (i < num_pairs && pr[i] != pr[i - 1]) rank_start |= 1u << i;
    char* out_row = reinterpret_cast<char*>(a.out) + size_t(t) * row_bytes;
    if (num_pairs == 0) {
      warp_zero_row(out_row, row_bytes, lane);
      continue;
    }
    // 2) Chunks of the row: bulk-load every pair's chunk, reduce, write.
    const int chunk = min(row_bytes, (kCombineStage / num_pairs) & ~15);
    const int num_chunks = (row_bytes + chunk - 1) / chunk;
    auto issue = [&](int c) {
      if (lane != 0) return;
      const int s = c & 1, off = c * chunk;
      const uint32_t n = uint32_t(min(chunk, row_bytes - off));
      asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;"
                   ::"r"(smem_addr(&bar[s])), "r"(n * uint32_t(num_pairs)) : "memory");
      for (int i = 0; i < num_pairs; ++i)
        asm volatile(
            "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
            ::"r"(smem_addr(stage[s] + i * chunk)), "l"(py_at(py, i) + off), "r"(n),
              "r"(smem_addr(&bar[s])) : "memory");
    };
    issue(0);
    for (int c = 0; c < num_chunks; ++c) {
      if (c + 1 < num_chunks) issue(c + 1);  // the other stage was drained last iteration
      const int s = c & 1, off = c * chunk;
      mbar_wait(&bar[s], (phase >> s) & 1u);
      phase ^= 1u << s;
      const int n_vec = min(chunk, row_bytes - off) / 16;
      for (int v = lane; v < n_vec; v += 32)
        *reinterpret_cast<int4*>(out_row + off + v * 16) = reduce_vector<T, kMaxPairs>(
            stage[s], chunk, v, num_pairs, rank_start, pw, a.has_weights);
      __syncwarp();  // every lane is done with this stage before it is refilled
    }
  }
  finish_op(a.peers, a.me, R, "combine");
}

}  // namespace

// Rank layout: at most one row per rank (kMaxRanks pairs); expert layout: one per slot.
const CombineKernel kCombineKernels[3][2] = {
    {intranode_combine_kernel<__nv_bfloat16, kMaxRanks>,
     intranode_combine_kernel<__nv_bfloat16, kMaxTopk>},
    {intranode_combine_kernel<__half, kMaxRanks>, intranode_combine_kernel<__half, kMaxTopk>},
    {intranode_combine_kernel<float, kMaxRanks>, intranode_combine_kernel<float, kMaxTopk>},
};

}  // namespace jax_ep
