// Registry of communication buffers: (buffer id, device ordinal) -> this GPU's rank in
// the EP group and every rank's buffer as mapped on this GPU.
//
// Single-process mode (one process drives all local GPUs): the buffers are plain
// cudaMalloc allocations and peers reach each other through CUDA peer access, so the
// "mapping" of a peer's buffer is its raw pointer.
//
// Multi-process mode (one process per GPU, jax.distributed): each process allocates its
// GPU's buffer and a staging area and exports CUDA IPC handles of both (export_buffer);
// the blobs travel through jax.distributed's key-value store; then each process opens its
// peers' handles (import_peers). XLA's own memory cannot be shared between processes (its
// allocations refuse IPC export), so an op publishes addresses in its staging area
// instead of its XLA buffers, and copies between the two locally; a peer's published
// address plus ptr_delta[peer] is the same memory mapped in this process.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "cuda/common/buffer_layout.h"

namespace jax_ep {

struct BufferState {
  int rank = -1;        // this GPU's position along the EP axis
  int num_ranks = 0;
  int device = -1;      // CUDA device ordinal (= XLA's local device ordinal)
  size_t num_bytes = 0;
  char* peers[kMaxRanks] = {};  // peers[rank] is the local buffer
  int64_t ptr_delta[kMaxRanks] = {};  // see PeerBases::ptr_delta
  // Multi-process: this GPU's staging area, where every address it publishes lies.
  char* staging = nullptr;
  size_t staging_bytes = 0;
  bool multi_process = false;
};

// Allocates `num_bytes` on each device (devices[r] is EP rank r), zeroes it, enables
// peer access between every pair and registers the buffers. Returns "" or an error.
std::string create_buffer(int64_t buffer_id, const std::vector<int>& devices, size_t num_bytes);

// Multi-process, step 1: allocates and zeroes this process's buffer and staging area on
// `device`, and fills `blob` with what peers need to map them. Returns "" or an error.
std::string export_buffer(int64_t buffer_id, int device, size_t num_bytes,
                          size_t staging_bytes, std::string* blob);

// Multi-process, step 2: blobs[r] is EP rank r's export (ours at `rank`); opens every
// peer's buffer and staging area and registers the buffer. Returns "" or an error.
std::string import_peers(int64_t buffer_id, int device, int rank,
                         const std::vector<std::string>& blobs);

// Multi-process teardown, step 1 (before a cross-process barrier): waits for this
// process's GPUs and closes the mappings of peers' buffers. destroy_buffer then frees.
void unmap_peers(int64_t buffer_id);

// Waits for each device to go idle, then frees. Unknown ids are ignored.
void destroy_buffer(int64_t buffer_id);

// nullptr when this (id, device) pair is not registered.
const BufferState* find_buffer(int64_t buffer_id, int device);

}  // namespace jax_ep
