// The ring test kernel as ring.cu exports it (a function pointer: runtime.cu launches it).
#pragma once

#include <cstddef>
#include <cstdint>

namespace jax_ep::nvshmem {

constexpr int kRingThreads = 512;  // one block
using RingKernel = void (*)(uint8_t* sym, uint64_t* sig, int* id, size_t n, uint64_t round,
                            unsigned long long* bad_bytes, unsigned long long* bad_ids);
extern const RingKernel kRingKernel;

}  // namespace jax_ep::nvshmem
