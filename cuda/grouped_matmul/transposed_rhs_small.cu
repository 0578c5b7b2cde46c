// GroupedKind::kTransposedRhs, tiles for small groups (64x256 pingpong): A Row-major, B
// Column-major (see cutlass_grouped.cuh).
#include "cuda/grouped_matmul/cutlass_grouped.cuh"
#include "cuda/grouped_matmul/kinds.h"

namespace jax_ep {
namespace grouped {

JAX_EP_GROUPED_GEMM_SMALL(TransposedRhsSmallGemm, cutlass::layout::RowMajor,
                          cutlass::layout::ColumnMajor);
JAX_EP_GROUPED_ENTRIES(transposed_rhs_small, TransposedRhsSmallGemm, GroupedKind::kTransposedRhs)

}  // namespace grouped
}  // namespace jax_ep
