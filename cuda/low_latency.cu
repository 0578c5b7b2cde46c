// Low-latency (decode) dispatch and combine over NVLink peer pointers.
//
// Every op is a send kernel then a recv kernel on XLA's stream (fused or split form):
//   send: write rows into the peers' receive slots (half = op parity), then release one
//         flag per (destination block) tagged with the op number and the row count;
//   recv: wait for every flag of this op, move/reduce the rows into XLA's outputs, and
//         (last block) bump the local op counter.
// Why this is safe without any clean-up launch: a rank's send of op c+2 (same half)
// runs after its recv of op c+1, which waited for every peer's send of op c+1, which
// each peer ran after its recv of op c. So nobody overwrites a half that is still read.
// This needs each *_send to be followed by its *_recv before the next *_send (checked).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include "cuda/block_scan.cuh"
#include "cuda/device_sync.cuh"
#include "cuda/low_latency.h"
#include "cuda/row_copy.cuh"

namespace jax_ep {
namespace {

// FP8 recipe of jax_ep.fp8.per_token_cast, as XLA compiles it on the GPU:
//   amax = max(max|x|, 1e-4); q = e4m3_satfinite_rn(x * div.full(448, amax));
//   scale = amax * f32(1/448)   (XLA's algebraic simplifier turns "/ 448" into this).
constexpr float kE4m3Max = 448.0f;
constexpr float kAmaxFloor = 1e-4f;
constexpr float kInvE4m3Max = 1.0f / 448.0f;

__device__ __forceinline__ float div_full(float a, float b) {
  float r;  // XLA lowers f32 division with -nvptx-prec-divf32=1, i.e. div.full.f32
  asm("div.full.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}

template <typename T> struct Elem;
template <> struct Elem<float> {
  static __device__ __forceinline__ float to_f32(float v) { return v; }
  static __device__ __forceinline__ float from_f32(float v) { return v; }
};
template <> struct Elem<__nv_bfloat16> {
  static __device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_f32(float v) { return __float2bfloat16_rn(v); }
};
template <> struct Elem<__half> {
  static __device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_f32(float v) { return __float2half_rn(v); }
};

// V elements of T moved as one 16-byte vector (V > 1) or one scalar (V == 1).
template <typename T, int V>
union Pack {
  int4 raw;
  T v[V];
  __device__ __forceinline__ Pack() {}
  __device__ __forceinline__ void load(const T* p) {
    if constexpr (V > 1) raw = *reinterpret_cast<const int4*>(p);
    else v[0] = *p;
  }
  __device__ __forceinline__ void store(T* p) const {
    if constexpr (V > 1) *reinterpret_cast<int4*>(p) = raw;
    else *p = v[0];
  }
};

// ------------------------------------------------------------------ shared helpers

__device__ __forceinline__ LowLatencyHeader* ll_header(char* base) {
  return reinterpret_cast<LowLatencyHeader*>(base + kLowLatencyOffset);
}
__device__ __forceinline__ char* ll_half(char* base, uint64_t op, size_t half_bytes) {
  return base + kLLDataOffset + size_t(op & 1) * half_bytes;
}
__device__ __forceinline__ uint64_t flag_value(uint64_t op, int count) {
  return (op << 32) | uint64_t(uint32_t(count));
}
__device__ __forceinline__ uint64_t read_seq(const LowLatencyHeader* h) {
  return *reinterpret_cast<const volatile uint64_t*>(&h->seq);
}

static __device__ __noinline__ void ll_fail(const char* op, const char* why, int rank, int peer,
                                             int expert, unsigned long long seen,
                                             unsigned long long want) {
  printf("jax_ep: %s on rank %d: %s (peer %d, expert %d; flag holds op %llu, want op %llu). "
         "Every rank must run the same low-latency ops on a Buffer, each *_send followed by "
         "its *_recv\n", op, rank, why, peer, expert, seen, want);
  asm volatile("trap;");
}

// Waits for this op's flag and returns the row count it carries; traps after kTimeoutNs.
__device__ __forceinline__ int wait_flag(const uint64_t* flag, uint64_t op, const char* name,
                                         int rank, int peer, int expert) {
  uint64_t v = ld_acquire_sys(flag);
  if ((v >> 32) < op) {
    const uint64_t start = global_timer_ns();
    while (((v = ld_acquire_sys(flag)) >> 32) < op) {
      if (global_timer_ns() - start > kTimeoutNs)
        ll_fail(name, "timed out waiting for a peer", rank, peer, expert, v >> 32, op);
    }
  }
  if ((v >> 32) != op) ll_fail(name, "flag from a later op", rank, peer, expert, v >> 32, op);
  return int(uint32_t(v));
}

// Block-level start of a send: the op number (= ops done + 1); block 0 records it.
__device__ __forceinline__ uint64_t begin_send(char* local, int* ticket, const char* name,
                                               int rank, uint64_t* s_op) {
  if (threadIdx.x == 0) {
    LowLatencyHeader* h = ll_header(local);
    const uint64_t op = read_seq(h) + 1;
    if (blockIdx.x == 0) {
      volatile uint64_t* pending = &h->send_pending;
      if (*pending == op)
        ll_fail(name, "a second *_send before the previous op's *_recv", rank, -1, -1, op, op);
      *pending = op;
      if (ticket != nullptr) *ticket = int(op);
    }
    *s_op = op;
  }
  __syncthreads();
  return *s_op;
}

// Block-level start of a recv: the op number, checked against the send's ticket.
__device__ __forceinline__ uint64_t begin_recv(char* local, const int* expect_ticket,
                                               const char* name, int rank, uint64_t* s_op) {
  if (threadIdx.x == 0) {
    const uint64_t op = read_seq(ll_header(local)) + 1;
    if (expect_ticket != nullptr && uint64_t(uint32_t(*expect_ticket)) != (op & 0xffffffffull))
      ll_fail(name, "*_recv does not belong to the last *_send", rank, -1, -1,
              uint64_t(uint32_t(*expect_ticket)), op);
    *s_op = op;
  }
  __syncthreads();
  return *s_op;
}

// Block-level end of a recv: the last block to finish marks the op done locally.
__device__ __forceinline__ void finish_recv(char* local, uint64_t op) {
  __syncthreads();
  if (threadIdx.x == 0) {
    LowLatencyHeader* h = ll_header(local);
    __threadfence();
    const unsigned prev = atomicAdd(&h->recv_arrivals, 1u);
    if (prev + 1 == gridDim.x) {  // every block has read seq already
      h->recv_arrivals = 0;
      *reinterpret_cast<volatile uint64_t*>(&h->seq) = op;
      __threadfence();
    }
  }
}

// Sender side: release this block's rows to the peer (all threads call it).
__device__ __forceinline__ void release_flag(uint64_t* flag, uint64_t value) {
  __threadfence_system();
  __syncthreads();
  if (threadIdx.x == 0) st_release_sys(flag, value);
}

// Receiver side copies: the slots were written by peers during this kernel's lifetime, so
// they are read with ordinary (coherent) loads, never the non-coherent path.
__device__ __forceinline__ void warp_copy_coherent(const char* src, char* dst, int bytes,
                                                   int lane) {
  if ((bytes & 15) == 0) {
    const int4* s = reinterpret_cast<const int4*>(src);
    int4* d = reinterpret_cast<int4*>(dst);
    for (int c = lane; c < bytes / 16; c += 32) d[c] = s[c];
  } else if ((bytes & 3) == 0) {
    const int* s = reinterpret_cast<const int*>(src);
    int* d = reinterpret_cast<int*>(dst);
    for (int c = lane; c < bytes / 4; c += 32) d[c] = s[c];
  } else {
    for (int c = lane; c < bytes; c += 32) dst[c] = src[c];
  }
}

// ------------------------------------------------------------------ dispatch: rows

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

// One warp writes one row into a peer slot: x, or x * scale rounded to x's dtype.
template <typename T>
__device__ __forceinline__ void write_plain_row(const T* src, bool scaled, float scale, char* dst,
                                                int hidden, int lane) {
  if (!scaled) {
    warp_copy_row(reinterpret_cast<const char*>(src), dst, hidden * int(sizeof(T)), lane);
    return;
  }
  T* d = reinterpret_cast<T*>(dst);
  for (int j = lane; j < hidden; j += 32)
    d[j] = Elem<T>::from_f32(__fmul_rn(Elem<T>::to_f32(src[j]), scale));
}

// One warp casts one row to e4m3 with one scale per 128 channels (lane: 4 channels).
template <typename T>
__device__ __forceinline__ void write_fp8_row(const T* src, bool scaled, float scale, char* dst,
                                              int hidden, int lane) {
  float* scales = reinterpret_cast<float*>(dst + hidden);
  for (int c = 0; c < hidden / 128; ++c) {
    const int base = c * 128 + lane * 4;
    float v[4];
    float amax = 0.0f;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      float f = Elem<T>::to_f32(src[base + j]);
      if (scaled) f = Elem<T>::to_f32(Elem<T>::from_f32(__fmul_rn(f, scale)));
      v[j] = f;
      amax = fmaxf(amax, fabsf(f));
    }
#pragma unroll
    for (int d = 16; d > 0; d >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, d));
    amax = fmaxf(amax, kAmaxFloor);
    const float mul = div_full(kE4m3Max, amax);
    uint32_t packed = 0;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const __nv_fp8_storage_t q = __nv_cvt_float_to_fp8(__fmul_rn(v[j], mul), __NV_SATFINITE,
                                                         __NV_E4M3);
      packed |= uint32_t(q) << (8 * j);
    }
    *reinterpret_cast<uint32_t*>(dst + base) = packed;
    if (lane == 0) scales[c] = __fmul_rn(amax, kInvE4m3Max);
  }
}

// ------------------------------------------------------------------ dispatch: send
// Block per destination expert e: list this rank's tokens routed to e in token order
// (block scan, no atomics), write each row once into slot [e % L, me, pos] on rank
// e / L, record send_pos, then release the (e % L, me) flag with the count.
template <typename Elt>
__global__ void __launch_bounds__(1024) ll_dispatch_send_kernel(LLDispatchArgs a) {
  __shared__ int s_tokens[kLLMaxTokensPerRank];
  __shared__ ScanSmem s_scan;
  __shared__ uint64_t s_op;
  const int R = a.num_ranks, E = a.num_experts, L = E / R, M = a.max_tokens;
  const int T = a.num_tokens, K = a.num_topk, H = a.hidden;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, num_warps = blockDim.x >> 5;
  const uint64_t op = begin_send(a.peers.base[a.me], a.ticket, "low_latency_dispatch", a.me, &s_op);
  const size_t stride = ll_dispatch_row_stride(H, sizeof(Elt), a.use_fp8);
  const size_t tok_offset = ll_dispatch_token_offset(E, M, stride);
  const bool scaled = a.slot_scale != nullptr;

  // Masked and out-of-range slots send nothing.
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < T * K; i += gridDim.x * blockDim.x) {
    const int e = a.topk_idx[i];
    if (e < 0 || e >= E) a.send_pos[i] = -1;
  }

  for (int e = blockIdx.x; e < E; e += gridDim.x) {
    int n = 0;
    for (int t0 = 0; t0 < T; t0 += blockDim.x) {  // uniform trip count: the scan syncs
      const int t = t0 + threadIdx.x;
      bool routed = false;
      if (t < T)
        for (int k = 0; k < K; ++k) routed |= a.topk_idx[t * K + k] == e;
      int total;
      const int before = block_exclusive_count(routed, &total, s_scan);
      if (routed) s_tokens[n + before] = t;
      n += total;
    }
    __syncthreads();

    // Every slot naming e (duplicates included) points at the token's one row.
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      const int t = s_tokens[i];
      for (int k = 0; k < K; ++k)
        if (a.topk_idx[t * K + k] == e) a.send_pos[t * K + k] = a.me * M + i;
    }

    const int dst_rank = e / L, l = e % L;
    const size_t block = size_t(l) * R + a.me;  // (local expert, source rank) at dst_rank
    char* half = ll_half(a.peers.base[dst_rank], op, a.half_bytes);
    char* rows = half + block * M * stride;
    int* tokens = reinterpret_cast<int*>(half + tok_offset) + block * M;
    for (int i = warp; i < n; i += num_warps) {
      const int t = s_tokens[i];
      const Elt* src = static_cast<const Elt*>(a.x) + size_t(t) * H;
      const float scale = scaled ? slot_scale_sum(a, t, e) : 1.0f;
      if (a.use_fp8) write_fp8_row<Elt>(src, scaled, scale, rows + i * stride, H, lane);
      else write_plain_row<Elt>(src, scaled, scale, rows + i * stride, H, lane);
      if (lane == 0) tokens[i] = t;
    }
    release_flag(&ll_header(a.peers.base[dst_rank])->flags[op & 1][block], flag_value(op, n));
    __syncthreads();  // s_tokens is rewritten for the next expert
  }
}

// ------------------------------------------------------------------ dispatch: recv
// Block per (local expert l, source rank s): wait for the flags of l from every rank,
// copy the s block's n rows into recv_x[l, s*M + i], zero its other rows, fill the
// handle arrays and the counts.
__global__ void __launch_bounds__(1024) ll_dispatch_recv_kernel(LLDispatchArgs a, int elem_bytes) {
  __shared__ int s_count[kMaxRanks];
  __shared__ uint64_t s_op;
  const int R = a.num_ranks, E = a.num_experts, L = E / R, M = a.max_tokens, H = a.hidden;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, num_warps = blockDim.x >> 5;
  char* local = a.peers.base[a.me];
  const uint64_t op = begin_recv(local, a.expect_ticket, "low_latency_dispatch", a.me, &s_op);
  LowLatencyHeader* h = ll_header(local);
  const size_t stride = ll_dispatch_row_stride(H, size_t(elem_bytes), a.use_fp8);
  const char* half = ll_half(local, op, a.half_bytes);
  const int* slot_tokens =
      reinterpret_cast<const int*>(half + ll_dispatch_token_offset(E, M, stride));
  const int value_bytes = a.use_fp8 ? H : H * elem_bytes;
  const int scale_bytes = a.use_fp8 ? H / 128 * 4 : 0;

  for (int pair = blockIdx.x; pair < E; pair += gridDim.x) {
    const int l = pair / R, s = pair % R;
    if (threadIdx.x < R) {
      const int r = threadIdx.x;
      const int n = wait_flag(&h->flags[op & 1][l * R + r], op, "low_latency_dispatch", a.me, r,
                              a.me * L + l);
      s_count[r] = n < M ? n : M;
    }
    __syncthreads();
    const int n = s_count[s];
    if (threadIdx.x == 0) {
      a.recv_count_per_rank[l * R + s] = n;
      if (s == 0) {
        int total = 0;
        for (int r = 0; r < R; ++r) total += s_count[r];
        a.recv_count[l] = total;
      }
    }
    const size_t out_base = size_t(l) * R * M + size_t(s) * M;
    for (int i = threadIdx.x; i < M; i += blockDim.x)
      a.recv_src_token[out_base + i] = i < n ? slot_tokens[size_t(pair) * M + i] : -1;
    const char* rows = half + size_t(pair) * M * stride;
    for (int i = warp; i < M; i += num_warps) {
      char* values = static_cast<char*>(a.recv_x) + (out_base + i) * value_bytes;
      char* scales = reinterpret_cast<char*>(a.recv_scales) + (out_base + i) * scale_bytes;
      if (i < n) {
        warp_copy_coherent(rows + i * stride, values, value_bytes, lane);
        if (scale_bytes) warp_copy_coherent(rows + i * stride + H, scales, scale_bytes, lane);
      } else {
        warp_zero_row(values, value_bytes, lane);
        if (scale_bytes) warp_zero_row(scales, scale_bytes, lane);
      }
    }
    __syncthreads();  // s_count is rewritten for the next pair
  }
  finish_recv(local, op);
}

// ------------------------------------------------------------------ combine: send
// Block per (local expert l, home rank s): the n rows y[l, s*M + i] go to slot
// [me*L + l, i] of rank s, then the flag of expert me*L + l there.
__global__ void __launch_bounds__(1024) ll_combine_send_kernel(LLCombineArgs a, int elem_bytes) {
  __shared__ uint64_t s_op;
  const int R = a.num_ranks, E = a.num_experts, L = E / R, M = a.max_tokens;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, num_warps = blockDim.x >> 5;
  const uint64_t op = begin_send(a.peers.base[a.me], a.ticket, "low_latency_combine", a.me, &s_op);
  const int row_bytes = a.width * elem_bytes;
  const size_t stride = ll_combine_row_stride(a.width, size_t(elem_bytes));
  for (int pair = blockIdx.x; pair < E; pair += gridDim.x) {
    const int l = pair / R, s = pair % R;
    int n = a.recv_count_per_rank[l * R + s];
    n = n < 0 ? 0 : (n > M ? M : n);
    const int e = a.me * L + l;
    char* dst = ll_half(a.peers.base[s], op, a.half_bytes) + size_t(e) * M * stride;
    const char* src = static_cast<const char*>(a.y) + (size_t(l) * R * M + size_t(s) * M) * row_bytes;
    for (int i = warp; i < n; i += num_warps)
      warp_copy_row(src + size_t(i) * row_bytes, dst + size_t(i) * stride, row_bytes, lane);
    release_flag(&ll_header(a.peers.base[s])->flags[op & 1][e], flag_value(op, n));
  }
}

// ------------------------------------------------------------------ combine: recv
// Waits for every expert's flag, then block per token: out[t] = sum over k in slot order
// of w[t,k] * row(e_k, pos), fp32, separate multiply and add (the reference's order: the
// sum starts from the k = 0 term; masked slots add 0).
template <typename T, int V>
__global__ void __launch_bounds__(1024) ll_combine_recv_kernel(LLCombineArgs a) {
  __shared__ const T* s_row[kMaxTopk];
  __shared__ float s_w[kMaxTopk];
  __shared__ uint64_t s_op;
  const int R = a.num_ranks, E = a.num_experts, L = E / R, M = a.max_tokens, K = a.num_topk;
  const int W = a.width;
  char* local = a.peers.base[a.me];
  const uint64_t op = begin_recv(local, a.expect_ticket, "low_latency_combine", a.me, &s_op);
  LowLatencyHeader* h = ll_header(local);
  const size_t stride = ll_combine_row_stride(W, sizeof(T));
  const char* half = ll_half(local, op, a.half_bytes);
  for (int e = threadIdx.x; e < E; e += blockDim.x)
    wait_flag(&h->flags[op & 1][e], op, "low_latency_combine", a.me, e / L, e);
  __syncthreads();

  for (int t = blockIdx.x; t < a.num_tokens; t += gridDim.x) {
    if (threadIdx.x < K) {
      const int k = threadIdx.x;
      const int pos = a.send_pos[t * K + k];
      if (pos >= 0) {
        int e = a.topk_idx[t * K + k];
        e = e < 0 ? 0 : (e >= E ? E - 1 : e);  // jnp gathers clamp, so does this
        s_row[k] = reinterpret_cast<const T*>(half + (size_t(e) * M + pos % M) * stride);
        s_w[k] = a.topk_weights[t * K + k];
      } else {
        s_row[k] = nullptr;
        s_w[k] = 0.0f;
      }
    }
    __syncthreads();
    T* out = static_cast<T*>(a.out) + size_t(t) * W;
    for (int j = threadIdx.x * V; j < W; j += blockDim.x * V) {
      float acc[V];
      for (int k = 0; k < K; ++k) {
        Pack<T, V> in;
        if (s_row[k] != nullptr) in.load(s_row[k] + j);
#pragma unroll
        for (int v = 0; v < V; ++v) {
          const float term =
              s_row[k] != nullptr ? __fmul_rn(Elem<T>::to_f32(in.v[v]), s_w[k]) : 0.0f;
          acc[v] = k == 0 ? term : __fadd_rn(acc[v], term);
        }
      }
      Pack<T, V> res;
#pragma unroll
      for (int v = 0; v < V; ++v) res.v[v] = Elem<T>::from_f32(acc[v]);
      res.store(out + j);
    }
    __syncthreads();  // s_row / s_w are rewritten for the next token
  }
  finish_recv(local, op);
}

int elem_bytes_of(ElemType t) { return t == ElemType::kF32 ? 4 : 2; }

int grid_of(int work, int num_blocks) {
  int g = work < num_blocks ? work : num_blocks;
  return g < 1 ? 1 : g;
}

template <typename T, int V>
cudaError_t launch_combine_recv_v(const LLCombineArgs& a, cudaStream_t stream) {
  ll_combine_recv_kernel<T, V>
      <<<grid_of(a.num_tokens, a.num_blocks), a.num_threads, 0, stream>>>(a);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_combine_recv_t(const LLCombineArgs& a, cudaStream_t stream) {
  // 16-byte vectors when every row (and so every vector) is 16-byte aligned.
  if ((size_t(a.width) * sizeof(T)) % 16 == 0) return launch_combine_recv_v<T, 16 / sizeof(T)>(a, stream);
  return launch_combine_recv_v<T, 1>(a, stream);
}

}  // namespace

cudaError_t launch_ll_dispatch_send(const LLDispatchArgs& a, cudaStream_t stream) {
  const int grid = grid_of(a.num_experts, a.num_blocks);
  switch (a.x_type) {
    case ElemType::kBF16:
      ll_dispatch_send_kernel<__nv_bfloat16><<<grid, a.num_threads, 0, stream>>>(a);
      break;
    case ElemType::kF16:
      ll_dispatch_send_kernel<__half><<<grid, a.num_threads, 0, stream>>>(a);
      break;
    case ElemType::kF32:
      ll_dispatch_send_kernel<float><<<grid, a.num_threads, 0, stream>>>(a);
      break;
  }
  return cudaGetLastError();
}

cudaError_t launch_ll_dispatch_recv(const LLDispatchArgs& a, cudaStream_t stream) {
  ll_dispatch_recv_kernel<<<grid_of(a.num_experts, a.num_blocks), a.num_threads, 0, stream>>>(
      a, elem_bytes_of(a.x_type));
  return cudaGetLastError();
}

cudaError_t launch_ll_combine_send(const LLCombineArgs& a, cudaStream_t stream) {
  ll_combine_send_kernel<<<grid_of(a.num_experts, a.num_blocks), a.num_threads, 0, stream>>>(
      a, elem_bytes_of(a.y_type));
  return cudaGetLastError();
}

cudaError_t launch_ll_combine_recv(const LLCombineArgs& a, cudaStream_t stream) {
  switch (a.y_type) {
    case ElemType::kBF16: return launch_combine_recv_t<__nv_bfloat16>(a, stream);
    case ElemType::kF16: return launch_combine_recv_t<__half>(a, stream);
    case ElemType::kF32: return launch_combine_recv_t<float>(a, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace jax_ep
