// GroupedKind::kWeightGrad, tiles for small groups (64x256 pingpong): A Column-major, B
// Row-major (see cutlass_grouped.cuh).
#include "cuda/grouped_matmul/cutlass_grouped.cuh"
#include "cuda/grouped_matmul/kinds.h"

namespace jax_ep {
namespace grouped {

JAX_EP_GROUPED_GEMM_SMALL(WeightGradSmallGemm, cutlass::layout::ColumnMajor,
                          cutlass::layout::RowMajor);
JAX_EP_GROUPED_ENTRIES(weight_grad_small, WeightGradSmallGemm, GroupedKind::kWeightGrad)

}  // namespace grouped
}  // namespace jax_ep
