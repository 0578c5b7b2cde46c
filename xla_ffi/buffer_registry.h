// Registry of communication buffers: (buffer id, device ordinal) -> this GPU's rank in
// the EP group and every rank's buffer as mapped on this GPU.
//
// Single-process mode (one process drives all local GPUs): the buffers are plain
// cudaMalloc allocations and peers reach each other through CUDA peer access, so the
// "mapping" of a peer's buffer is its raw pointer. A multi-process mode fills the same
// entries with IPC-opened pointers (one entry per local device of the process).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "cuda/buffer_layout.h"

namespace jax_ep {

struct BufferState {
  int rank = -1;        // this GPU's position along the EP axis
  int num_ranks = 0;
  int device = -1;      // CUDA device ordinal (= XLA's local device ordinal)
  size_t num_bytes = 0;
  char* peers[kMaxRanks] = {};  // peers[rank] is the local buffer
};

// Allocates `num_bytes` on each device (devices[r] is EP rank r), zeroes it, enables
// peer access between every pair and registers the buffers. Returns "" or an error.
std::string create_buffer(int64_t buffer_id, const std::vector<int>& devices, size_t num_bytes);

// Waits for each device to go idle, then frees. Unknown ids are ignored.
void destroy_buffer(int64_t buffer_id);

// nullptr when this (id, device) pair is not registered.
const BufferState* find_buffer(int64_t buffer_id, int device);

}  // namespace jax_ep
