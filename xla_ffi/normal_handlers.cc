// XLA FFI handlers of the normal (intranode) ops: decode buffers and attributes, find this
// GPU's communication buffer from (buffer_id, device ordinal), launch on XLA's stream (or,
// for a side-stream Buffer, on the side stream: side_stream.h). No host synchronisation
// anywhere (all sizes are static), so the XLA-stream handlers are safe inside command
// buffers (CUDA graphs). Sizes come from the buffers' shapes; attributes
// carry only what the shapes cannot say.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <string>

#include "cuda/intranode/intranode.h"
#include "cuda/low_latency/low_latency.h"  // kLowLatencyOffset: where the normal region ends
#include "xla_ffi/ffi_common.h"
#include "xla_ffi/handlers.h"
#include "xla_ffi/side_stream.h"

namespace jax_ep {

// Attributes of the ops (decoded from the custom call's attribute dictionary).
// side_slot: -1 on XLA's stream, else the side-stream slot of the launch (side_stream.h).
struct CommAttrs {          // cached_dispatch
  int64_t buffer_id;
  int64_t num_sms;          // blocks of the communication kernel (clamped, kMaxNormalBlocks)
  int64_t side_slot;
};
struct DispatchAttrs {
  int64_t buffer_id;
  int64_t num_sms;
  int64_t expert_alignment; // expert layout: each group padded to a multiple of this
  int64_t side_slot;
};
struct CombineAttrs {
  int64_t buffer_id;
  int64_t num_sms;
  int64_t layout;           // 0 rank, 1 expert (send_pos's shape cannot tell when K == R)
  bool has_weights;         // weights is a [1] placeholder otherwise
  int64_t side_slot;
};

}  // namespace jax_ep

XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(jax_ep::CommAttrs, StructMember<int64_t>("buffer_id"),
                                      StructMember<int64_t>("num_sms"),
                                      StructMember<int64_t>("side_slot"));
XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(jax_ep::DispatchAttrs, StructMember<int64_t>("buffer_id"),
                                      StructMember<int64_t>("num_sms"),
                                      StructMember<int64_t>("expert_alignment"),
                                      StructMember<int64_t>("side_slot"));
XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(jax_ep::CombineAttrs, StructMember<int64_t>("buffer_id"),
                                      StructMember<int64_t>("num_sms"),
                                      StructMember<int64_t>("layout"),
                                      StructMember<bool>("has_weights"),
                                      StructMember<int64_t>("side_slot"));

namespace jax_ep {
namespace {

// Dispatch rows of at least this many bytes move by bulk (TMA) copies, smaller ones by
// per-lane vector copies: bf16 rows of H >= 4096 go bulk, FP8 rows stay per-lane.
constexpr int kDefaultMinBulkRowBytes = 8192;
// Blocks of the normal communication kernels: at most one per SM of an H100/H200.
constexpr int kMaxNormalBlocks = 132;

// One process per GPU: peers can map only the staging area (CUDA IPC cannot export XLA's
// memory), so an op publishes addresses there and copies to/from its XLA buffers locally.
// Slots are carved in publish order, 256-byte aligned.
struct StagingSlots {
  const BufferState& s;
  size_t used = 0;
  char* take(size_t bytes) {
    char* p = s.staging + used;
    used = align_up(used + bytes, 256);
    return p;
  }
  ffi::Error check(const char* op) const {
    if (used <= s.staging_bytes) return ffi::Error::Success();
    return invalid(op, "with one process per GPU the rows travel through the "
                   "Buffer's staging area, which holds " + std::to_string(s.staging_bytes) +
                   " bytes; this call needs " + std::to_string(used) + ". Create the "
                   "jax_ep.Buffer with num_staging_bytes>=" + std::to_string(used) +
                   " (see Buffer.get_staging_size_hint) or lower max_recv_tokens");
  }
};

// Copies the `n` XLA buffers an op is about to publish (publish[i], bytes[i]) into staging
// slots and publishes the slots instead (0 for an empty buffer).
ffi::Error stage_inputs(const BufferState& s, uint64_t* publish, const size_t* bytes, int n,
                        cudaStream_t stream, const char* op) {
  StagingSlots slots{s};
  char* dst[kMaxPublished];
  for (int i = 0; i < n; ++i) dst[i] = slots.take(bytes[i]);
  if (auto e = slots.check(op); e.failure()) return e;
  for (int i = 0; i < n; ++i) {
    const void* src = reinterpret_cast<const void*>(publish[i]);
    publish[i] = 0;
    if (bytes[i] == 0) continue;
    cudaError_t err = cudaMemcpyAsync(dst[i], src, bytes[i], cudaMemcpyDeviceToDevice, stream);
    if (err != cudaSuccess) return check_launch(err, op);
    publish[i] = reinterpret_cast<uint64_t>(dst[i]);
  }
  return ffi::Error::Success();
}

int num_blocks_of(int64_t num_sms) { return clamp_int(num_sms, 1, kMaxNormalBlocks); }

// ------------------------------------------------------------------ get_dispatch_layout
ffi::Error DispatchLayoutImpl(cudaStream_t stream, ffi::Buffer<ffi::S32> topk_idx,
                              ffi::Result<ffi::Buffer<ffi::S32>> tokens_per_rank,
                              ffi::Result<ffi::Buffer<ffi::S32>> tokens_per_expert,
                              ffi::Result<ffi::Buffer<ffi::PRED>> is_token_in_rank) {
  const auto dims = topk_idx.dimensions();
  if (dims.size() != 2) return invalid("get_dispatch_layout", "topk_idx must be 2-D");
  const int64_t num_ranks = tokens_per_rank->element_count();
  const int64_t num_experts = tokens_per_expert->element_count();
  if (num_ranks < 1 || num_ranks > 32 || num_experts % num_ranks)
    return invalid("get_dispatch_layout", "bad num_ranks/num_experts");
  return check_launch(
      launch_dispatch_layout(topk_idx.typed_data(), int(dims[0]), int(dims[1]), int(num_experts),
                             int(num_ranks), tokens_per_rank->typed_data(),
                             tokens_per_expert->typed_data(),
                             reinterpret_cast<bool*>(is_token_in_rank->untyped_data()), stream),
      "get_dispatch_layout");
}

// ------------------------------------------------------------------ dispatch
ffi::Error DispatchImpl(cudaStream_t xla_stream, int32_t device, ffi::Buffer<ffi::S32> topk_idx,
                        ffi::Buffer<ffi::F32> topk_weights, ffi::RemainingArgs payloads,
                        ffi::Result<ffi::Buffer<ffi::S32>> recv_topk_idx,
                        ffi::Result<ffi::Buffer<ffi::F32>> recv_topk_weights,
                        ffi::Result<ffi::Buffer<ffi::S32>> num_recv,
                        ffi::Result<ffi::Buffer<ffi::S32>> recv_per_expert,
                        ffi::Result<ffi::Buffer<ffi::S32>> group_sizes,
                        ffi::Result<ffi::Buffer<ffi::S32>> num_overflow,
                        ffi::Result<ffi::Buffer<ffi::S32>> recv_src_rank,
                        ffi::Result<ffi::Buffer<ffi::S32>> recv_src_token,
                        ffi::Result<ffi::Buffer<ffi::S32>> recv_src_slot,
                        ffi::Result<ffi::Buffer<ffi::S32>> send_pos,
                        ffi::Result<ffi::Buffer<ffi::S32>> needed_per_expert,
                        ffi::RemainingRets recv_payloads, DispatchAttrs attrs) {
  auto state_or = lookup_buffer(attrs.buffer_id, device, "dispatch");
  if (state_or.has_error()) return state_or.error();
  const BufferState& s = *state_or.value();
  SideStreamLaunch side(xla_stream, device, attrs.side_slot, "dispatch");
  auto side_stream = side.begin();
  if (side_stream.has_error()) return side_stream.error();
  cudaStream_t stream = side_stream.value();
  const auto idx_dims = topk_idx.dimensions();
  const int T = int(idx_dims[0]), K = int(idx_dims[1]);
  const int R = s.num_ranks;
  const int cap = int(recv_src_rank->dimensions()[0]);
  // recv_topk_idx is [cap, K] in the rank layout, [cap] in the expert layout.
  const int64_t layout = recv_topk_idx->dimensions().size() == 2 ? 0 : 1;
  const int64_t num_experts = int64_t(recv_per_expert->element_count()) * R;  // L * R
  if (K > kMaxTopk) return invalid("dispatch", "num_topk > " + std::to_string(kMaxTopk));
  if (num_experts > kMaxExperts || num_experts % R)
    return invalid("dispatch", "num_experts must divide by the ranks and be <= " +
                   std::to_string(kMaxExperts));
  if (layout == 1 && buffer_bytes_for_rows(cap) > std::min(s.num_bytes, kLowLatencyOffset))
    return invalid("dispatch", "the buffer holds " + std::to_string(s.num_bytes) + " bytes but " +
                   std::to_string(buffer_bytes_for_rows(cap)) + " are needed");
  const int np = int(recv_payloads.size());  // payload arrays received
  // cast_fp8: one bf16 input becomes e4m3 values and f32 scales (checked below).
  const bool cast_fp8 = payloads.size() == 1 && np == 2;
  if (!cast_fp8 && (np < 1 || np > 2 || int(payloads.size()) != np))
    return invalid("dispatch", "expected 1 or 2 payload arrays (cast_fp8: 1 in, 2 out)");

  DispatchArgs a{};
  a.peers = peer_bases(s);
  a.me = s.rank;
  a.num_ranks = R;
  a.num_experts = int(num_experts);
  a.num_tokens = T;
  a.num_topk = K;
  a.capacity = cap;
  a.layout = layout == 0 ? Layout::kRank : Layout::kExpert;
  a.num_payloads = np;
  for (int p = 0; p < np; ++p) {
    // Row sizes come from the outputs (with cast_fp8 the input is the bf16 row).
    auto out = recv_payloads.get<ffi::AnyBuffer>(p);
    if (out.has_error()) return out.error();
    const auto d = out.value()->dimensions();
    a.payload_row_bytes[p] = int(ffi::ByteWidth(out.value()->element_type()) * size_t(d[1]));
    a.recv_payload[p] = static_cast<char*>(out.value()->untyped_data());
    if (p >= int(payloads.size())) continue;
    auto in = payloads.get<ffi::AnyBuffer>(p);
    if (in.has_error()) return in.error();
    a.payload[p] = static_cast<const char*>(in.value().untyped_data());
  }
  if (cast_fp8) {
    auto in = payloads.get<ffi::AnyBuffer>(0);
    const auto d = in.value().dimensions();
    if (in.value().element_type() != ffi::DataType::BF16 || d.size() != 2 || d[1] % 128 ||
        a.payload_row_bytes[0] != int(d[1]) || a.payload_row_bytes[1] != int(d[1] / 128) * 4)
      return invalid("dispatch", "cast_fp8 takes bf16 x [T, H], H % 128 == 0, and returns "
                     "e4m3 [cap, H] values and f32 [cap, H/128] scales");
    a.cast_fp8_hidden = int(d[1]);
  }
  a.topk_idx = topk_idx.typed_data();
  a.topk_weights = topk_weights.typed_data();
  a.send_pos = send_pos->typed_data();
  a.recv_topk_idx = recv_topk_idx->typed_data();
  a.recv_topk_weights = recv_topk_weights->typed_data();
  a.recv_src_rank = recv_src_rank->typed_data();
  a.recv_src_token = recv_src_token->typed_data();
  a.recv_src_slot = recv_src_slot->typed_data();
  a.recv_per_expert = recv_per_expert->typed_data();
  a.group_sizes = group_sizes->typed_data();
  a.num_blocks = num_blocks_of(attrs.num_sms);
  a.min_bulk_row_bytes = kDefaultMinBulkRowBytes;

  cudaError_t err = launch_send_positions(a.topk_idx, T, K, a.num_experts, R, a.layout, a.send_pos,
                                          s.peers[s.rank], stream);
  if (err != cudaSuccess) return check_launch(err, "dispatch (positions)");

  NotifyArgs n{};
  n.peers = a.peers;
  n.me = a.me;
  n.num_ranks = R;
  n.num_experts = a.num_experts;
  n.capacity = cap;
  n.expert_alignment = int(attrs.expert_alignment < 1 ? 1 : attrs.expert_alignment);
  n.layout = a.layout;
  // Slot order must match cuda/intranode/dispatch.cu's DispatchSlot.
  n.publish[0] = addr(a.recv_payload[0]);
  n.publish[1] = addr(np > 1 ? a.recv_payload[1] : nullptr);
  n.publish[2] = addr(a.recv_topk_idx);
  n.publish[3] = addr(a.recv_topk_weights);
  n.publish[4] = addr(a.recv_src_rank);
  n.publish[5] = addr(a.recv_src_token);
  n.publish[6] = addr(a.recv_src_slot);
  n.num_publish = 7;
  StagedCopy staged{};
  if (s.multi_process) {  // senders write into our staging area; we copy to the outputs
    const size_t meta = size_t(a.layout == Layout::kRank ? K : 1) * 4;
    const size_t row_bytes[7] = {size_t(a.payload_row_bytes[0]),
                                 size_t(np > 1 ? a.payload_row_bytes[1] : 0), meta, meta, 4, 4, 4};
    StagingSlots slots{s};
    for (int i = 0; i < 7; ++i) {  // n.publish holds our outputs (0: none): stage each
      char* out = reinterpret_cast<char*>(n.publish[i]);
      if (out == nullptr) continue;
      char* slot = slots.take(size_t(cap) * row_bytes[i]);
      n.publish[i] = addr(slot);
      staged.src[staged.num] = slot;
      staged.dst[staged.num] = out;
      staged.row_bytes[staged.num] = int(row_bytes[i]);
      ++staged.num;
    }
    if (auto e = slots.check("dispatch"); e.failure()) return e;
    staged.num_rows = reinterpret_cast<const int*>(s.peers[s.rank] + kWorkspaceOffset +
                                                   offsetof(Workspace, used_rows));
  }
  n.num_recv = num_recv->typed_data();
  n.num_overflow = num_overflow->typed_data();
  n.recv_per_expert = a.recv_per_expert;
  n.group_sizes = a.group_sizes;
  n.needed_per_expert = needed_per_expert->typed_data();
  err = launch_notify_dispatch(n, stream);
  if (err != cudaSuccess) return check_launch(err, "dispatch (notify)");
  return check_launch(launch_intranode_dispatch(a, stream, s.multi_process ? &staged : nullptr),
                      "dispatch");
}

// ------------------------------------------------------------------ cached dispatch
ffi::Error CachedDispatchImpl(cudaStream_t xla_stream, int32_t device, ffi::AnyBuffer x,
                              ffi::Buffer<ffi::S32> recv_src_rank,
                              ffi::Buffer<ffi::S32> recv_src_token,
                              ffi::Result<ffi::AnyBuffer> out, CommAttrs attrs) {
  auto state_or = lookup_buffer(attrs.buffer_id, device, "cached_dispatch");
  if (state_or.has_error()) return state_or.error();
  const BufferState& s = *state_or.value();
  SideStreamLaunch side(xla_stream, device, attrs.side_slot, "cached_dispatch");
  auto side_stream = side.begin();
  if (side_stream.has_error()) return side_stream.error();
  cudaStream_t stream = side_stream.value();
  const auto d = x.dimensions();
  CachedDispatchArgs a{};
  a.peers = peer_bases(s);
  a.me = s.rank;
  a.num_ranks = s.num_ranks;
  a.num_tokens = int(d[0]);
  a.capacity = int(recv_src_rank.dimensions()[0]);
  a.row_bytes = int(ffi::ByteWidth(x.element_type()) * size_t(d[1]));
  a.recv_src_rank = recv_src_rank.typed_data();
  a.recv_src_token = recv_src_token.typed_data();
  a.out = static_cast<char*>(out->untyped_data());
  a.num_blocks = num_blocks_of(attrs.num_sms);
  uint64_t publish[1] = {addr(x.untyped_data())};
  if (s.multi_process) {  // receivers pull our rows from the staging area
    const size_t bytes[1] = {x.size_bytes()};
    if (auto e = stage_inputs(s, publish, bytes, 1, stream, "cached_dispatch"); e.failure())
      return e;
  }
  cudaError_t err = launch_begin_op(s.peers[s.rank], publish, 1, stream);
  if (err != cudaSuccess) return check_launch(err, "cached_dispatch (begin)");
  return check_launch(launch_cached_dispatch(a, stream), "cached_dispatch");
}

// ------------------------------------------------------------------ combine
ffi::Error CombineImpl(cudaStream_t xla_stream, int32_t device, ffi::AnyBuffer y,
                       ffi::Buffer<ffi::F32> weights, ffi::Buffer<ffi::S32> send_pos,
                       ffi::Buffer<ffi::S32> recv_src_rank, ffi::Buffer<ffi::S32> recv_src_token,
                       ffi::Buffer<ffi::S32> recv_src_slot, ffi::Result<ffi::AnyBuffer> out,
                       CombineAttrs attrs) {
  auto state_or = lookup_buffer(attrs.buffer_id, device, "combine");
  if (state_or.has_error()) return state_or.error();
  const BufferState& s = *state_or.value();
  SideStreamLaunch side(xla_stream, device, attrs.side_slot, "combine");
  auto side_stream = side.begin();
  if (side_stream.has_error()) return side_stream.error();
  cudaStream_t stream = side_stream.value();
  CombineArgs a{};
  if (!elem_type_of(y.element_type(), &a.dtype))
    return invalid("combine", "y must be bfloat16, float16 or float32");
  const auto yd = y.dimensions();
  a.peers = peer_bases(s);
  a.me = s.rank;
  a.num_ranks = s.num_ranks;
  a.num_tokens = int(out->dimensions()[0]);
  a.layout = attrs.layout == 0 ? Layout::kRank : Layout::kExpert;
  if (send_pos.dimensions().size() != 2) return invalid("combine", "send_pos must be 2-D");
  // Expert layout: send_pos is [T, K]; the rank layout's kernel does not read num_topk.
  a.num_topk = a.layout == Layout::kExpert ? int(send_pos.dimensions()[1]) : 0;
  a.capacity = int(yd[0]);
  a.width = int(yd[1]);
  if ((a.width * ffi::ByteWidth(y.element_type())) % 16)
    return invalid("combine", "rows of y must be a multiple of 16 bytes");
  if (a.num_topk > kMaxTopk) return invalid("combine", "num_topk > " + std::to_string(kMaxTopk));
  a.has_weights = attrs.has_weights;
  a.send_pos = send_pos.typed_data();
  a.out = out->untyped_data();
  a.num_blocks = num_blocks_of(attrs.num_sms);
  // Slot order must match cuda/intranode/combine.cu's CombineSlot.
  uint64_t publish[5] = {addr(y.untyped_data()), addr(weights.typed_data()),
                         addr(recv_src_rank.typed_data()), addr(recv_src_token.typed_data()),
                         addr(recv_src_slot.typed_data())};
  if (s.multi_process) {  // peers pull our rows from the staging area
    const size_t bytes[5] = {y.size_bytes(), weights.size_bytes(), recv_src_rank.size_bytes(),
                             recv_src_token.size_bytes(), recv_src_slot.size_bytes()};
    if (auto e = stage_inputs(s, publish, bytes, 5, stream, "combine"); e.failure()) return e;
  }
  cudaError_t err = launch_begin_op(s.peers[s.rank], publish, 5, stream);
  if (err != cudaSuccess) return check_launch(err, "combine (begin)");
  return check_launch(launch_intranode_combine(a, stream), "combine");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxEpDispatchLayout, DispatchLayoutImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::PRED>>(),
                              {ffi::Traits::kCmdBufferCompatible});

JAX_EP_DEFINE_HANDLER_WITH_SIDE_STREAM(JaxEpDispatch, DispatchImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .RemainingRets()
                                  .Attrs<DispatchAttrs>());

JAX_EP_DEFINE_HANDLER_WITH_SIDE_STREAM(JaxEpCachedDispatch, CachedDispatchImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attrs<CommAttrs>());

JAX_EP_DEFINE_HANDLER_WITH_SIDE_STREAM(JaxEpCombine, CombineImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attrs<CombineAttrs>());

}  // namespace jax_ep
