// XLA FFI handler of the rail exchange (cuda/internode/rail.h): checks the shapes against
// the registered symmetric region, packs the rows' layout and launches on XLA's stream.
// No host synchronisation: safe inside command buffers (CUDA graphs).
#include "xla_ffi/rail_handlers.h"

#include <cuda_runtime.h>

#include <map>
#include <mutex>

#include "cuda/internode/rail.h"
#include "cuda/nvshmem/runtime.h"

namespace ffi = xla::ffi;

namespace jax_ep::internode {
namespace {

struct RailRegion {
  char* sym;
  size_t num_bytes;
  int my_node, my_pe;
  std::vector<int> pes;
};

std::mutex g_mu;
std::map<int64_t, RailRegion> g_regions;

ffi::Error invalid(const std::string& msg) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument, "jax_ep: internode exchange: " + msg);
}

struct RailAttrs {
  int64_t buffer_id;
  int64_t num_sms;  // blocks of the send kernel, over all destinations
  int64_t op;       // RailOp (timeout messages)
};

}  // namespace

std::string register_rail(int64_t buffer_id, uintptr_t ptr, size_t num_bytes, int my_node,
                          int my_pe, const std::vector<int>& pes) {
  if (pes.empty() || int(pes.size()) > kMaxNodes)
    return "jax_ep: internode Buffer: 1 to " + std::to_string(kMaxNodes) + " nodes, got " +
           std::to_string(pes.size());
  if (my_node < 0 || my_node >= int(pes.size())) return "jax_ep: internode Buffer: bad node";
  if (num_bytes <= kRailDataOffset) return "jax_ep: internode Buffer: region too small";
  const nvshmem::Info info = nvshmem::info();
  if (!info.initialized) return "jax_ep: internode Buffer: NVSHMEM is not initialised";
  cudaError_t e = cudaSetDevice(info.device);
  if (e == cudaSuccess) e = cudaMemset(reinterpret_cast<void*>(ptr), 0, kRailDataOffset);
  if (e == cudaSuccess) e = cudaDeviceSynchronize();
  if (e != cudaSuccess)
    return std::string("jax_ep: internode Buffer: clearing the RDMA header failed: ") +
           cudaGetErrorString(e);
  std::lock_guard<std::mutex> lock(g_mu);
  g_regions[buffer_id] = RailRegion{reinterpret_cast<char*>(ptr), num_bytes, my_node, my_pe, pes};
  return "";
}

std::string unregister_rail(int64_t buffer_id) {
  std::lock_guard<std::mutex> lock(g_mu);
  if (g_regions.erase(buffer_id) == 0)
    return "jax_ep: internode Buffer " + std::to_string(buffer_id) + " is not registered";
  return "";
}

namespace {

ffi::Error RailExchangeImpl(cudaStream_t stream, ffi::Buffer<ffi::S32> send_mask,
                            ffi::RemainingArgs arrays, ffi::Result<ffi::Buffer<ffi::S32>> flags,
                            ffi::RemainingRets outs, RailAttrs attrs) {
  RailRegion region;
  {
    std::lock_guard<std::mutex> lock(g_mu);
    auto it = g_regions.find(attrs.buffer_id);
    if (it == g_regions.end())
      return invalid("no RDMA region for Buffer " + std::to_string(attrs.buffer_id) +
                     " in this process (was the jax_ep.Buffer closed?)");
    region = it->second;
  }
  const auto md = send_mask.dimensions();
  const int N = int(region.pes.size());
  if (md.size() != 2 || int(md[0]) != N)
    return invalid("send_mask must be [num_nodes=" + std::to_string(N) + ", T]");
  const int T = int(md[1]);
  const int na = int(arrays.size());
  if (na < 1 || na > kMaxRailArrays || int(outs.size()) != na)
    return invalid("1 to " + std::to_string(kMaxRailArrays) + " arrays, one result each");

  RailArgs a{};
  a.sym = region.sym;
  a.num_nodes = N;
  a.my_node = region.my_node;
  a.my_pe = region.my_pe;
  for (int m = 0; m < N; ++m) a.pes[m] = region.pes[m];
  a.num_tokens = T;
  a.num_arrays = na;
  a.op = int(attrs.op);
  size_t packed = 0;
  for (int i = 0; i < na; ++i) {
    auto in = arrays.get<ffi::AnyBuffer>(i);
    auto out = outs.get<ffi::AnyBuffer>(i);
    if (in.has_error()) return in.error();
    if (out.has_error()) return out.error();
    const auto id = in.value().dimensions();
    const auto od = out.value()->dimensions();
    if (od.size() < 2 || int(od[0]) != N || int(od[1]) != T)
      return invalid("every result must be [num_nodes, T, ...]");
    const bool per_node = id.size() == od.size();
    if (i == 0) a.per_node_rows = per_node;
    if (per_node != a.per_node_rows || in.value().element_type() != out.value()->element_type())
      return invalid("inputs must all be [T, ...] or all [num_nodes, T, ...], dtype as results");
    const size_t rows = size_t(per_node ? N : 1) * T;
    const size_t row_bytes = rows ? in.value().size_bytes() / rows : 0;
    if (rows && row_bytes * size_t(N) * T != out.value()->size_bytes())
      return invalid("a result's rows differ from its input's");
    a.in[i] = static_cast<const char*>(in.value().untyped_data());
    a.out[i] = static_cast<char*>(out.value()->untyped_data());
    a.row_bytes[i] = int(row_bytes);
    a.packed_offset[i] = int(packed);
    packed = (packed + row_bytes + 15) / 16 * 16;
  }
  a.packed_row_bytes = int(packed);
  a.send_mask = send_mask.typed_data();
  a.recv_flags = flags->typed_data();
  a.layout = rail_layout(N, T, packed, a.per_node_rows);
  if (a.layout.end > region.num_bytes)
    return invalid("this call needs " + std::to_string(a.layout.end) + " bytes of RDMA buffer "
                   "but the Buffer has " + std::to_string(region.num_bytes) + "; create the "
                   "jax_ep.Buffer with num_rdma_bytes>=" + std::to_string(a.layout.end) +
                   " (see Buffer.get_rdma_size_hint)");
  const int sms = int(attrs.num_sms < 1 ? 1 : (attrs.num_sms > 132 ? 132 : attrs.num_sms));
  const int chunks = (T + 31) / 32;
  a.blocks_per_node = std::max(1, std::min(std::max(1, sms / N), chunks));
  a.recv_blocks = std::max(1, std::min(sms, (N * T + 15) / 16));
  cudaError_t err = launch_rail_exchange(a, stream);
  if (err != cudaSuccess)
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("jax_ep: launching the internode "
                      "exchange failed: ") + cudaGetErrorString(err));
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jax_ep::internode

XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(jax_ep::internode::RailAttrs,
                                      StructMember<int64_t>("buffer_id"),
                                      StructMember<int64_t>("num_sms"),
                                      StructMember<int64_t>("op"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxEpRailExchange, jax_ep::internode::RailExchangeImpl,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()
                                  .RemainingArgs()
                                  .Ret<xla::ffi::Buffer<xla::ffi::S32>>()
                                  .RemainingRets()
                                  .Attrs<jax_ep::internode::RailAttrs>(),
                              {xla::ffi::Traits::kCmdBufferCompatible});
