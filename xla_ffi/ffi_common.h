// What every jax_ep FFI handler shares: error values, launch checks, the buffer lookup,
// peer bases, dtype mapping, launch-shape clamps and the per-op attribute structs' common
// spelling. Handlers only: kernel files (cuda/) never include xla_ffi/ headers.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <string>

#include "cuda/common/buffer_layout.h"  // PeerBases
#include "cuda/common/types.h"          // ElemType
#include "xla/ffi/api/ffi.h"
#include "xla_ffi/buffer_registry.h"

namespace jax_ep {

namespace ffi = xla::ffi;

// Every message names the op: "jax_ep: <op>: <what is wrong>".
inline ffi::Error invalid(const std::string& op, const std::string& msg) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument, "jax_ep: " + op + ": " + msg);
}

inline ffi::Error check_launch(cudaError_t err, const std::string& op) {
  if (err == cudaSuccess) return ffi::Error::Success();
  return ffi::Error(ffi::ErrorCode::kInternal,
                    "jax_ep: launching " + op + " failed: " + cudaGetErrorString(err));
}

// This GPU's state of the communication buffer `buffer_id`.
inline ffi::ErrorOr<const BufferState*> lookup_buffer(int64_t buffer_id, int32_t device,
                                                     const std::string& op) {
  const BufferState* s = find_buffer(buffer_id, device);
  if (s == nullptr)
    return ffi::Unexpected(invalid(op, "no communication buffer " + std::to_string(buffer_id) +
                                           " on GPU " + std::to_string(device) +
                                           " (was the jax_ep.Buffer closed, or made for other "
                                           "devices?)"));
  return s;
}

// Every rank's buffer as mapped on this GPU, and the offsets of the peers' published
// addresses (0 in one process).
inline PeerBases peer_bases(const BufferState& s) {
  PeerBases p{};
  for (int r = 0; r < s.num_ranks; ++r) {
    p.base[r] = s.peers[r];
    p.ptr_delta[r] = s.ptr_delta[r];
  }
  return p;
}

// The float types the kernels move and reduce.
inline bool elem_type_of(ffi::DataType t, ElemType* out) {
  switch (t) {
    case ffi::DataType::BF16: *out = ElemType::kBF16; return true;
    case ffi::DataType::F16: *out = ElemType::kF16; return true;
    case ffi::DataType::F32: *out = ElemType::kF32; return true;
    default: return false;
  }
}

inline size_t elem_bytes(ElemType t) { return t == ElemType::kF32 ? 4 : 2; }

inline int clamp_int(int64_t v, int lo, int hi) {
  return v < lo ? lo : (v > hi ? hi : int(v));
}

inline uint64_t addr(const void* p) { return reinterpret_cast<uint64_t>(p); }

}  // namespace jax_ep
