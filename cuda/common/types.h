// Element types and row layouts the kernels of every family share (plain C++).
#pragma once

namespace jax_ep {

// Row layouts of the normal ops: grouped by source rank, or by local expert.
enum class Layout : int { kRank = 0, kExpert = 1 };
// Float types the kernels move and reduce (index of the kernel tables).
enum class ElemType : int { kBF16 = 0, kF16 = 1, kF32 = 2 };

}  // namespace jax_ep
