// One process per GPU: an op's rows travel through the staging area of the
// communication buffer (CUDA IPC can map that, not XLA's memory), so the receiver copies
// what its peers wrote there into its XLA outputs. The row count is known only on the
// device (after the count exchange), hence a kernel rather than cudaMemcpyAsync.
#include "cuda/intranode/kernels.h"

namespace jax_ep {
namespace {

__global__ void __launch_bounds__(kStagedCopyThreads) staged_copy_kernel(StagedCopy c) {
  const long long rows = c.num_rows != nullptr ? *c.num_rows : c.fixed_rows;
  const long long stride = (long long)gridDim.x * blockDim.x;
  for (int p = 0; p < c.num; ++p) {
    // Every slot starts 256-byte aligned: 16-byte words, then the tail byte by byte.
    const long long bytes = rows * c.row_bytes[p];
    const long long n16 = bytes / 16;
    const int4* s16 = reinterpret_cast<const int4*>(c.src[p]);
    int4* d16 = reinterpret_cast<int4*>(c.dst[p]);
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n16; i += stride)
      d16[i] = s16[i];
    for (long long i = n16 * 16 + (long long)blockIdx.x * blockDim.x + threadIdx.x; i < bytes;
         i += stride)
      c.dst[p][i] = c.src[p][i];
  }
}

}  // namespace

void (*const kStagedCopyKernel)(StagedCopy c) = staged_copy_kernel;

}  // namespace jax_ep
