// XLA FFI handlers of the grouped matmul (cuda/grouped_matmul/): operand shapes are
// checked here; the workspace is the call's second result, sized by the Python side
// with grouped_matmul_workspace_bytes (buffer_bindings.cc), so that the tables CUTLASS
// reads live as long as the kernels that read them.
#include <string>

#include "cuda/grouped_matmul/grouped_matmul.h"
#include "xla_ffi/ffi_common.h"

namespace jax_ep {
namespace {

std::string dims(ffi::Span<const int64_t> d) {
  std::string s = "[";
  for (size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + std::to_string(d[i]);
  return s + "]";
}

ffi::Error run_grouped(const std::string& op, const GroupedMatmulArgs& args,
                       ffi::Result<ffi::Buffer<ffi::U8>>& workspace, cudaStream_t stream) {
  const size_t need = grouped_matmul_workspace_bytes(args);
  if (workspace->element_count() < need)
    return invalid(op, "workspace of " + std::to_string(workspace->element_count()) +
                           " bytes, the kernel needs " + std::to_string(need));
  const char* why = "";
  cudaError_t err = grouped_matmul(args, workspace->untyped_data(), workspace->element_count(),
                                   stream, &why);
  if (err == cudaErrorInvalidValue) return invalid(op, why);
  if (err != cudaSuccess)
    return ffi::Error(ffi::ErrorCode::kInternal, "jax_ep: " + op + ": " + why + " (" +
                                                     cudaGetErrorString(err) + ")");
  return ffi::Error::Success();
}

// out [M, N] = rows of a [M, K] times b[g] [K, N]; transpose_rhs: a [M, N] times
// b[g]^T, out [M, K].
ffi::Error GroupedMatmulImpl(cudaStream_t stream, ffi::Buffer<ffi::BF16> a,
                             ffi::Buffer<ffi::BF16> b, ffi::Buffer<ffi::S32> group_sizes,
                             ffi::Result<ffi::Buffer<ffi::BF16>> out,
                             ffi::Result<ffi::Buffer<ffi::U8>> workspace, bool transpose_rhs) {
  const std::string op = "grouped_matmul";
  const auto ad = a.dimensions(), bd = b.dimensions(), gd = group_sizes.dimensions();
  if (ad.size() != 2 || bd.size() != 3 || gd.size() != 1 || gd[0] != bd[0])
    return invalid(op, "expected a [M, K], b [G, K, N], group_sizes [G]; got " + dims(ad) +
                           ", " + dims(bd) + ", " + dims(gd));
  const int64_t inner = transpose_rhs ? bd[2] : bd[1];
  const int64_t outer = transpose_rhs ? bd[1] : bd[2];
  const auto od = out->dimensions();
  if (ad[1] != inner || od.size() != 2 || od[0] != ad[0] || od[1] != outer)
    return invalid(op, "a " + dims(ad) + " and b " + dims(bd) + " do not give out " + dims(od));
  GroupedMatmulArgs args{transpose_rhs ? GroupedKind::kTransposedRhs : GroupedKind::kForward,
                         a.untyped_data(), b.untyped_data(), out->untyped_data(),
                         group_sizes.typed_data(), int(bd[0]), ad[0], bd[1], bd[2]};
  return run_grouped(op, args, workspace, stream);
}

// out[g] [K, N] = (rows of a [M, K])^T times (rows of b [M, N]), over group g's rows.
ffi::Error GroupedMatmulWeightGradImpl(cudaStream_t stream, ffi::Buffer<ffi::BF16> a,
                                       ffi::Buffer<ffi::BF16> b,
                                       ffi::Buffer<ffi::S32> group_sizes,
                                       ffi::Result<ffi::Buffer<ffi::BF16>> out,
                                       ffi::Result<ffi::Buffer<ffi::U8>> workspace) {
  const std::string op = "grouped_matmul (weight gradient)";
  const auto ad = a.dimensions(), bd = b.dimensions(), gd = group_sizes.dimensions();
  const auto od = out->dimensions();
  if (ad.size() != 2 || bd.size() != 2 || gd.size() != 1 || ad[0] != bd[0] ||
      od.size() != 3 || od[0] != gd[0] || od[1] != ad[1] || od[2] != bd[1])
    return invalid(op, "expected a [M, K], b [M, N], group_sizes [G], out [G, K, N]; got " +
                           dims(ad) + ", " + dims(bd) + ", " + dims(gd) + ", " + dims(od));
  GroupedMatmulArgs args{GroupedKind::kWeightGrad, a.untyped_data(), b.untyped_data(),
                         out->untyped_data(), group_sizes.typed_data(), int(gd[0]), ad[0],
                         ad[1], bd[1]};
  return run_grouped(op, args, workspace, stream);
}

}  // namespace
}  // namespace jax_ep

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxEpGroupedMatmul, jax_ep::GroupedMatmulImpl,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::BF16>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::BF16>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()
                                  .Ret<xla::ffi::Buffer<xla::ffi::BF16>>()
                                  .Ret<xla::ffi::Buffer<xla::ffi::U8>>()
                                  .Attr<bool>("transpose_rhs"),
                              {xla::ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxEpGroupedMatmulWeightGrad, jax_ep::GroupedMatmulWeightGradImpl,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::BF16>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::BF16>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()
                                  .Ret<xla::ffi::Buffer<xla::ffi::BF16>>()
                                  .Ret<xla::ffi::Buffer<xla::ffi::U8>>(),
                              {xla::ffi::Traits::kCmdBufferCompatible});
