// GroupedKind::kWeightGrad, tiles for large groups (128x256 cooperative): A Column-major, B
// Row-major (see cutlass_grouped.cuh).
#include "cuda/grouped_matmul/cutlass_grouped.cuh"
#include "cuda/grouped_matmul/kinds.h"

namespace jax_ep {
namespace grouped {

JAX_EP_GROUPED_GEMM_LARGE(WeightGradGemm, cutlass::layout::ColumnMajor, cutlass::layout::RowMajor);
JAX_EP_GROUPED_ENTRIES(weight_grad, WeightGradGemm, GroupedKind::kWeightGrad)

}  // namespace grouped
}  // namespace jax_ep
