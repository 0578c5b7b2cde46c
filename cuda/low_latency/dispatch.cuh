// Low-latency dispatch kernel: send phase (stage each token's row once, FP8 cast included,
// store it at every destination rank, list one entry per distinct expert, release the
// experts' flags) and recv phase (wait for this op's flags, gather the rows into recv_x).
// A template over the transport (device.cuh), instantiated by dispatch.cu (NVLink stores)
// and dispatch_nvshmem.cu (stores and NVSHMEM puts); launched by launch_policy.cuh.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include "cuda/common/fp8_cast.cuh"
#include "cuda/low_latency/device.cuh"

namespace jax_ep {
namespace {

// ------------------------------------------------------------------ dispatch

struct DispatchShared {
  int ne[kMaxExperts];      // send: rows this rank sends to each expert (every block counts)
  int rows[kMaxExperts];    // send: tokens of this block listed per expert
  uint32_t unit_flag[kMaxExperts];  // recv: flag word (count, scaled bit) of each unit
  int unit_row[kLLMaxTokensPerRank];      // recv: the current unit's source rows ...
  float unit_scale[kLLMaxTokensPerRank];  //       ... and row scales
  int unit_dst[kLLMaxTokensPerRank];      // recv (merged units): the entry's row in recv_x
  int unit_first[kMaxExperts];            // recv (merged units): each unit's first entry
  int te[kMaxTopk];         // send: the current token's expert ids
  int before[kMaxTopk];     // send: tokens before it routed to te[k] (its row in e's list)
  int exp_e[kMaxTopk];      // send: the token's distinct experts (one list entry each) ...
  int exp_pos[kMaxTopk];    //       ... the entry's position ...
  float exp_scale[kMaxTopk];//       ... and the row scale (slot_scale; 1 otherwise)
  int own_row[kMaxTopk];    // send: the token's rows in this rank's recv_x (its own experts) ...
  float own_scale[kMaxTopk];//       ... and their row scales
  int num_exp;              // send: distinct experts of the token; recv: scaled mode
  int num_own;              // send: how many of them are this rank's
  int num_dst;              // recv: entries of the block's units
  uint64_t op;
};

// Flag words carry the row count and, in bit 31, "rows scaled on receipt" (slot_scale).
constexpr uint32_t kScaledBit = 0x80000000u;

// Sum of the slot scales of token t on expert e, in slot order from 0 (as jnp.sum of a
// masked row: zeros are exact, so only >= 3 slots on one expert could round differently).
__device__ __forceinline__ float slot_scale_sum(const LLDispatchArgs& a, int t, int e) {
  float s = 0.0f;
  for (int k = 0; k < a.num_topk; ++k) {
    const float w = a.topk_idx[t * a.num_topk + k] == e ? a.slot_scale[t * a.num_topk + k] : 0.0f;
    s = __fadd_rn(s, w);
  }
  return s;
}

template <typename T>
__device__ __forceinline__ void load8(const T* p, float (&f)[8]) {
  if constexpr (sizeof(T) == 2) {
    Pack<T, 8> v;
    v.raw = ld_nc(reinterpret_cast<const int4*>(p));
#pragma unroll
    for (int i = 0; i < 8; ++i) f[i] = Elem<T>::to_f32(v.v[i]);
  } else {
    Pack<T, 4> lo, hi;
    lo.raw = ld_nc(reinterpret_cast<const int4*>(p));
    hi.raw = ld_nc(reinterpret_cast<const int4*>(p) + 1);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      f[i] = lo.v[i];
      f[4 + i] = hi.v[i];
    }
  }
}

// x * s rounded to x's dtype, on one 16-byte vector (the slot_scale rows of the grad path).
template <typename T>
__device__ __forceinline__ int4 scale_vec(int4 raw, float s) {
  Pack<T, 16 / sizeof(T)> p;
  p.raw = raw;
#pragma unroll
  for (int i = 0; i < int(16 / sizeof(T)); ++i)
    p.v[i] = Elem<T>::from_f32(__fmul_rn(Elem<T>::to_f32(p.v[i]), s));
  return p.raw;
}

// Expert ids of token tp in row[k < K] (-1 past K, and for tp >= t_end).
__device__ __forceinline__ void load_slots(const LLDispatchArgs& a, int tp, int t_end,
                                           int (&row)[kMaxTopk]) {
  const int K = a.num_topk;
#pragma unroll
  for (int k = 0; k < kMaxTopk; ++k)
    row[k] = tp < t_end && k < K ? ld_nc(a.topk_idx + size_t(tp) * K + k) : -1;
}

// Stages token t's slot row in shared memory, once for all its destinations: FP8 (H e4m3
// values, then H/128 f32 scales; a thread casts 8 channels, 16 threads share a scale) or
// the raw row.
template <typename Elt>
__device__ __forceinline__ void stage_row(const LLDispatchArgs& a, int t, int4* s_row) {
  const int H = a.hidden;
  const Elt* src = static_cast<const Elt*>(a.x) + size_t(t) * H;
  if (!a.use_fp8) {
    const int n = H * int(sizeof(Elt)) / 16;
    const int4* s = reinterpret_cast<const int4*>(src);
    for (int c = threadIdx.x; c < n; c += blockDim.x) s_row[c] = ld_nc(s + c);
    return;
  }
  uint8_t* q = reinterpret_cast<uint8_t*>(s_row);
  float* scales = reinterpret_cast<float*>(q + H);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, num_warps = blockDim.x >> 5;
  const int n8 = H / 8;  // a multiple of 16: a half-warp is one 128-channel group
  const int step = num_warps * 32;
  auto load = [&](int j, float (&f)[8]) {
    if (j < n8) {
      load8<Elt>(src + size_t(j) * 8, f);
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) f[i] = 0.0f;
    }
  };
  float next[8];
  load(warp * 32 + lane, next);
  for (int j0 = warp * 32; j0 < n8; j0 += step) {  // warp-uniform trip count
    const int j = j0 + lane;
    const bool ok = j < n8;
    float f[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) f[i] = next[i];
    if (j0 + step < n8) load(j + step, next);  // the next group's loads overlap this cast
    float scale;
    const uint2 packed = cast8_e4m3(f, &scale);
    if (ok) {
      *reinterpret_cast<uint2*>(q + size_t(j) * 8) = packed;
      if ((lane & 15) == 0) scales[j / 16] = scale;
    }
  }
}

// After the first pass (sm.ne complete), block e % G for each expert e: an expert of another
// rank that this rank sends nothing to gets an empty flag, so that its receiver need not
// wait for rows; an expert of this rank gets no flag at all (its rows go straight into
// recv_x), only its count in recv_count_per_rank, where a split recv finds it.
template <typename Tr>
__device__ __forceinline__ void publish_counts(const LLDispatchArgs& a, uint64_t op,
                                               const DispatchShared& sm, uint32_t scaled_bit) {
  const int R = a.num_ranks, E = a.num_experts, L = E / R, M = a.max_tokens;
  const int G = gridDim.x, b = blockIdx.x, nthr = blockDim.x;
  for (int e = b + int(threadIdx.x) * G; e < E; e += nthr * G) {
    if (e / L == a.me)
      a.recv_count_per_rank[(e % L) * R + a.me] = sm.ne[e] < M ? sm.ne[e] : M;
    else if (sm.ne[e] == 0)
      release_flag<Tr>(a.peers, a.me, e / L, int(op & 1), (e % L) * R + a.me,
                       flag_value(op, int(scaled_bit)));
  }
}

// Release (the memory-model chain, all cumulative through bar.sync): every store of
// this block -> barrier -> a thread's acq_rel add of the block's entries to the
// expert's counter (GPU scope: all adders run on this GPU) -> the add that completes
// the count (acquires every earlier add, and so every block's stores) -> its
// st.release.sys of the flag -> the receiver's ld.acquire.sys of the flag. With puts,
// every thread's nvshmem_quiet first completes its puts at the other nodes, so the add
// chain also covers them and the flag's signal arrives after them.
template <typename Tr>
__device__ __forceinline__ void dispatch_release(const LLDispatchArgs& a, uint64_t op,
                                                 const DispatchShared& sm, uint32_t scaled_bit) {
  const int R = a.num_ranks, L = a.num_experts / R;
  LowLatencyHeader* local_h = ll_header(a.peers.region[a.me]);
  if constexpr (Tr::kPuts) {
    if (a.peers.remote != 0) Tr::quiet();
  }
  __syncthreads();
  for (int e = threadIdx.x; e < a.num_experts; e += blockDim.x) {
    const int r = sm.rows[e];
    if (r == 0) continue;
    const int prev = int(atom_add_acq_rel_gpu(&local_h->send_rows[e], uint32_t(r)));
    if (prev + r == sm.ne[e]) {
      local_h->send_rows[e] = 0;
      release_flag<Tr>(a.peers, a.me, e / L, int(op & 1), (e % L) * R + a.me,
                       flag_value(op, int(uint32_t(sm.ne[e]) | scaled_bit)));
    }
  }
  ll_sync_if(a.timing);
  ll_mark(a.timing, op, kLLTReleased);
}

// The token's rows for this rank's own experts, straight from the staged row into recv_x
// (values, then the FP8 scales into recv_scales): one flattened copy over (row, vector).
// With slot_scale each row is scaled here, as a receiver scales the rows it gathers.
template <typename Elt>
__device__ __forceinline__ void own_rows(const LLDispatchArgs& a, const DispatchShared& sm,
                                         const int4* s_row, bool scaled) {
  const int n = sm.num_own;
  if (n == 0) return;
  const int H = a.hidden;
  const int value_bytes = a.use_fp8 ? H : H * int(sizeof(Elt));
  const int vecs = value_bytes / 16;
  char* values = static_cast<char*>(a.recv_x);
  for (int idx = threadIdx.x; idx < n * vecs; idx += blockDim.x) {
    const int d = idx / vecs, c = idx - d * vecs;
    int4 v = s_row[c];
    if (scaled) v = scale_vec<Elt>(v, sm.own_scale[d]);
    reinterpret_cast<int4*>(values + size_t(sm.own_row[d]) * value_bytes)[c] = v;
  }
  if (a.use_fp8) {
    const int ns = H / 128;  // f32 scales, after the H values of the staged row
    const float* src = reinterpret_cast<const float*>(reinterpret_cast<const char*>(s_row) + H);
    for (int idx = threadIdx.x; idx < n * ns; idx += blockDim.x) {
      const int d = idx / ns, c = idx - d * ns;
      a.recv_scales[size_t(sm.own_row[d]) * ns + c] = src[c];
    }
  }
}

// Send phase. Block b handles tokens b, b+G, ...: each token's row is staged once (FP8
// cast here) and stored right away at slot rows[me, t] (t < T <= M) of every other
// destination rank (every warp reduces the destination ranks from its lanes' top-k); then
// warp ballots over the earlier tokens give the token's position in each of its experts'
// lists (no scan, no atomics on the order: positions equal the reference's). One list
// entry (row t, token, scale) goes out per distinct expert of another rank; the rows for
// this rank's own experts go straight from the staged row into recv_x at their final
// positions (own_rows: no slot, no list, no flag). The first pass also counts every
// expert's rows (sm.ne); each expert's flag is released by the block whose entries
// complete that count (dispatch_release); experts with no entry get an empty flag from
// block e % G (publish_counts). Ranks of other nodes (puts): the staged row is copied
// once into the symmetric staging block (row t), then put to each of them.
// The op number: record_send put it in sm.op before the phase began; the block reads it
// after the first staging barrier, so that the first token's loads overlap the read of
// the op counter. Returns it (`phases` and `entry`: for the timing records only).
template <typename Elt, typename Tr>
__device__ __forceinline__ uint64_t dispatch_send(const LLDispatchArgs& a, DispatchShared& sm,
                                                  int4* s_row, int phases,
                                                  const LLStamp& entry) {
  const int R = a.num_ranks, E = a.num_experts, L = E / R, M = a.max_tokens;
  const int T = a.num_tokens, K = a.num_topk, H = a.hidden;
  const int tid = threadIdx.x, nthr = blockDim.x, G = gridDim.x, b = blockIdx.x;
  const int lane = tid & 31, warp = tid >> 5, num_warps = nthr >> 5;
  const size_t stride = ll_dispatch_row_stride(H, sizeof(Elt), a.use_fp8);
  const int chunks = int(stride / 16);
  const size_t list_offset = ll_dispatch_list_offset(R, M, stride);
  const size_t list_len = size_t(E) * M;
  const bool scaled = a.slot_scale != nullptr && !a.use_fp8;
  const uint32_t scaled_bit = scaled ? kScaledBit : 0u;

  for (int e = tid; e < E; e += nthr) {
    sm.ne[e] = 0;
    sm.rows[e] = 0;
  }
  uint64_t op = 0;
  bool first_pass = true;
  for (int t = b; first_pass || t < T; t += G) {
    const bool has_token = t < T;
    // The token's experts in lanes k < K of every warp (threads < kMaxTopk: warp 0, whose
    // lanes are the slots, also put them in shared memory for the counts).
    const int my_e = has_token && lane < K ? ld_nc(a.topk_idx + size_t(t) * K + lane) : -1;
    const bool my_valid = my_e >= 0 && my_e < E;
    // Tokens tp < T (first pass: histogram of distinct experts) or tp < t (positions): the
    // loads of the loop's first tokens are issued here, so that they overlap the staging.
    const int t_end = first_pass ? T : t;
    int row[kMaxTopk];
    load_slots(a, warp * 32 + lane, t_end, row);
    if (has_token) stage_row<Elt>(a, t, s_row);
    if (tid < kMaxTopk) {
      sm.before[tid] = 0;
      sm.te[tid] = my_e;
    }
    const int my_r = my_valid ? my_e / L : 0;
    const uint64_t rank_mask =
        uint64_t(__reduce_or_sync(0xffffffffu, my_valid && my_r < 32 ? 1u << my_r : 0u)) |
        uint64_t(__reduce_or_sync(0xffffffffu, my_valid && my_r >= 32 ? 1u << (my_r - 32) : 0u))
            << 32;
    __syncthreads();  // s_row, te, before; first pass: ne and rows zeroed, sm.op
    if (first_pass) {
      op = sm.op;
      ll_mark_begin(a.timing, op, phases, entry, 1);
    }
    ll_mark(a.timing, op, kLLTStaged);
    if (has_token) {
      uint64_t stores = rank_mask & ~(1ull << a.me);  // this rank's rows: own_rows, below
      if constexpr (Tr::kPuts) {
        const uint64_t puts = rank_mask & a.peers.remote;  // block-uniform
        stores &= ~puts;
        if (puts != 0) {
          char* local = a.peers.region[a.me];
          int4* st = reinterpret_cast<int4*>(ll_staging(local, a.half_bytes) + size_t(t) * stride);
          for (int c = tid; c < chunks; c += nthr) st[c] = s_row[c];
          __threadfence();  // the staged row is at GPU scope before any transport reads it
          __syncthreads();
          char* dst = ll_half(local, op, a.half_bytes) + (size_t(a.me) * M + t) * stride;
          for (uint64_t m = puts; m != 0; m &= m - 1) {
            const int r = __ffsll((long long)m) - 1;
            Tr::put_block(dst, st, stride, a.peers.pe[r]);
          }
        }
      }
      for (uint64_t m = stores; m != 0; m &= m - 1) {
        const int r = __ffsll((long long)m) - 1;
        int4* dst = reinterpret_cast<int4*>(ll_half(a.peers.region[r], op, a.half_bytes) +
                                            (size_t(a.me) * M + t) * stride);
        for (int c = tid; c < chunks; c += nthr) dst[c] = s_row[c];
      }
    }
    ll_mark(a.timing, op, kLLTRowsIssued);
    for (int base = warp * 32; base < t_end; base += num_warps * 32) {  // warp-uniform
      const int tp = base + lane;
      const bool in = tp < t_end;
      if (base != warp * 32) load_slots(a, tp, t_end, row);
      if (first_pass) {
#pragma unroll
        for (int k = 0; k < kMaxTopk; ++k) {
          const int e = row[k];
          bool first = e >= 0 && e < E;
#pragma unroll
          for (int k2 = 0; k2 < k; ++k2) first &= row[k2] != e;
          if (first) atomicAdd(&sm.ne[e], 1);
        }
      }
      if (has_token) {
        const bool earlier = in && tp < t;
        for (int k = 0; k < K; ++k) {
          const int e = sm.te[k];
          bool hit = false;
#pragma unroll
          for (int k2 = 0; k2 < kMaxTopk; ++k2) hit |= row[k2] == e;
          hit = hit && earlier && e >= 0 && e < E;
          const int c = __popc(__ballot_sync(0xffffffffu, hit));
          if (lane == 0 && c != 0) atomicAdd(&sm.before[k], c);
        }
      }
    }
    __syncthreads();
    ll_mark(a.timing, op, kLLTPositions);
    if (first_pass) {
      first_pass = false;
      publish_counts<Tr>(a, op, sm, scaled_bit);
    }
    if (!has_token) break;
    if (warp == 0) {  // send_pos and the list entries (one per distinct expert)
      const int k = lane;
      const int e = k < K ? sm.te[k] : -1;
      const bool valid = e >= 0 && e < E;
      bool first = valid;
      for (int k2 = 0; k2 < k && k2 < K; ++k2) first &= sm.te[k2] != e;
      const bool own = first && e / L == a.me;
      const unsigned mask = __ballot_sync(0xffffffffu, first && !own);
      const unsigned own_mask = __ballot_sync(0xffffffffu, own);
      if (k < K) a.send_pos[size_t(t) * K + k] = valid ? a.me * M + sm.before[k] : -1;
      const float scale = first && scaled ? slot_scale_sum(a, t, e) : 1.0f;
      if (first && !own) {
        const int d = __popc(mask & ((1u << k) - 1u));
        sm.exp_e[d] = e;
        sm.exp_pos[d] = sm.before[k];
        sm.exp_scale[d] = scale;
      }
      if (own) {  // row before[k] of unit (l, me) in recv_x
        const int d = __popc(own_mask & ((1u << k) - 1u));
        const int row = ((e % L) * R + a.me) * M + sm.before[k];
        sm.own_row[d] = row;
        sm.own_scale[d] = scale;
        a.recv_src_token[row] = t;
      }
      if (k == 0) {
        sm.num_exp = __popc(mask);
        sm.num_own = __popc(own_mask);
      }
    }
    __syncthreads();
    own_rows<Elt>(a, sm, s_row, scaled);
    if (tid < sm.num_exp) {
      const int e = sm.exp_e[tid], r = e / L;
      const size_t at = (size_t(e % L) * R + a.me) * M + sm.exp_pos[tid];
      bool put = false;
      if constexpr (Tr::kPuts) put = is_remote(a.peers, r);
      if (put) {
        if constexpr (Tr::kPuts) {
          char* lists = ll_half(a.peers.region[a.me], op, a.half_bytes) + list_offset;
          const int pe = a.peers.pe[r];
          Tr::put_int(reinterpret_cast<int*>(lists) + at, t, pe);  // the row: slot [me, t]
          Tr::put_int(reinterpret_cast<int*>(lists) + list_len + at, t, pe);
          Tr::put_float(reinterpret_cast<float*>(lists) + 2 * list_len + at, sm.exp_scale[tid], pe);
        }
      } else {
        char* lists = ll_half(a.peers.region[r], op, a.half_bytes) + list_offset;
        reinterpret_cast<int*>(lists)[at] = t;  // the row: slot [me, t]
        reinterpret_cast<int*>(lists)[list_len + at] = t;
        reinterpret_cast<float*>(lists)[2 * list_len + at] = sm.exp_scale[tid];
      }
      sm.rows[e] += 1;  // distinct experts: no two threads collide
    }
    __syncthreads();  // s_row, te, before and the token's entries are rewritten next token
    ll_mark(a.timing, op, kLLTListsIssued);
  }
  dispatch_release<Tr>(a, op, sm, scaled_bit);
  return op;
}

// Copies `total` entries p of sm (source row sm.unit_row[p] of src, src_stride apart, to
// row sm.unit_dst[p] of dst, or to row p when !kTable; dst_stride apart; row_bytes each),
// kUnroll loads in flight per thread, flattened over (entry, vector); kScale: multiply by
// sm.unit_scale[p] in Elt (16-byte vectors only).
template <typename Vec, typename Elt, bool kScale, bool kTable = true>
__device__ __forceinline__ void gather_entries(char* dst, size_t dst_stride, const char* src,
                                               size_t src_stride, const DispatchShared& sm,
                                               int total, int row_bytes) {
  block_copy_flat<Vec>(
      total, row_bytes / int(sizeof(Vec)),
      [&](int p, int c) {
        return ld_cg(reinterpret_cast<const Vec*>(src + size_t(sm.unit_row[p]) * src_stride) + c);
      },
      [&](int p, int c, const Vec& v) {
        Vec out = v;
        if constexpr (kScale) out = scale_vec<Elt>(out, sm.unit_scale[p]);
        const int row = kTable ? sm.unit_dst[p] : p;
        reinterpret_cast<Vec*>(dst + size_t(row) * dst_stride)[c] = out;
      });
}

// One unit's n rows (source rows sm.unit_row[i] of `src`, `src_stride` apart) into dst
// rows 0..n-1, `row_bytes` apart.
template <typename Vec, typename Elt, bool kScale>
__device__ __forceinline__ void gather_rows(char* dst, const char* src, size_t src_stride,
                                            const DispatchShared& sm, int n, int row_bytes) {
  gather_entries<Vec, Elt, kScale, false>(dst, size_t(row_bytes), src, src_stride, sm, n,
                                          row_bytes);
}

// What a dispatch recv reads of this op's half: the rows (`stride` apart), the lists, the
// bytes of a row's values and scales, and the number of units of this block.
template <typename Elt>
struct RecvHalf {
  const char* half;
  size_t stride;
  const int* list_row;
  const int* list_token;
  const float* list_scale;
  int value_bytes;  // a multiple of 16
  int scale_bytes;  // a multiple of 4
  int nu;
  __device__ __forceinline__ RecvHalf(const LLDispatchArgs& a, uint64_t op) {
    const int R = a.num_ranks, E = a.num_experts, M = a.max_tokens, H = a.hidden;
    stride = ll_dispatch_row_stride(H, sizeof(Elt), a.use_fp8);
    half = ll_half(a.peers.region[a.me], op, a.half_bytes);
    const size_t list_len = size_t(E) * M;
    list_row = reinterpret_cast<const int*>(half + ll_dispatch_list_offset(R, M, stride));
    list_token = list_row + list_len;
    list_scale = reinterpret_cast<const float*>(list_row + 2 * list_len);
    value_bytes = a.use_fp8 ? H : H * int(sizeof(Elt));
    scale_bytes = a.use_fp8 ? H / 32 : 0;
    const int b = blockIdx.x, G = gridDim.x;
    nu = b < E ? (E - 1 - b) / G + 1 : 0;
  }
};

// The row count of unit (l, me), this rank's own rows (already in recv_x): from the
// block's own histogram when this launch ran the send phase, else from
// recv_count_per_rank, where the send launch put it (publish_counts).
__device__ __forceinline__ int own_count(const LLDispatchArgs& a, const DispatchShared& sm,
                                         bool sent_here, int l) {
  const int L = a.num_experts / a.num_ranks, M = a.max_tokens;
  const int n = sent_here ? sm.ne[a.me * L + l]
                          : ld_cg(a.recv_count_per_rank + size_t(l) * a.num_ranks + a.me);
  return n < M ? n : M;
}

// The block's units one at a time (flags already seen, in sm.unit_flag; an own unit's
// count there): per unit of another rank, its list (row index, token, scale of each of the
// n entries) into shared memory, then the rows of its source rank into recv_x[l, s*M + i];
// every unit: recv_src_token -1 past n, recv_count_per_rank, and rows n..M-1 zeroed only
// when asked.
template <typename Elt>
__device__ __forceinline__ void recv_units_one_by_one(const LLDispatchArgs& a,
                                                      DispatchShared& sm,
                                                      const RecvHalf<Elt>& rh) {
  const int R = a.num_ranks, M = a.max_tokens, H = a.hidden;
  const int tid = threadIdx.x, nthr = blockDim.x, G = gridDim.x, b = blockIdx.x;
  for (int j = 0; j < rh.nu; ++j) {
    const int u = b + j * G, s = u % R;
    const bool own = s == a.me;
    const uint32_t flag = sm.unit_flag[j];
    const bool scaled = !own && (flag & kScaledBit) != 0 && !a.use_fp8;
    int n = int(flag & ~kScaledBit);
    n = n < M ? n : M;
    const size_t row0 = size_t(u) * M;
    if (tid == 0) a.recv_count_per_rank[u] = n;
    for (int i = tid; i < M; i += nthr) {
      if (i >= n) {
        a.recv_src_token[row0 + i] = -1;
      } else if (!own) {
        a.recv_src_token[row0 + i] = ld_cg(rh.list_token + row0 + i);
        int row = ld_cg(rh.list_row + row0 + i);
        sm.unit_row[i] = row < 0 ? 0 : (row >= M ? M - 1 : row);
        sm.unit_scale[i] = scaled ? ld_cg(rh.list_scale + row0 + i) : 1.0f;
      }
    }
    __syncthreads();
    const char* rows = rh.half + size_t(s) * M * rh.stride;
    char* values = static_cast<char*>(a.recv_x) + row0 * rh.value_bytes;
    char* scales = rh.scale_bytes ? reinterpret_cast<char*>(a.recv_scales) + row0 * rh.scale_bytes
                                  : nullptr;
    if (!own) {
      if (scaled)
        gather_rows<int4, Elt, true>(values, rows, rh.stride, sm, n, rh.value_bytes);
      else
        gather_rows<int4, Elt, false>(values, rows, rh.stride, sm, n, rh.value_bytes);
      if (rh.scale_bytes) {
        if (rh.scale_bytes % 16 == 0)
          gather_rows<int4, Elt, false>(scales, rows + H, rh.stride, sm, n, rh.scale_bytes);
        else
          gather_rows<int, Elt, false>(scales, rows + H, rh.stride, sm, n, rh.scale_bytes);
      }
    }
    if (a.zero_padding && n < M) {
      block_zero<int4>(values + size_t(n) * rh.value_bytes, size_t(M - n) * rh.value_bytes);
      if (rh.scale_bytes) block_zero<int>(scales + size_t(n) * rh.scale_bytes, size_t(M - n) * rh.scale_bytes);
    }
    __syncthreads();  // unit_row / unit_scale are rewritten for the next unit
  }
}

// Recv phase. Block b handles the (local expert l, source rank s) units u = l*R + s = b,
// b+G, ...: its threads wait for all of the block's flags at once (units of other ranks;
// an own unit's rows are in recv_x already and its count is known: own_count); the lists
// of all its units are read in one pass into one entry table, and all their rows (then
// all their scales) into recv_x[l, s*M + i] (= row u*M + i) by one flattened copy; the
// per-unit loop (recv_units_one_by_one) serves blocks with more than kLLMaxTokensPerRank
// entries or mixed scaled / unscaled flags. recv_src_token (-1 past n),
// recv_count_per_rank and recv_count are filled, and rows n..M-1 zeroed only when asked.
// recv_count: the R flag waits of each local expert run in parallel threads (integer
// sums: order-free).
template <typename Elt, typename Tr>
__device__ __forceinline__ void dispatch_recv(const LLDispatchArgs& a, uint64_t op,
                                              DispatchShared& sm, bool sent_here) {
  const int R = a.num_ranks, E = a.num_experts, L = E / R, M = a.max_tokens, H = a.hidden;
  const int tid = threadIdx.x, nthr = blockDim.x, G = gridDim.x, b = blockIdx.x;
  char* local = a.peers.region[a.me];
  LowLatencyHeader* h = ll_header(local);
  const RecvHalf<Elt> rh(a, op);

  for (int j = tid; j < rh.nu; j += nthr) {
    const int u = b + j * G, s = u % R;
    sm.rows[j] = 0;  // recv_count accumulator (send phase done with it)
    sm.unit_flag[j] = s == a.me ? uint32_t(own_count(a, sm, sent_here, u / R))
                                : uint32_t(wait_flag<Tr>(&h->flags[op & 1][u], op,
                                                         is_remote(a.peers, s),
                                                         "low_latency_dispatch", a.me, s,
                                                         a.me * L + u / R));
  }
  __syncthreads();  // the acquires above order the peers' stores before every thread's loads
  ll_mark(a.timing, op, kLLTFlagsSeen);
  if (tid == 0) {  // entry offsets per unit of another rank
    int total = 0, any_scaled = 0, all_scaled = 1;
    for (int j = 0; j < rh.nu; ++j) {
      sm.unit_first[j] = total;
      if ((b + j * G) % R == a.me) continue;
      const uint32_t flag = sm.unit_flag[j];
      const int scaled = (flag & kScaledBit) != 0 && !a.use_fp8;
      const int n = int(flag & ~kScaledBit);
      total += n < M ? n : M;
      any_scaled |= scaled;
      all_scaled &= scaled;
    }
    sm.num_dst = total;
    sm.num_exp = any_scaled == 0 ? 0 : (all_scaled ? 1 : 2);  // 2: mixed
  }
  __syncthreads();
  const int total = sm.num_dst, scaled_mode = sm.num_exp;
  if (total <= kLLMaxTokensPerRank && scaled_mode != 2) {
    for (int idx = tid; idx < rh.nu * M; idx += nthr) {
      const int j = idx / M, i = idx - j * M;
      const int u = b + j * G, s = u % R;
      const bool own = s == a.me;
      const uint32_t flag = sm.unit_flag[j];
      int n = int(flag & ~kScaledBit);
      n = n < M ? n : M;
      const size_t row0 = size_t(u) * M;
      if (i == 0) a.recv_count_per_rank[u] = n;
      if (i >= n) {
        a.recv_src_token[row0 + i] = -1;
      } else if (!own) {
        a.recv_src_token[row0 + i] = ld_cg(rh.list_token + row0 + i);
        const int p = sm.unit_first[j] + i;
        int row = ld_cg(rh.list_row + row0 + i);
        row = row < 0 ? 0 : (row >= M ? M - 1 : row);
        sm.unit_row[p] = s * M + row;
        sm.unit_dst[p] = int(row0) + i;
        sm.unit_scale[p] = scaled_mode ? ld_cg(rh.list_scale + row0 + i) : 1.0f;
      }
    }
    __syncthreads();
    char* values = static_cast<char*>(a.recv_x);
    if (scaled_mode)
      gather_entries<int4, Elt, true>(values, rh.value_bytes, rh.half, rh.stride, sm, total, rh.value_bytes);
    else
      gather_entries<int4, Elt, false>(values, rh.value_bytes, rh.half, rh.stride, sm, total, rh.value_bytes);
    char* scales = reinterpret_cast<char*>(a.recv_scales);
    if (rh.scale_bytes) {
      if (rh.scale_bytes % 16 == 0)
        gather_entries<int4, Elt, false>(scales, rh.scale_bytes, rh.half + H, rh.stride, sm, total,
                                         rh.scale_bytes);
      else
        gather_entries<int, Elt, false>(scales, rh.scale_bytes, rh.half + H, rh.stride, sm, total,
                                        rh.scale_bytes);
    }
    if (a.zero_padding) {
      for (int j = 0; j < rh.nu; ++j) {
        const int u = b + j * G;
        int n = int(sm.unit_flag[j] & ~kScaledBit);
        n = n < M ? n : M;
        if (n >= M) continue;
        const size_t row0 = size_t(u) * M;
        block_zero<int4>(values + (row0 + n) * rh.value_bytes, size_t(M - n) * rh.value_bytes);
        if (rh.scale_bytes)
          block_zero<int>(scales + (row0 + n) * rh.scale_bytes, size_t(M - n) * rh.scale_bytes);
      }
    }
  } else {  // the per-unit loop
    recv_units_one_by_one<Elt>(a, sm, rh);
  }
  ll_sync_if(a.timing);
  ll_mark(a.timing, op, kLLTRecvCopied);
  // recv_count[l] (l = u / R for the block's units with u % R == 0): one thread per source.
  for (int idx = tid; idx < rh.nu * R; idx += nthr) {
    const int j = idx / R, r = idx - j * R;
    const int u = b + j * G;
    if (u % R) continue;
    const int l = u / R;
    int n = r == a.me
        ? own_count(a, sm, sent_here, l)
        : int(uint32_t(wait_flag<Tr>(&h->flags[op & 1][l * R + r], op, is_remote(a.peers, r),
                                     "low_latency_dispatch", a.me, r, a.me * L + l)) &
              ~kScaledBit);
    atomicAdd(&sm.rows[j], n < M ? n : M);
  }
  __syncthreads();
  for (int j = tid; j < rh.nu; j += nthr) {
    const int u = b + j * G;
    if (u % R == 0) a.recv_count[u / R] = sm.rows[j];
  }
  ll_sync_if(a.timing);
  ll_mark(a.timing, op, kLLTCounts);
}

template <typename Elt, typename Tr>
__global__ void __launch_bounds__(kLLMaxThreads) ll_dispatch_kernel(LLDispatchArgs a, int phases) {
  __shared__ DispatchShared sm;
  extern __shared__ int4 s_row[];  // send: one staged slot row
  const LLStamp entry = ll_stamp(a.timing);
  char* local = a.peers.region[a.me];
  uint64_t op;
  if (phases & kLLSend) {
    record_send(local, a.ticket, "low_latency_dispatch", a.me, &sm.op);
    op = dispatch_send<Elt, Tr>(a, sm, s_row, phases, entry);
  } else {
    op = begin_recv(local, a.expect_ticket, "low_latency_dispatch", a.me, &sm.op);
    ll_mark_begin(a.timing, op, phases, entry, 1);
  }
  if (phases & kLLRecv) {
    __syncthreads();
    if (phases & kLLSend) ll_mark(a.timing, op, kLLTRecvEntry);
    dispatch_recv<Elt, Tr>(a, op, sm, (phases & kLLSend) != 0);
    finish_recv(local, op);
    ll_mark(a.timing, op, kLLTExit);
  }
}

}  // namespace
}  // namespace jax_ep

// The kernel table of one transport, [ElemType of x].
#define JAX_EP_LL_DISPATCH_TABLE(Tr)                                                       \
  {ll_dispatch_kernel<__nv_bfloat16, Tr>, ll_dispatch_kernel<__half, Tr>,                  \
   ll_dispatch_kernel<float, Tr>}
