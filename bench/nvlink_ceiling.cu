// How fast can SMs (and copy engines) move rows between GPUs over NVLink when every GPU
// sends to and receives from every other one at once, the traffic of a dispatch or a
// combine? This is the ceiling the normal kernels are measured against (bench/NOTES.md),
// taken with the same copy routines the kernels use (cuda/row_copy.cuh, cuda/tma.cuh).
//
// One process drives all visible GPUs (peer access on). Each GPU holds rows bound for
// every peer; row i goes to peer i % P, so every SM talks to every peer as in dispatch.
// Methods:
//   store  warps load local rows (16-byte vectors, 8 in flight per lane), store to the peer
//   pull   warps load the peer's rows and store them locally (combine's direction)
//   tma    one lane per warp: bulk-load a row into shared memory, bulk-store it to the peer
//          (a ring of stages, loads running ahead of stores), as the dispatch kernel does
//   tma_chunked  the dispatch kernel's pipeline: 4 KB chunks, two stages per warp, every
//          warp of a block (lane 0) loading, waiting, storing
//   ce     cudaMemcpyPeerAsync per (source, destination) pair: copy engines, no SMs
// --local-copy 1 also writes every row to a local buffer, as dispatch does for the rows
// of its own rank. Reported per GPU: bytes it sent (or pulled) over NVLink / time of the slowest GPU.
//
// Build and run (repo root, on the GPU machine):
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -I. bench/nvlink_ceiling.cu \
//     -o /tmp/nvlink_ceiling && /tmp/nvlink_ceiling --sms 8,16,24,32,48,132 > ceiling.json
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "cuda/common/row_copy.cuh"
#include "cuda/common/tma.cuh"

namespace {

using jax_ep::kMaxRanks;

#define CHECK(call)                                                                  \
  do {                                                                               \
    cudaError_t e_ = (call);                                                         \
    if (e_ != cudaSuccess) {                                                         \
      fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #call,                   \
              cudaGetErrorString(e_));                                               \
      exit(1);                                                                       \
    }                                                                                \
  } while (0)

struct Job {
  const char* src[kMaxRanks];  // per peer slot: where its rows are read from
  char* dst[kMaxRanks];        // per peer slot: where they are written
  char* local[kMaxRanks];      // per peer slot: a second, local copy (dispatch writes
                               // the rows for its own rank too), or null
  int peers;
  long rows_per_peer;
  int row_bytes;
};

// Row i of this GPU's traffic: peer slot i % P, row i / P of that slot.
__device__ __forceinline__ void row_ptrs(const Job& j, long i, const char** s, char** d,
                                         char** l = nullptr) {
  const int p = int(i % j.peers);
  const long r = i / j.peers;
  *s = j.src[p] + r * j.row_bytes;
  *d = j.dst[p] + r * j.row_bytes;
  if (l != nullptr) *l = j.local[p] != nullptr ? j.local[p] + r * j.row_bytes : nullptr;
}

__global__ void warp_copy_kernel(Job j) {
  const int lane = threadIdx.x % 32;
  const long warps = long(gridDim.x) * (blockDim.x / 32);
  const long total = j.rows_per_peer * j.peers;
  for (long i = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; i < total; i += warps) {
    const char* s;
    char* d[kMaxRanks] = {};
    row_ptrs(j, i, &s, &d[0], &d[1]);
    jax_ep::warp_copy_row(s, d, j.row_bytes, lane);
  }
}

constexpr int kStages = 4;
constexpr int kLoadsAhead = kStages - 2;  // a stage is reloaded once its store two rows back read it

__global__ void tma_copy_kernel(Job j) {
  extern __shared__ __align__(128) char smem[];
  __shared__ uint64_t bars[32][kStages];
  const int warp = threadIdx.x / 32;
  if (threadIdx.x % 32 != 0) return;
  char* stage = smem + size_t(warp) * kStages * j.row_bytes;
  uint64_t* bar = bars[warp];
  for (int s = 0; s < kStages; ++s) jax_ep::mbar_init(&bar[s]);
  const long warps = long(gridDim.x) * (blockDim.x / 32);
  const long total = j.rows_per_peer * j.peers;
  const long first = blockIdx.x * (blockDim.x / 32) + warp;
  const long n = first < total ? (total - first + warps - 1) / warps : 0;  // rows of this warp
  auto load = [&](long k) {
    const char* s;
    char* d;
    row_ptrs(j, first + k * warps, &s, &d);
    jax_ep::tma_load(stage + (k % kStages) * j.row_bytes, s, j.row_bytes, &bar[k % kStages]);
  };
  for (long k = 0; k < kLoadsAhead && k < n; ++k) load(k);
  for (long k = 0; k < n; ++k) {
    if (k + kLoadsAhead < n) {
      jax_ep::bulk_wait_read<1>();  // the store that last used this stage has read it
      load(k + kLoadsAhead);
    }
    jax_ep::mbar_wait(&bar[k % kStages], uint32_t((k / kStages) & 1));
    const char* s;
    char *d, *l;
    row_ptrs(j, first + k * warps, &s, &d, &l);
    jax_ep::tma_store(d, stage + (k % kStages) * j.row_bytes, j.row_bytes);
    if (l != nullptr) jax_ep::tma_store(l, stage + (k % kStages) * j.row_bytes, j.row_bytes);
    jax_ep::bulk_commit();
  }
  jax_ep::bulk_wait_all();
}

// The dispatch kernel's pipeline (cuda/intranode_dispatch.cu RowPipe): every warp of
// the block, lane 0 each, moves a row in chunks through two stages: wait until the
// stores of the stage's last chunk read it, load, wait for the load, store.
constexpr int kChunkBytes = 4096;

__global__ void tma_chunked_kernel(Job j) {
  extern __shared__ __align__(128) char smem[];
  __shared__ uint64_t bars[32][2];
  const int warp = threadIdx.x / 32;
  if (threadIdx.x % 32 != 0) return;
  char* stage[2] = {smem + size_t(warp) * 2 * kChunkBytes,
                    smem + size_t(warp) * 2 * kChunkBytes + kChunkBytes};
  uint64_t* bar = bars[warp];
  jax_ep::mbar_init(&bar[0]);
  jax_ep::mbar_init(&bar[1]);
  uint32_t phase = 0;
  int item = 0;
  const long warps = long(gridDim.x) * (blockDim.x / 32);
  const long total = j.rows_per_peer * j.peers;
  for (long i = blockIdx.x * (blockDim.x / 32) + warp; i < total; i += warps) {
    const char* src;
    char *d, *l;
    row_ptrs(j, i, &src, &d, &l);
    for (int off = 0; off < j.row_bytes; off += kChunkBytes) {
      const uint32_t n = uint32_t(min(kChunkBytes, j.row_bytes - off));
      const int s = item++ & 1;
      jax_ep::bulk_wait_read<1>();
      jax_ep::tma_load(stage[s], src + off, n, &bar[s]);
      jax_ep::mbar_wait(&bar[s], (phase >> s) & 1u);
      phase ^= 1u << s;
      jax_ep::tma_store(d + off, stage[s], n);
      if (l != nullptr) jax_ep::tma_store(l + off, stage[s], n);
      jax_ep::bulk_commit();
    }
  }
  jax_ep::bulk_wait_all();
}

std::vector<int> parse_list(const char* s) {
  std::vector<int> v;
  for (const char* p = s; *p;) {
    v.push_back(atoi(p));
    while (*p && *p != ',') ++p;
    if (*p == ',') ++p;
  }
  return v;
}

struct Options {
  std::vector<int> sms{8, 16, 24, 32, 48, 132};
  std::vector<int> warps{4, 8, 16};     // store / pull
  std::vector<int> tma_warps{1, 2, 3};  // one lane per warp drives kStages rows of shared memory
  std::vector<std::string> methods{"store", "pull", "tma", "ce"};
  long mb_per_peer = 128;
  int row_bytes = 14336;  // one bf16 row of H = 7168
  int reps = 10;
  bool one_way = false;     // only GPU 0 sends (or pulls): one direction of its links
  bool local_copy = false;  // store / tma / tma_chunked also write each row locally
};

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i];
    const char* v = argv[i + 1];
    if (k == "--sms") o.sms = parse_list(v);
    else if (k == "--warps") o.warps = parse_list(v);
    else if (k == "--tma-warps") o.tma_warps = parse_list(v);
    else if (k == "--mb-per-peer") o.mb_per_peer = atol(v);
    else if (k == "--row-bytes") o.row_bytes = atoi(v);
    else if (k == "--reps") o.reps = atoi(v);
    else if (k == "--one-way") o.one_way = atoi(v) != 0;
    else if (k == "--local-copy") o.local_copy = atoi(v) != 0;
    else if (k == "--methods") {
      o.methods.clear();
      for (const char* p = v; *p;) {
        const char* e = strchr(p, ',');
        o.methods.emplace_back(p, e ? e - p : strlen(p));
        p = e ? e + 1 : p + strlen(p);
      }
    } else {
      fprintf(stderr, "unknown flag %s\n", k.c_str());
      exit(2);
    }
  }
  return o;
}

}  // namespace

int main(int argc, char** argv) {
  const Options o = parse(argc, argv);
  int R = 0;
  CHECK(cudaGetDeviceCount(&R));
  if (R < 2 || R > kMaxRanks) {
    fprintf(stderr, "needs 2..%d GPUs, found %d\n", kMaxRanks, R);
    return 2;
  }
  const int P = R - 1;
  const long rows = o.mb_per_peer * (1 << 20) / o.row_bytes;
  const size_t slot = size_t(rows) * o.row_bytes;
  // src[g]: P slots (rows bound for each peer); dst[g]: P slots (rows from each peer).
  std::vector<char*> src(R), dst(R), loc(R);
  std::vector<cudaStream_t> stream(R);
  std::vector<std::vector<cudaStream_t>> pair_stream(R, std::vector<cudaStream_t>(R));
  for (int g = 0; g < R; ++g) {
    CHECK(cudaSetDevice(g));
    for (int p = 0; p < R; ++p)
      if (p != g) CHECK(cudaDeviceEnablePeerAccess(p, 0));
    CHECK(cudaMalloc(&src[g], slot * P));
    CHECK(cudaMalloc(&dst[g], slot * P));
    CHECK(cudaMalloc(&loc[g], slot * P));
    CHECK(cudaMemset(src[g], g + 1, slot * P));
    CHECK(cudaStreamCreateWithFlags(&stream[g], cudaStreamNonBlocking));
    for (int p = 0; p < R; ++p) CHECK(cudaStreamCreateWithFlags(&pair_stream[g][p], cudaStreamNonBlocking));
    CHECK(cudaFuncSetAttribute(tma_copy_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               200 * 1024));
    CHECK(cudaFuncSetAttribute(tma_chunked_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               200 * 1024));
  }
  // peer index q of GPU g (q < P) is GPU (g + 1 + q) % R; g writes into slot of its own
  // index in the peer's dst, i.e. the peer sees g at index (g - peer - 1) mod R.
  auto peer_of = [&](int g, int q) { return (g + 1 + q) % R; };
  auto index_at = [&](int peer, int g) { return ((g - peer - 1) % R + R) % R; };
  auto job = [&](int g, bool pull) {
    Job j{};
    j.peers = P;
    j.rows_per_peer = rows;
    j.row_bytes = o.row_bytes;
    for (int q = 0; q < P; ++q) {
      const int p = peer_of(g, q);
      if (!pull) {  // my rows for p -> p's slot for me
        j.src[q] = src[g] + q * slot;
        j.dst[q] = dst[p] + index_at(p, g) * slot;
        if (o.local_copy) j.local[q] = loc[g] + q * slot;
      } else {      // p's rows for me -> my slot for p
        j.src[q] = src[p] + index_at(p, g) * slot;
        j.dst[q] = dst[g] + q * slot;
      }
    }
    return j;
  };
  const int senders = o.one_way ? 1 : R;
  printf("{\"gpus\": %d, \"one_way\": %s, \"local_copy\": %s, \"row_bytes\": %d, "
         "\"mb_per_peer\": %ld, \"reps\": %d, \"results\": [\n",
         R, o.one_way ? "true" : "false", o.local_copy ? "true" : "false", o.row_bytes,
         o.mb_per_peer, o.reps);
  bool first_row = true;
  auto report = [&](const std::string& m, int sms, int warps, double us) {
    const double gbs = double(slot) * P / (us * 1e3);
    printf("%s  {\"method\": \"%s\", \"sms\": %d, \"warps_per_sm\": %d, \"us\": %.1f, "
           "\"gb_per_s_per_gpu\": %.1f}",
           first_row ? "" : ",\n", m.c_str(), sms, warps, us, gbs);
    fprintf(stderr, "%-6s sms=%3d warps=%2d  %8.1f us  %6.1f GB/s per GPU\n", m.c_str(), sms,
            warps, us, gbs);
    first_row = false;
  };
  // Times `launch(g)` on every sending GPU, reps times, all GPUs at once; returns the
  // slowest GPU's microseconds per rep.
  auto time_all = [&](auto launch) {
    std::vector<cudaEvent_t> start(R), stop(R);
    for (int g = 0; g < senders; ++g) {
      CHECK(cudaSetDevice(g));
      launch(g);  // warm-up
      CHECK(cudaEventCreate(&start[g]));
      CHECK(cudaEventCreate(&stop[g]));
    }
    for (int g = 0; g < senders; ++g) {
      CHECK(cudaSetDevice(g));
      CHECK(cudaDeviceSynchronize());
    }
    for (int g = 0; g < senders; ++g) {
      CHECK(cudaSetDevice(g));
      CHECK(cudaEventRecord(start[g], stream[g]));
    }
    for (int r = 0; r < o.reps; ++r)
      for (int g = 0; g < senders; ++g) {
        CHECK(cudaSetDevice(g));
        launch(g);
      }
    double worst = 0;
    for (int g = 0; g < senders; ++g) {
      CHECK(cudaSetDevice(g));
      CHECK(cudaEventRecord(stop[g], stream[g]));
      CHECK(cudaEventSynchronize(stop[g]));
      float ms = 0;
      CHECK(cudaEventElapsedTime(&ms, start[g], stop[g]));
      worst = std::max(worst, double(ms) * 1e3 / o.reps);
      CHECK(cudaEventDestroy(start[g]));
      CHECK(cudaEventDestroy(stop[g]));
    }
    return worst;
  };
  for (const std::string& m : o.methods) {
    if (m == "ce") {
      const double us = time_all([&](int g) {
        // one stream per pair so the copies run concurrently; joined into stream[g]
        cudaEvent_t ev;
        CHECK(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
        CHECK(cudaEventRecord(ev, stream[g]));
        for (int q = 0; q < P; ++q) {
          const int p = peer_of(g, q);
          CHECK(cudaStreamWaitEvent(pair_stream[g][p], ev));
          CHECK(cudaMemcpyPeerAsync(dst[p] + index_at(p, g) * slot, p, src[g] + q * slot, g,
                                    slot, pair_stream[g][p]));
          cudaEvent_t done;
          CHECK(cudaEventCreateWithFlags(&done, cudaEventDisableTiming));
          CHECK(cudaEventRecord(done, pair_stream[g][p]));
          CHECK(cudaStreamWaitEvent(stream[g], done));
          CHECK(cudaEventDestroy(done));
        }
        CHECK(cudaEventDestroy(ev));
      });
      report(m, 0, 0, us);
      continue;
    }
    if (m != "store" && m != "pull" && m != "tma" && m != "tma_chunked") {
      fprintf(stderr, "unknown method %s\n", m.c_str());
      return 2;
    }
    for (int warps : m == "tma" ? o.tma_warps : o.warps) {
      const size_t smem = m == "tma_chunked" ? size_t(warps) * 2 * kChunkBytes
                                             : size_t(warps) * kStages * o.row_bytes;
      if (m.rfind("tma", 0) == 0 && (warps > 32 || smem > 200 * 1024)) continue;  // > one SM
      for (int sms : o.sms) {
        const double us = time_all([&](int g) {
          const Job j = job(g, m == "pull");
          if (m == "tma")
            tma_copy_kernel<<<sms, warps * 32, smem, stream[g]>>>(j);
          else if (m == "tma_chunked")
            tma_chunked_kernel<<<sms, warps * 32, smem, stream[g]>>>(j);
          else
            warp_copy_kernel<<<sms, warps * 32, 0, stream[g]>>>(j);
          CHECK(cudaGetLastError());
        });
        report(m, sms, warps, us);
      }
    }
  }
  printf("\n]}\n");
  // Check one row of what arrived: every byte of GPU g's rows is g + 1.
  for (int g = 0; g < senders; ++g) {
    const int p = peer_of(g, 0);
    unsigned char b = 0;
    CHECK(cudaSetDevice(p));
    CHECK(cudaMemcpy(&b, dst[p] + index_at(p, g) * slot + slot - 1, 1, cudaMemcpyDeviceToHost));
    if (b != g + 1) {
      fprintf(stderr, "data check failed: GPU %d's rows at GPU %d read %d\n", g, p, b);
      return 1;
    }
  }
  return 0;
}
