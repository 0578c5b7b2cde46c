// Low-latency combine kernel: send phase (each expert owner copies the rows of a unit back
// to the tokens' home rank and releases one flag per unit) and recv phase (each home rank
// reduces its tokens' rows in slot order, fp32). A template over the transport
// (device.cuh), instantiated by combine.cu (NVLink stores) and combine_nvshmem.cu (stores
// and NVSHMEM puts); launched by launch_policy.cuh.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/low_latency/device.cuh"

namespace jax_ep {
namespace {

// ------------------------------------------------------------------ combine

struct CombineShared {
  const char* row[kMaxTopk];
  float w[kMaxTopk];
  uint64_t op;
};

// Send phase. Block b handles the units u = l*R + s = b, b+G, ... of other ranks s: the n
// rows y[l, s*M + i] (= row u*M + i) go to slot [me*L + l, i] of rank s; after all of the
// block's rows one barrier, then one release per unit flag (expert me*L + l at rank s).
// This rank's own units (s = me) stay in y: its recv phase reads them there.
// A rank of another node (puts): the unit's rows are copied into the symmetric staging
// block (rows u*M + i) and put from there in one transfer; every thread's nvshmem_quiet
// completes them before the barrier that precedes the flags.
template <typename T, typename Vec, typename Tr>
__device__ __forceinline__ void combine_send(const LLCombineArgs& a, uint64_t op) {
  const int R = a.num_ranks, E = a.num_experts, L = E / R, M = a.max_tokens;
  const int tid = threadIdx.x, nthr = blockDim.x, G = gridDim.x, b = blockIdx.x;
  const int row_bytes = a.width * int(sizeof(T));
  const size_t stride = ll_combine_row_stride(a.width, sizeof(T));
  const int nu = b < E ? (E - 1 - b) / G + 1 : 0;
  auto count_of = [&](int u) {
    const int n = a.recv_count_per_rank[u];
    return n < 0 ? 0 : (n > M ? M : n);
  };
  char* local = a.peers.region[a.me];
  for (int j = 0; j < nu; ++j) {
    const int u = b + j * G, l = u / R, s = u % R;
    if (s == a.me) continue;  // read from y by this rank's recv: nothing to send
    const char* src = static_cast<const char*>(a.y) + size_t(u) * M * row_bytes;
    const size_t slot = size_t(a.me * L + l) * M * stride;
    if constexpr (Tr::kPuts) {
      if (is_remote(a.peers, s)) {  // block-uniform
        const int n = count_of(u);
        if (n == 0) continue;
        char* st = ll_staging(local, a.half_bytes) + size_t(u) * M * stride;
        block_copy_rows<Vec, false>(st, stride, src, row_bytes, n, row_bytes);
        __threadfence();  // the staged rows are at GPU scope before any transport reads them
        __syncthreads();
        Tr::put_block(ll_half(local, op, a.half_bytes) + slot, st, size_t(n) * stride,
                      a.peers.pe[s]);
        continue;
      }
    }
    char* dst = ll_half(a.peers.region[s], op, a.half_bytes) + slot;
    block_copy_rows<Vec, false>(dst, stride, src, row_bytes, count_of(u), row_bytes);
  }
  ll_mark(a.timing, op, kLLTRowsIssued);
  if constexpr (Tr::kPuts) {
    if (a.peers.remote != 0) Tr::quiet();
  }
  __syncthreads();  // the release below is cumulative over every store of the block
  for (int j = tid; j < nu; j += nthr) {
    const int u = b + j * G, l = u / R, s = u % R;
    if (s == a.me) continue;
    release_flag<Tr>(a.peers, a.me, s, int(op & 1), a.me * L + l, flag_value(op, count_of(u)));
  }
  ll_sync_if(a.timing);
  ll_mark(a.timing, op, kLLTReleased);
}

// Recv phase. Block b handles tokens t = b, b+G, ...: thread k waits for the flag of slot
// k's expert (none for an expert of this rank, whose row is read from y), then
// out[t] = sum over k in slot order of w[t,k] * row(e_k, pos), fp32, separate multiply
// and add (the reference's order: the sum starts from the k = 0 term;
// masked slots add 0). Then the block waits for the flags e = b, b+G, ... (other ranks'
// experts) that no token needed, so that every flag of this op has been seen before the op
// ends.
template <typename T, int V, typename Tr>
__device__ __forceinline__ void combine_recv(const LLCombineArgs& a, uint64_t op,
                                             CombineShared& sm) {
  const int R = a.num_ranks, E = a.num_experts, L = E / R, M = a.max_tokens, K = a.num_topk;
  const int W = a.width;
  const int tid = threadIdx.x, nthr = blockDim.x, G = gridDim.x, b = blockIdx.x;
  char* local = a.peers.region[a.me];
  LowLatencyHeader* h = ll_header(local);
  const size_t stride = ll_combine_row_stride(W, sizeof(T));
  const size_t row_bytes = size_t(W) * sizeof(T);
  const char* half = ll_half(local, op, a.half_bytes);
  for (int t = b; t < a.num_tokens; t += G) {
    if (tid < K) {
      const int k = tid;
      // Three independent loads (one round trip), whether or not the slot is live.
      const int pos = a.send_pos[size_t(t) * K + k];
      int e = a.topk_idx[size_t(t) * K + k];
      const float w = a.topk_weights[size_t(t) * K + k];
      if (pos >= 0) {
        e = e < 0 ? 0 : (e >= E ? E - 1 : e);  // jnp gathers clamp, so does this
        if (e / L == a.me) {  // this rank's own expert: its row of y, y[l, me*M + i]
          sm.row[k] = static_cast<const char*>(a.y) +
                      ((size_t(e % L) * R + a.me) * M + pos % M) * row_bytes;
        } else {
          wait_flag<Tr>(&h->flags[op & 1][e], op, is_remote(a.peers, e / L),
                        "low_latency_combine", a.me, e / L, e);
          sm.row[k] = half + (size_t(e) * M + pos % M) * stride;
        }
        sm.w[k] = w;
      } else {
        sm.row[k] = nullptr;
        sm.w[k] = 0.0f;
      }
    }
    __syncthreads();
    if (t == b) ll_mark(a.timing, op, kLLTFlagsSeen);
    T* out = static_cast<T*>(a.out) + size_t(t) * W;
    for (int j = tid * V; j < W; j += nthr * V) {
      float acc[V];
      for (int k0 = 0; k0 < K; k0 += 8) {  // 8 rows' loads in flight, summed in slot order
        Pack<T, V> in[8];
#pragma unroll
        for (int u = 0; u < 8; ++u) {
          const int k = k0 + u;
          if (k < K && sm.row[k] != nullptr) {
            const T* p = reinterpret_cast<const T*>(sm.row[k]) + j;
            if constexpr (V > 1) in[u].raw = ld_cg(reinterpret_cast<const int4*>(p));
            else in[u].v[0] = ld_cg(p);
          }
        }
#pragma unroll
        for (int u = 0; u < 8; ++u) {
          const int k = k0 + u;
          if (k >= K) break;
          const bool live = sm.row[k] != nullptr;
#pragma unroll
          for (int v = 0; v < V; ++v) {
            const float term = live ? __fmul_rn(Elem<T>::to_f32(in[u].v[v]), sm.w[k]) : 0.0f;
            acc[v] = k == 0 ? term : __fadd_rn(acc[v], term);
          }
        }
      }
      if constexpr (V > 1) {
        Pack<T, V> res;
#pragma unroll
        for (int v = 0; v < V; ++v) res.v[v] = Elem<T>::from_f32(acc[v]);
        *reinterpret_cast<int4*>(out + j) = res.raw;
      } else {
        out[j] = Elem<T>::from_f32(acc[0]);
      }
    }
    __syncthreads();  // sm.row / sm.w are rewritten for the next token
  }
  ll_mark(a.timing, op, kLLTRecvCopied);
  for (int e = b + tid * G; e < E; e += nthr * G)
    if (e / L != a.me)
      wait_flag<Tr>(&h->flags[op & 1][e], op, is_remote(a.peers, e / L), "low_latency_combine",
                    a.me, e / L, e);
  ll_sync_if(a.timing);
  ll_mark(a.timing, op, kLLTCounts);
}

template <typename T, int V, typename Vec, typename Tr>
__global__ void __launch_bounds__(kLLMaxThreads) ll_combine_kernel(LLCombineArgs a, int phases) {
  __shared__ CombineShared sm;
  const LLStamp entry = ll_stamp(a.timing);
  char* local = a.peers.region[a.me];
  const uint64_t op = begin_phases(local, a, phases, "low_latency_combine", &sm.op);
  ll_mark_begin(a.timing, op, phases, entry, 2);
  if (phases & kLLSend)
    combine_send<T, Vec, Tr>(a, op);
  if (phases & kLLRecv) {
    __syncthreads();
    if (phases & kLLSend) ll_mark(a.timing, op, kLLTRecvEntry);
    combine_recv<T, V, Tr>(a, op, sm);
    finish_recv(local, op);
    ll_mark(a.timing, op, kLLTExit);
  }
}

}  // namespace
}  // namespace jax_ep

// The kernel table of one transport, [y type][vector]: 16-byte vectors when every row is
// 16-byte aligned, else 4 or 2 bytes (a macro: each .cu that includes this file defines
// one table of its own transport).
#define JAX_EP_LL_COMBINE_TABLE(Tr)                                                         \
  {{ll_combine_kernel<__nv_bfloat16, 8, int4, Tr>, ll_combine_kernel<__nv_bfloat16, 1, int, Tr>, \
    ll_combine_kernel<__nv_bfloat16, 1, unsigned short, Tr>},                               \
   {ll_combine_kernel<__half, 8, int4, Tr>, ll_combine_kernel<__half, 1, int, Tr>,          \
    ll_combine_kernel<__half, 1, unsigned short, Tr>},                                      \
   {ll_combine_kernel<float, 4, int4, Tr>, ll_combine_kernel<float, 1, int, Tr>,            \
    ll_combine_kernel<float, 1, unsigned short, Tr>}}
