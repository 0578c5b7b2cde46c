// Start of an op: bump the op sequence number, publish this rank's buffers, and (for
// dispatch) all-gather every rank's count row so that each rank knows where its rows
// land at every destination and how many rows it receives.
#include "cuda/common/block_scan.cuh"
#include "cuda/common/device_sync.cuh"
#include "cuda/intranode/kernels.h"

namespace jax_ep {
namespace {

__device__ __forceinline__ uint64_t start_op(char* local, const uint64_t* publish,
                                             int num_publish) {
  BufferHeader* h = header_of(local);
  const uint64_t seq = h->seq + 1;
  h->seq = seq;
  for (int i = 0; i < num_publish; ++i) h->published[i] = publish[i];
  __threadfence_system();
  st_release_sys(&h->ptr_seq, seq);
  return seq;
}

__global__ void begin_op_kernel(char* local, PeerBases unused, uint64_t p0, uint64_t p1,
                                uint64_t p2, uint64_t p3, uint64_t p4, int num_publish) {
  const uint64_t publish[5] = {p0, p1, p2, p3, p4};
  start_op(local, publish, num_publish);
}

__device__ __forceinline__ int round_up(int n, int a) { return (n + a - 1) / a * a; }

__global__ void __launch_bounds__(kNotifyThreads) notify_dispatch_kernel(NotifyArgs a) {
  __shared__ uint64_t s_seq;
  char* local = a.peers.base[a.me];
  Workspace* ws = workspace_of(local);
  const int R = a.num_ranks, E = a.num_experts, L = E / R;
  if (threadIdx.x == 0) s_seq = start_op(local, a.publish, a.num_publish);
  __syncthreads();
  const uint64_t seq = s_seq;

  // All-gather the count rows: row `me` of every rank's count matrix.
  const int row_len = kCountRow;
  for (int i = threadIdx.x; i < R * row_len; i += blockDim.x) {
    const int r = i / row_len, j = i % row_len;
    const bool used = j < R || (j >= kMaxRanks && j < kMaxRanks + E);
    if (used) count_matrix_of(a.peers.base[r])[a.me * row_len + j] = ws->my_counts[j];
  }
  __threadfence_system();
  __syncthreads();
  if (threadIdx.x < R) {
    st_release_sys(&header_of(a.peers.base[threadIdx.x])->counts_seq[a.me], seq);
    wait_at_least(&header_of(local)->counts_seq[threadIdx.x], seq, "dispatch (count exchange)",
                  "count row", a.me, threadIdx.x);
  }
  __syncthreads();
  const int* M = count_matrix_of(local);  // M[s * row_len + j]

  if (a.layout == Layout::kRank) {
    // Rows are grouped by source rank: rank s's rows at r start after ranks < s.
    if (threadIdx.x < R) {
      const int r = threadIdx.x;
      int base = 0;
      for (int s = 0; s < a.me; ++s) base += M[s * row_len + r];
      ws->send_base[r] = base;
    }
    if (threadIdx.x == 0) {
      int needed = 0;
      for (int s = 0; s < R; ++s) needed += M[s * row_len + a.me];
      const int used = needed < a.capacity ? needed : a.capacity;
      ws->used_rows = used;
      *a.num_recv = used;
      *a.num_overflow = needed - used;
    }
    for (int l = threadIdx.x; l < L; l += blockDim.x) {
      a.recv_per_expert[l] = 0;  // counted from the received rows at the end
      a.group_sizes[l] = 0;
      a.needed_per_expert[l] = 0;
    }
    return;
  }

  // Expert layout: rank r's local experts' groups lie in expert order, each padded to
  // expert_alignment; a row of (s, t, k) for expert e lands at group_start(e) + rows of
  // ranks < s + pos. One thread per expert and one block scan of the padded sizes (a
  // thread per rank walking its experts would serialise the loads).
  __shared__ int s_excl[kMaxExperts];  // padded rows of the experts before e (all ranks)
  __shared__ ScanSmem scan;
  const int e = threadIdx.x;  // blockDim.x = 1024 >= E
  const int lane = threadIdx.x & 31;
  int total = 0, before_me = 0, padded = 0;
  if (e < E) {
    for (int s = 0; s < R; ++s) {
      const int c = M[s * row_len + kMaxRanks + e];
      total += c;
      if (s < a.me) before_me += c;
    }
    padded = round_up(total, a.expert_alignment);
  }
  int incl = padded;  // inclusive scan within the warp, then across warps
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const int v = __shfl_up_sync(0xffffffffu, incl, d);
    if (lane >= d) incl += v;
  }
  int all_padded;
  const int excl = block_exclusive_warp_sum(__shfl_sync(0xffffffffu, incl, 31), &all_padded,
                                            scan) + incl - padded;
  if (e < E) s_excl[e] = excl;
  __syncthreads();
  if (e >= E) return;
  const int r = e / L, l = e % L;
  const int start = excl - s_excl[r * L];  // within rank r's rows
  ws->send_base[e] = start + before_me;
  if (r != a.me) return;
  const int cap = a.capacity;
  ws->group_start[l] = start;
  ws->group_count[l] = total;
  a.needed_per_expert[l] = total;
  a.recv_per_expert[l] = max(min(start + total, cap) - min(start, cap), 0);
  a.group_sizes[l] = min(start + padded, cap) - min(start, cap);
  if (l == 0) {
    const int mine = (r + 1 < R ? s_excl[(r + 1) * L] : all_padded) - s_excl[r * L];
    const int used = mine < cap ? mine : cap;
    ws->used_rows = used;
    *a.num_recv = used;
    *a.num_overflow = mine - used;
  }
}

}  // namespace

const NotifyKernels kNotifyKernels = {begin_op_kernel, notify_dispatch_kernel};

}  // namespace jax_ep
