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

// Bytes of device workspace grouped_matmul needs for these sizes.
size_t grouped_matmul_workspace_bytes(const GroupedMatmulArgs& args);

// Enqueues the op on `stream`; `workspace` holds grouped_matmul_workspace_bytes(args).
// Returns cudaErrorInvalidValue when CUTLASS cannot run the shapes (k or n not a
// multiple of 8), with a message in *why.
cudaError_t grouped_matmul(const GroupedMatmulArgs& args, void* workspace,
                           size_t workspace_bytes, cudaStream_t stream, const char** why);

}  // namespace jax_ep
