// Grouped matmul over rows grouped by expert (jax_ep's expert layout): one CUTLASS SM90
// grouped GEMM whose per-group problem sizes are built on the device from group_sizes,
// so no host synchronisation. BF16 operands, fp32 accumulation, BF16 result.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace jax_ep {

// What the GEMM computes for group g (rows [o_g, o_g + m_g) of the row operands, where
// o_g is the sum of the earlier group sizes, every size clamped to the rows left):
//   kForward:       out[o_g + i, :] = a[o_g + i, :] @ b[g]         a [M, K], b [G, K, N]
//   kTransposedRhs: out[o_g + i, :] = a[o_g + i, :] @ b[g]^T       a [M, N], b [G, K, N]
//   kWeightGrad:    out[g]          = a[o_g : o_g+m_g]^T @ b[o_g : o_g+m_g]
//                                                                  a [M, K], b [M, N]
// Rows of out past the last group (kForward, kTransposedRhs) and the out[g] of empty
// groups (kWeightGrad) are zeros.
enum class GroupedKind { kForward = 0, kTransposedRhs = 1, kWeightGrad = 2 };

struct GroupedMatmulArgs {
  GroupedKind kind;
  const void* a;
  const void* b;
  void* out;
  const int32_t* group_sizes;  // [num_groups], on the device
  int num_groups;
  int64_t rows;                // M
  int64_t k, n;                // b[g] is [k, n] (kWeightGrad: out[g] is [k, n])
};

// The two tile configurations of cutlass_grouped.cuh, and the one rule that picks one per
// call from static shapes only: the mean rows per group, rows / num_groups (the operand's
// row count, padding included: the sizes themselves stay on the device). Below
// kSmallGroupRows, 64x256 pingpong tiles; otherwise 128x256 cooperative. Every kind takes
// the same rule (kWeightGrad's reduction runs over the group's rows). 512 lies between the
// two measured MoE shapes: ~820 rows per group (32 experts, 128x256 at 577 useful
// TFLOP/s) keeps the large tiles; ~410 (64 experts, 393 TFLOP/s) and the ~128 of 256
// local experts at EP1 take the small ones. The masked layout's G * S rows give S, an
// upper bound of its live rows, so it takes the small tiles only for S < 512.
enum class GroupedTiles { kLarge = 0, kSmall = 1 };
constexpr int64_t kSmallGroupRows = 512;

inline GroupedTiles grouped_tiles(const GroupedMatmulArgs& args) {
  return args.rows < kSmallGroupRows * args.num_groups ? GroupedTiles::kSmall
                                                       : GroupedTiles::kLarge;
}

// "128x256x64 cooperative, cluster 1x2" or "64x256x64 pingpong, cluster 1x2".
const char* grouped_tiles_name(GroupedTiles tiles);

// Bytes of device workspace grouped_matmul needs for these sizes.
size_t grouped_matmul_workspace_bytes(const GroupedMatmulArgs& args);

// Enqueues the op on `stream`; `workspace` holds grouped_matmul_workspace_bytes(args).
// Returns cudaErrorInvalidValue when CUTLASS cannot run the shapes (k or n not a
// multiple of 8), with a message in *why.
cudaError_t grouped_matmul(const GroupedMatmulArgs& args, void* workspace,
                           size_t workspace_bytes, cudaStream_t stream, const char** why);

}  // namespace jax_ep
