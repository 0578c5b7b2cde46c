// GroupedKind::kForward, tiles for small groups (64x256 pingpong): A Row-major, B Row-major
// (see cutlass_grouped.cuh).
#include "cuda/grouped_matmul/cutlass_grouped.cuh"
#include "cuda/grouped_matmul/kinds.h"

namespace jax_ep {
namespace grouped {

JAX_EP_GROUPED_GEMM_SMALL(ForwardSmallGemm, cutlass::layout::RowMajor, cutlass::layout::RowMajor);
JAX_EP_GROUPED_ENTRIES(forward_small, ForwardSmallGemm, GroupedKind::kForward)

}  // namespace grouped
}  // namespace jax_ep
