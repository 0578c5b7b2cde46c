// Layout of one GPU's communication buffer (shared by host and device code).
//
// The buffer holds only routing metadata and synchronisation state: token rows move
// directly between XLA's input/output buffers of the GPUs (peer loads/stores over
// NVLink), whose addresses each rank publishes in its buffer header for every op.
// Every field is written either by this GPU ("local") or by exactly one peer at a
// known slot, so no two writers ever race.
#pragma once

#include <cstddef>
#include <cstdint>

namespace jax_ep {

constexpr int kMaxRanks = 8;         // one NVLink domain (a node)
constexpr int kMaxExperts = 1024;    // E
constexpr int kMaxTopk = 16;         // K (combine keeps one candidate row per slot)
constexpr int kMaxPublished = 8;     // XLA buffers an op exposes to its peers
constexpr int kCountRow = kMaxRanks + kMaxExperts;  // [tokens per rank | pairs per expert]

struct alignas(128) BufferHeader {
  // Number of ops run on this buffer so far (local; every rank runs the same sequence
  // of ops, so the numbers agree across ranks and tag each op's flags).
  uint64_t seq;
  // = seq once `published` holds this op's pointers (local; peers poll it).
  uint64_t ptr_seq;
  // counts_seq[s] = seq once peer s wrote its count row into count_matrix[s].
  uint64_t counts_seq[kMaxRanks];
  // Blocks of every rank add 1 when done with this GPU's published buffers; this GPU
  // waits for num_ranks * num_blocks and resets it to 0 before its op ends.
  uint32_t done_count;
  uint32_t pad0;
  uint64_t published[kMaxPublished];
};

// Local scratch the op's kernels hand to each other (never read by peers).
struct Workspace {
  int my_counts[kCountRow];     // this rank's count row, before the exchange
  int send_base[kMaxExperts];   // first row at the destination (per rank or per expert)
  int group_start[kMaxExperts]; // expert layout, receiver: first row of each local group
  int group_count[kMaxExperts]; // expert layout, receiver: real rows of each local group
  int used_rows;                // rows in use here (<= cap)
  int pad[31];
};

// Every rank's communication buffer as mapped on the calling GPU (base[me] = local).
// A peer publishes XLA buffer addresses of its own address space; adding ptr_delta[r]
// turns them into addresses of the caller's (0 in one process; in one process per GPU,
// where the peer's XLA memory pool is IPC-mapped: mapped pool base - peer's pool base).
struct PeerBases {
  char* base[kMaxRanks];
  int64_t ptr_delta[kMaxRanks];
};

constexpr size_t align_up(size_t n, size_t a) { return (n + a - 1) / a * a; }

constexpr size_t kHeaderOffset = 0;
constexpr size_t kCountMatrixOffset = align_up(sizeof(BufferHeader), 4096);
constexpr size_t kWorkspaceOffset =
    align_up(kCountMatrixOffset + sizeof(int) * kMaxRanks * kCountRow, 4096);
constexpr size_t kDupSrcOffset = align_up(kWorkspaceOffset + sizeof(Workspace), 4096);

// Bytes a buffer needs for dispatches of up to `max_rows` received rows.
constexpr size_t buffer_bytes_for_rows(size_t max_rows) {
  return kDupSrcOffset + align_up(sizeof(int) * max_rows, 4096);
}

}  // namespace jax_ep
