// The grouped matmul's entry points: each GroupedKind's CUTLASS GEMM (kinds.h) in the tile
// configuration grouped_tiles() picks. The workspace size and the launch both go through
// the same choice, so the workspace always fits the kernel that runs.
#include "cuda/grouped_matmul/grouped_matmul.h"
#include "cuda/grouped_matmul/kinds.h"

namespace jax_ep {

const char* grouped_tiles_name(GroupedTiles tiles) {
  return tiles == GroupedTiles::kSmall ? "64x256x64 pingpong, cluster 1x2"
                                       : "128x256x64 cooperative, cluster 1x2";
}

size_t grouped_matmul_workspace_bytes(const GroupedMatmulArgs& args) {
  const bool small = grouped_tiles(args) == GroupedTiles::kSmall;
  switch (args.kind) {
    case GroupedKind::kForward:
      return small ? grouped::forward_small_workspace_bytes(args)
                   : grouped::forward_workspace_bytes(args);
    case GroupedKind::kTransposedRhs:
      return small ? grouped::transposed_rhs_small_workspace_bytes(args)
                   : grouped::transposed_rhs_workspace_bytes(args);
    case GroupedKind::kWeightGrad:
      return small ? grouped::weight_grad_small_workspace_bytes(args)
                   : grouped::weight_grad_workspace_bytes(args);
  }
  return 0;
}

cudaError_t grouped_matmul(const GroupedMatmulArgs& args, void* workspace,
                           size_t workspace_bytes, cudaStream_t stream, const char** why) {
  const bool small = grouped_tiles(args) == GroupedTiles::kSmall;
  switch (args.kind) {
    case GroupedKind::kForward:
      return small ? grouped::forward_small_run(args, workspace, workspace_bytes, stream, why)
                   : grouped::forward_run(args, workspace, workspace_bytes, stream, why);
    case GroupedKind::kTransposedRhs:
      return small
                 ? grouped::transposed_rhs_small_run(args, workspace, workspace_bytes, stream, why)
                 : grouped::transposed_rhs_run(args, workspace, workspace_bytes, stream, why);
    case GroupedKind::kWeightGrad:
      return small ? grouped::weight_grad_small_run(args, workspace, workspace_bytes, stream, why)
                   : grouped::weight_grad_run(args, workspace, workspace_bytes, stream, why);
  }
  *why = "unknown kind";
  return cudaErrorInvalidValue;
}

}  // namespace jax_ep
