// GroupedKind::kTransposedRhs, tiles for large groups (128x256 cooperative): A Row-major, B
// Column-major (see cutlass_grouped.cuh).
#include "cuda/grouped_matmul/cutlass_grouped.cuh"
#include "cuda/grouped_matmul/kinds.h"

namespace jax_ep {
namespace grouped {

JAX_EP_GROUPED_GEMM_LARGE(TransposedRhsGemm, cutlass::layout::RowMajor,
                          cutlass::layout::ColumnMajor);
JAX_EP_GROUPED_ENTRIES(transposed_rhs, TransposedRhsGemm, GroupedKind::kTransposedRhs)

}  // namespace grouped
}  // namespace jax_ep
