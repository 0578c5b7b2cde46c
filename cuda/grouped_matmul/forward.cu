// GroupedKind::kForward, tiles for large groups (128x256 cooperative): A Row-major, B
// Row-major (see cutlass_grouped.cuh).
#include "cuda/grouped_matmul/cutlass_grouped.cuh"
#include "cuda/grouped_matmul/kinds.h"

namespace jax_ep {
namespace grouped {

JAX_EP_GROUPED_GEMM_LARGE(ForwardGemm, cutlass::layout::RowMajor, cutlass::layout::RowMajor);
JAX_EP_GROUPED_ENTRIES(forward, ForwardGemm, GroupedKind::kForward)

}  // namespace grouped
}  // namespace jax_ep
