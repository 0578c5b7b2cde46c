// Registry of the low-latency regions of EP groups that span several nodes: (buffer id,
// device ordinal) -> this GPU's rank in the group, every rank's region as this GPU reaches
// it (mapped inside the node, nullptr across nodes), the NVSHMEM PE of every rank, and the
// launchers over stores and NVSHMEM puts (from jax_ep._jax_ep_nvshmem). Groups inside one
// node are not registered here: their regions are part of the communication buffer
// (buffer_registry.h).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "cuda/low_latency/low_latency.h"

namespace jax_ep {

// The ranks of one op's EP group as the kernels reach them, and how to launch: what the
// low-latency handlers need, from this registry or from a one-node communication buffer.
struct LLEndpoint {
  LLPeers peers{};
  int rank = -1, num_ranks = 0;
  size_t half_bytes = 0;  // available in each half
  size_t num_bytes = 0;   // of the buffer (one node) or of each rank's symmetric region
  bool symmetric = false;
  const LLLaunchers* launchers = nullptr;
};

// regions[r]: rank r's region as mapped on this GPU, 0 for a rank of another node;
// regions[rank] is this GPU's own (symmetric) region. Zeroes its header (the caller must
// pass a barrier over every rank before the first op). Returns "" or an error.
std::string register_ll_symmetric(int64_t buffer_id, int device, int rank,
                                  const std::vector<uint64_t>& regions,
                                  const std::vector<int>& pes, size_t num_bytes,
                                  const LLLaunchers* launchers);

// Waits for the device to go idle, then forgets the region. Unknown ids are ignored.
void unregister_ll_symmetric(int64_t buffer_id);

// nullptr when this (id, device) pair is not registered.
const LLEndpoint* find_ll_symmetric(int64_t buffer_id, int device);

}  // namespace jax_ep
