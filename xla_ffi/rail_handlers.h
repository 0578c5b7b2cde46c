// The internode path's FFI handler (the rail exchange, cuda/internode/rail.h) and the
// registry of the symmetric regions it runs on; part of jax_ep._jax_ep_nvshmem.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace jax_ep::internode {

// Registers the symmetric region `ptr` (`num_bytes`, from nvshmem_malloc) of Buffer
// `buffer_id` on this PE: this rank is on node `my_node`, pes[m] is the PE of the rank with
// its local index on node m. Zeroes the region's header. Returns an error message or "".
std::string register_rail(int64_t buffer_id, uintptr_t ptr, size_t num_bytes, int my_node,
                          int my_pe, const std::vector<int>& pes);
// Forgets the region (the caller frees it); "" or an error message.
std::string unregister_rail(int64_t buffer_id);

}  // namespace jax_ep::internode

XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxEpRailExchange);
