// The CUTLASS SM90 grouped GEMM behind jax_ep's grouped matmul, for one pair of operand
// layouts, and the device-side set-up that turns group_sizes into its per-group problem
// sizes, pointers and strides. Each GroupedKind instantiates it in its own .cu file
// (forward.cu, transposed_rhs.cu, weight_grad.cu) so that the three compile in parallel.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <mutex>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/group_array_problem_shape.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"
#include "cuda/grouped_matmul/grouped_matmul.h"

namespace jax_ep {
namespace grouped {

using Bf16 = cutlass::bfloat16_t;
constexpr int kMaxGroups = 4096;  // the set-up kernel keeps every group's offset in smem
constexpr int kAlign = 8;         // elements per 16 bytes: TMA needs 16-byte row strides
constexpr size_t kSection = 256;  // workspace sections start at this alignment

inline size_t round_up(size_t v) { return (v + kSection - 1) / kSection * kSection; }

// JAX_EP_GROUPED_GEMM(Name, LayoutA, LayoutB) defines struct Name: the CUTLASS types of
// one operand layout pair. 128x256 tiles (an expert's few hundred rows waste at most one
// partial 128-row tile; N = 2048 and 7168 are multiples of 256), a 1x2 cluster sharing
// the A tile over TMA multicast, the cooperative (two consumer warp groups) schedule, no
// C operand (beta = 0). A macro, not a class template: g++ 12 fails to instantiate the
// CUTLASS collective builders inside a class template, but not at namespace scope.
#define JAX_EP_GROUPED_GEMM(Name, LayoutA_, LayoutB_)                                       \
  struct Name {                                                                            \
    using ProblemShape = cutlass::gemm::GroupProblemShape<cute::Shape<int, int, int>>;     \
    using TileShape = cute::Shape<cute::_128, cute::_256, cute::_64>;                      \
    using ClusterShape = cute::Shape<cute::_1, cute::_2, cute::_1>;                        \
    using LayoutD = cutlass::layout::RowMajor;                                             \
    using Epilogue = cutlass::epilogue::collective::CollectiveBuilder<                     \
        cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,      \
        cutlass::epilogue::collective::EpilogueTileAuto, float, float, Bf16, LayoutD*,     \
        kAlign, Bf16, LayoutD*, kAlign,                                                     \
        cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative,                          \
        cutlass::epilogue::fusion::LinearCombination<Bf16, float, Bf16, float>>::CollectiveOp; \
    using Mainloop = cutlass::gemm::collective::CollectiveBuilder<                         \
        cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Bf16, LayoutA_*, kAlign, Bf16, \
        LayoutB_*, kAlign, float, TileShape, ClusterShape,                                 \
        cutlass::gemm::collective::StageCountAutoCarveout<                                 \
            static_cast<int>(sizeof(Epilogue::SharedStorage))>,                            \
        cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative>::CollectiveOp;         \
    using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, Mainloop, Epilogue>; \
    using Device = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;                    \
    using Shape = ProblemShape::UnderlyingProblemShape;                                    \
    using StrideA = Kernel::InternalStrideA;                                               \
    using StrideB = Kernel::InternalStrideB;                                               \
    using StrideD = Kernel::InternalStrideD;                                               \
  }

// The per-group arrays CUTLASS reads, carved from the workspace in this order.
template <class G>
struct Tables {
  typename G::Shape* shapes;
  const Bf16** ptr_a;
  const Bf16** ptr_b;
  Bf16** ptr_d;
  typename G::StrideA* stride_a;
  typename G::StrideB* stride_b;
  typename G::StrideD* stride_d;
  int64_t* offsets;  // [groups + 1]: where each group's rows start (sizes clamped)
  char* cutlass_workspace;

  static size_t bytes(int groups) {
    return round_up(sizeof(typename G::Shape) * groups) + 3 * round_up(sizeof(void*) * groups) +
           round_up(sizeof(typename G::StrideA) * groups) +
           round_up(sizeof(typename G::StrideB) * groups) +
           round_up(sizeof(typename G::StrideD) * groups) +
           round_up(sizeof(int64_t) * (groups + 1));
  }

  static Tables carve(void* workspace, int groups) {
    char* p = static_cast<char*>(workspace);
    auto take = [&p](size_t n) {
      char* q = p;
      p += round_up(n);
      return q;
    };
    Tables t;
    t.shapes = reinterpret_cast<typename G::Shape*>(take(sizeof(typename G::Shape) * groups));
    t.ptr_a = reinterpret_cast<const Bf16**>(take(sizeof(void*) * groups));
    t.ptr_b = reinterpret_cast<const Bf16**>(take(sizeof(void*) * groups));
    t.ptr_d = reinterpret_cast<Bf16**>(take(sizeof(void*) * groups));
    t.stride_a = reinterpret_cast<typename G::StrideA*>(take(sizeof(typename G::StrideA) * groups));
    t.stride_b = reinterpret_cast<typename G::StrideB*>(take(sizeof(typename G::StrideB) * groups));
    t.stride_d = reinterpret_cast<typename G::StrideD*>(take(sizeof(typename G::StrideD) * groups));
    t.offsets = reinterpret_cast<int64_t*>(take(sizeof(int64_t) * (groups + 1)));
    t.cutlass_workspace = p;
    return t;
  }
};

// One block: thread 0 turns the sizes into clamped offsets, then every thread fills the
// tables of its groups. CUTLASS's (M, N, K) per kind:
//   kForward        (m_g, n, k)  A = a rows (row-major), B = b[g] [k, n] (row-major)
//   kTransposedRhs  (m_g, k, n)  A = a rows [m_g, n],    B = b[g]^T (column-major view)
//   kWeightGrad     (k, n, m_g)  A = a rows^T (column-major view), B = b rows [m_g, n]
template <class G, GroupedKind kKind>
__global__ void __launch_bounds__(256) set_up(GroupedMatmulArgs args, Tables<G> t) {
  __shared__ int64_t offset[kMaxGroups + 1];
  if (threadIdx.x == 0) {
    int64_t o = 0;
    for (int g = 0; g < args.num_groups; ++g) {
      offset[g] = o;
      int64_t m = args.group_sizes[g];
      m = m < 0 ? 0 : (m > args.rows - o ? args.rows - o : m);
      o += m;
    }
    offset[args.num_groups] = o;
  }
  __syncthreads();
  for (int g = threadIdx.x; g <= args.num_groups; g += blockDim.x) t.offsets[g] = offset[g];
  const Bf16* a = static_cast<const Bf16*>(args.a);
  const Bf16* b = static_cast<const Bf16*>(args.b);
  Bf16* out = static_cast<Bf16*>(args.out);
  const int k = int(args.k), n = int(args.n);
  for (int g = threadIdx.x; g < args.num_groups; g += blockDim.x) {
    const int64_t o = offset[g];
    const int m = int(offset[g + 1] - o);
    if constexpr (kKind == GroupedKind::kForward) {
      t.shapes[g] = typename G::Shape{m, n, k};
      t.ptr_a[g] = a + o * k;
      t.ptr_b[g] = b + int64_t(g) * k * n;
      t.ptr_d[g] = out + o * n;
      t.stride_a[g] = cutlass::make_cute_packed_stride(typename G::StrideA{}, {m, k, 1});
      t.stride_b[g] = cutlass::make_cute_packed_stride(typename G::StrideB{}, {n, k, 1});
      t.stride_d[g] = cutlass::make_cute_packed_stride(typename G::StrideD{}, {m, n, 1});
    } else if constexpr (kKind == GroupedKind::kTransposedRhs) {
      t.shapes[g] = typename G::Shape{m, k, n};
      t.ptr_a[g] = a + o * n;
      t.ptr_b[g] = b + int64_t(g) * k * n;
      t.ptr_d[g] = out + o * k;
      t.stride_a[g] = cutlass::make_cute_packed_stride(typename G::StrideA{}, {m, n, 1});
      t.stride_b[g] = cutlass::make_cute_packed_stride(typename G::StrideB{}, {k, n, 1});
      t.stride_d[g] = cutlass::make_cute_packed_stride(typename G::StrideD{}, {m, k, 1});
    } else {
      // An empty group gets no tiles (M = 0); out[g] is zeroed by zero_rest instead.
      t.shapes[g] = typename G::Shape{m > 0 ? k : 0, n, m};
      t.ptr_a[g] = a + o * k;
      t.ptr_b[g] = b + o * n;
      t.ptr_d[g] = out + int64_t(g) * k * n;
      t.stride_a[g] = cutlass::make_cute_packed_stride(typename G::StrideA{}, {k, m, 1});
      t.stride_b[g] = cutlass::make_cute_packed_stride(typename G::StrideB{}, {n, m, 1});
      t.stride_d[g] = cutlass::make_cute_packed_stride(typename G::StrideD{}, {k, n, 1});
    }
  }
}

// Zeros what the GEMM does not write: the rows past the last group (row results), or the
// out[g] of empty groups (kWeightGrad). 16 bytes per thread and step.
template <GroupedKind kKind>
__global__ void zero_rest(GroupedMatmulArgs args, const int64_t* offsets) {
  uint4* out = static_cast<uint4*>(args.out);
  const uint4 zero = make_uint4(0, 0, 0, 0);
  const int64_t step = int64_t(gridDim.x) * blockDim.x;
  if constexpr (kKind == GroupedKind::kWeightGrad) {
    const int64_t per_group = args.k * args.n / kAlign;
    for (int g = 0; g < args.num_groups; ++g) {
      if (offsets[g + 1] > offsets[g]) continue;
      uint4* dst = out + int64_t(g) * per_group;
      for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < per_group; i += step)
        dst[i] = zero;
    }
  } else {
    const int64_t width = (kKind == GroupedKind::kForward ? args.n : args.k) / kAlign;
    const int64_t begin = offsets[args.num_groups] * width, end = args.rows * width;
    for (int64_t i = begin + int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < end; i += step)
      out[i] = zero;
  }
}

inline int sm_count() {
  static std::once_flag once;
  static int count = 0;
  std::call_once(once, [] {
    int device = 0;
    cudaGetDevice(&device);
    if (cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
      cudaGetLastError();
      count = 132;
    }
  });
  return count;
}

template <class G>
typename G::Device::Arguments cutlass_arguments(const GroupedMatmulArgs& args, const Tables<G>& t) {
  cutlass::KernelHardwareInfo hw;
  cudaGetDevice(&hw.device_id);
  hw.sm_count = sm_count();
  typename G::Device::Arguments arguments{
      cutlass::gemm::GemmUniversalMode::kGrouped,
      {args.num_groups, t.shapes, nullptr},
      {t.ptr_a, t.stride_a, t.ptr_b, t.stride_b},
      {{}, nullptr, t.stride_d, t.ptr_d, t.stride_d},  // no C (beta = 0, ptr_C null)
      hw};
  arguments.epilogue.thread.alpha = 1.0f;
  arguments.epilogue.thread.beta = 0.0f;
  return arguments;
}

template <class G>
size_t workspace_bytes(const GroupedMatmulArgs& args) {
  Tables<G> none = Tables<G>::carve(nullptr, args.num_groups);
  return Tables<G>::bytes(args.num_groups) +
         G::Device::get_workspace_size(cutlass_arguments<G>(args, none));
}

template <class G, GroupedKind kKind>
cudaError_t run(const GroupedMatmulArgs& args, void* workspace, size_t bytes,
                cudaStream_t stream, const char** why) {
  if (args.num_groups < 1 || args.num_groups > kMaxGroups) {
    *why = "the number of groups must be between 1 and 4096";
    return cudaErrorInvalidValue;
  }
  if (args.k % kAlign || args.n % kAlign) {
    *why = "both matrix dimensions of b must be multiples of 8";
    return cudaErrorInvalidValue;
  }
  if (bytes < workspace_bytes<G>(args)) {
    *why = "workspace too small";
    return cudaErrorInvalidValue;
  }
  Tables<G> t = Tables<G>::carve(workspace, args.num_groups);
  set_up<G, kKind><<<1, 256, 0, stream>>>(args, t);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  zero_rest<kKind><<<sm_count() * 2, 256, 0, stream>>>(args, t.offsets);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  typename G::Device gemm;
  auto arguments = cutlass_arguments<G>(args, t);
  if (gemm.can_implement(arguments) != cutlass::Status::kSuccess) {
    *why = "CUTLASS cannot run these shapes";
    return cudaErrorInvalidValue;
  }
  if (gemm.initialize(arguments, t.cutlass_workspace, stream) != cutlass::Status::kSuccess) {
    *why = "CUTLASS initialisation failed";
    return cudaErrorUnknown;
  }
  if (gemm.run(stream) != cutlass::Status::kSuccess) {
    *why = "CUTLASS launch failed";
    err = cudaGetLastError();
    return err == cudaSuccess ? cudaErrorLaunchFailure : err;
  }
  return cudaGetLastError();
}

}  // namespace grouped
}  // namespace jax_ep
