// XLA FFI handlers of the low-latency ops: fused (send and recv phases in one cooperative
// launch on XLA's stream; two launches where the grid cannot be co-resident) and split
// (*_send / *_recv, one launch each, tied by a one-int ticket). Every handler binds its
// arguments through bind_common. Sizes come from the buffers' shapes where they give them
// (recv_x or y: [num_local_experts, num_ranks * max_tokens_per_rank, W]); the attributes
// carry the rest.
// Where the ranks live: an EP group inside one node uses the low-latency region of the
// communication buffer and the NVLink-store kernels; a group over several nodes uses its
// registered symmetric region and the launchers over stores and NVSHMEM puts
// (low_latency_registry.h). ll_endpoint picks one per call; the binding is the same.
// Shapes are static and nothing waits on the host (safe in lax.scan). The handlers are
// deliberately not marked command-buffer compatible: inside a CUDA graph XLA orders nodes
// by the buffers it knows, and two low-latency ops with no data dependency could then run
// concurrently, while they share the Buffer's op counter and must run one after the other.
#include <cuda_runtime.h>

#include <map>
#include <mutex>
#include <string>

#include "cuda/low_latency/low_latency.h"
#include "xla_ffi/ffi_common.h"
#include "xla_ffi/handlers.h"
#include "xla_ffi/low_latency_registry.h"

namespace jax_ep {

// Attributes of the ops (decoded from the custom call's attribute dictionary). num_sms and
// num_warps: launch shape (clamped to kLLMaxBlocks blocks of at most kLLMaxThreads).
struct LLLaunchAttrs {        // combine, combine_send, combine_recv
  int64_t buffer_id, num_sms, num_warps;
};
struct LLDispatchAttrs {      // fused dispatch
  int64_t buffer_id;
  bool has_slot_scale;        // slot_scale is a [1] placeholder otherwise
  bool zero_padding;          // zero recv_x rows past the counts
  int64_t num_sms, num_warps;
};
struct LLDispatchSendAttrs {
  int64_t buffer_id;
  bool has_slot_scale;
  int64_t num_sms, num_warps;
};
struct LLDispatchRecvAttrs {
  int64_t buffer_id;
  bool zero_padding;
  int64_t num_sms, num_warps;
};

}  // namespace jax_ep

XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(jax_ep::LLLaunchAttrs, StructMember<int64_t>("buffer_id"),
                                      StructMember<int64_t>("num_sms"),
                                      StructMember<int64_t>("num_warps"));
XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(jax_ep::LLDispatchAttrs,
                                      StructMember<int64_t>("buffer_id"),
                                      StructMember<bool>("has_slot_scale"),
                                      StructMember<bool>("zero_padding"),
                                      StructMember<int64_t>("num_sms"),
                                      StructMember<int64_t>("num_warps"));
XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(jax_ep::LLDispatchSendAttrs,
                                      StructMember<int64_t>("buffer_id"),
                                      StructMember<bool>("has_slot_scale"),
                                      StructMember<int64_t>("num_sms"),
                                      StructMember<int64_t>("num_warps"));
XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(jax_ep::LLDispatchRecvAttrs,
                                      StructMember<int64_t>("buffer_id"),
                                      StructMember<bool>("zero_padding"),
                                      StructMember<int64_t>("num_sms"),
                                      StructMember<int64_t>("num_warps"));

namespace jax_ep {
namespace {

// ------------------------------------------------------------------ timing (profiling builds)

// One debug ring of kLLTimingRing LLTimingRecords per GPU, allocated on first use in a
// build with JAX_EP_LL_TIMING and kept for the life of the process.
std::mutex g_timing_mu;
std::map<int, LLTimingRecord*> g_timing;

// Zeroed on `stream` (stream-ordered: no host wait while peers' kernels may be spinning).
LLTimingRecord* timing_ring(int device, cudaStream_t stream) {
  if (!kLLTiming) return nullptr;
  std::lock_guard<std::mutex> lock(g_timing_mu);
  auto it = g_timing.find(device);
  if (it != g_timing.end()) return it->second;
  int saved = 0;
  if (cudaGetDevice(&saved) != cudaSuccess) saved = device;
  LLTimingRecord* p = nullptr;
  const size_t bytes = sizeof(LLTimingRecord) * kLLTimingRing;
  if (cudaSetDevice(device) != cudaSuccess ||
      cudaMalloc(reinterpret_cast<void**>(&p), bytes) != cudaSuccess ||
      cudaMemsetAsync(p, 0, bytes, stream) != cudaSuccess) {
    cudaGetLastError();  // timing is best effort: run without it
    if (p != nullptr) cudaFree(p);
    p = nullptr;
  }
  cudaSetDevice(saved);
  g_timing[device] = p;
  return p;
}

// Blocks per launch: the cooperative launch caps them further at what is co-resident.
constexpr int kLLMaxBlocks = 1024;

int blocks_of(int64_t num_sms) { return clamp_int(num_sms, 1, kLLMaxBlocks); }
int threads_of(int64_t num_warps) { return 32 * clamp_int(num_warps, 1, kLLMaxThreads / 32); }

const LLLaunchers kNvlinkLaunchers{launch_ll_dispatch, launch_ll_combine};

ffi::ErrorOr<LLEndpoint> ll_endpoint(int64_t buffer_id, int32_t device, const std::string& op) {
  if (const LLEndpoint* r = find_ll_symmetric(buffer_id, device)) return *r;
  LLEndpoint ep;
  auto s = lookup_buffer(buffer_id, device, op);
  if (s.has_error()) return ffi::Unexpected(s.error());
  const BufferState& b = *s.value();
  for (int r = 0; r < b.num_ranks; ++r) ep.peers.region[r] = b.peers[r] + kLowLatencyOffset;
  ep.rank = b.rank;
  ep.num_ranks = b.num_ranks;
  ep.num_bytes = b.num_bytes;
  ep.half_bytes = ll_half_bytes_available(b.num_bytes);
  ep.launchers = &kNvlinkLaunchers;
  return ep;
}

// Experts and slots per (expert, source rank) of one op.
struct LLShape {
  int64_t num_experts, max_tokens;
};

// The LLShape of an op from its [L, R*M, W] array (recv_x or y).
ffi::Error shape_of_slots(const std::string& op, const char* name, ffi::Span<const int64_t> d,
                          int num_ranks, LLShape* shape) {
  if (d.size() != 3 || d[1] % num_ranks)
    return invalid(op, std::string(name) + " must have shape [num_local_experts, num_ranks * "
                       "max_tokens_per_rank, W]");
  shape->num_experts = d[0] * num_ranks;
  shape->max_tokens = d[1] / num_ranks;
  return ffi::Error::Success();
}

ffi::Error check_sizes(const std::string& op, int num_ranks, const LLShape& shape,
                       int64_t num_tokens, int64_t num_topk) {
  const int64_t num_experts = shape.num_experts, max_tokens = shape.max_tokens;
  if (num_experts < num_ranks || num_experts % num_ranks || num_experts > kMaxExperts)
    return invalid(op, "num_experts must be a multiple of the " + std::to_string(num_ranks) +
                           " ranks and <= " + std::to_string(kMaxExperts));
  if (max_tokens < 1 || max_tokens > kLLMaxTokensPerRank)
    return invalid(op, "max_tokens_per_rank must be in [1, " +
                           std::to_string(kLLMaxTokensPerRank) + "]");
  if (num_tokens > max_tokens) return invalid(op, "more tokens than max_tokens_per_rank");
  if (num_topk < 1 || num_topk > kMaxTopk)
    return invalid(op, "num_topk must be in [1, " + std::to_string(kMaxTopk) + "]");
  return ffi::Error::Success();
}

// The binding every low-latency handler shares (dispatch and combine, fused and split):
// checks the sizes and that the buffer holds a low-latency half of `half_needed` bytes,
// and fills the common fields of `a` (LLDispatchArgs or LLCombineArgs).
template <typename Args>
ffi::Error bind_common(cudaStream_t stream, const std::string& op, int32_t device,
                       const LLEndpoint& s, const LLShape& shape, int num_tokens, int num_topk,
                       int64_t num_sms, int64_t num_warps, size_t half_needed, Args& a) {
  ffi::Error err = check_sizes(op, s.num_ranks, shape, num_tokens, num_topk);
  if (err.failure()) return err;
  if (half_needed > s.half_bytes)
    return invalid(op, std::string(s.symmetric ? "the low-latency region (NVSHMEM) holds "
                                               : "the communication buffer holds ") +
                           std::to_string(s.num_bytes) + " bytes but this low-latency call "
                           "needs " + std::to_string(s.symmetric
                               ? ll_symmetric_region_bytes(half_needed)
                               : ll_buffer_bytes(half_needed)) +
                           "; create jax_ep.Buffer(..., num_nvl_bytes=jax_ep.Buffer."
                           "get_low_latency_size_hint(max_tokens_per_rank, hidden, "
                           "num_experts, num_ranks)) or larger");
  a.peers = s.peers;
  a.me = s.rank;
  a.num_ranks = s.num_ranks;
  a.num_experts = int(shape.num_experts);
  a.num_tokens = num_tokens;
  a.num_topk = num_topk;
  a.max_tokens = int(shape.max_tokens);
  a.half_bytes = s.half_bytes;
  a.num_blocks = blocks_of(num_sms);
  a.num_threads = threads_of(num_warps);
  a.timing = timing_ring(device, stream);
  return ffi::Error::Success();
}

// ------------------------------------------------------------------ dispatch

// bind_common for the dispatch handlers (a.hidden and a.x_type already set): a dispatch
// half's bytes follow from the rows' stride and the number of ranks.
ffi::Error bind_dispatch_common(cudaStream_t stream, const std::string& op, int32_t device,
                                const LLEndpoint& s, const LLShape& shape, int num_tokens,
                                int num_topk, int64_t num_sms, int64_t num_warps, bool use_fp8,
                                LLDispatchArgs& a) {
  const size_t stride = ll_dispatch_row_stride(size_t(a.hidden), elem_bytes(a.x_type), use_fp8);
  const size_t half = ll_dispatch_half_bytes(size_t(shape.num_experts), size_t(s.num_ranks),
                                             size_t(shape.max_tokens), stride);
  return bind_common(stream, op, device, s, shape, num_tokens, num_topk, num_sms, num_warps,
                     half, a);
}

ffi::Error check_row(const std::string& op, int hidden, ElemType type, bool use_fp8) {
  if (hidden < 1) return invalid(op, "rows must not be empty");
  if (use_fp8 && hidden % 128) return invalid(op, "use_fp8 needs hidden % 128 == 0");
  if (!use_fp8 && (size_t(hidden) * elem_bytes(type)) % 16)
    return invalid(op, "rows must be a multiple of 16 bytes (hidden * dtype size)");
  return ffi::Error::Success();
}

// Hidden size and (non-FP8) dtype of the receive payload ([L, R*M, H] values, and
// [L, R*M, H/128] f32 scales when use_fp8).
ffi::Error recv_payload_type(const std::string& op, ffi::RemainingRets& payload, bool use_fp8,
                             int* hidden, ElemType* type) {
  const size_t want = use_fp8 ? 2 : 1;
  if (payload.size() != want)
    return invalid(op, "expected " + std::to_string(want) + " payload results");
  auto values = payload.get<ffi::AnyBuffer>(0);
  if (values.has_error()) return values.error();
  const auto d = values.value()->dimensions();
  if (d.size() != 3) return invalid(op, "recv_x must be [num_local_experts, R*M, hidden]");
  *hidden = int(d[2]);
  if (use_fp8) {
    if (values.value()->element_type() != ffi::DataType::F8E4M3FN)
      return invalid(op, "FP8 recv_x must be float8_e4m3fn");
    *type = ElemType::kBF16;  // FP8 slots do not depend on x's dtype
  } else if (!elem_type_of(values.value()->element_type(), type)) {
    return invalid(op, "recv_x must be bfloat16, float16 or float32");
  }
  return ffi::Error::Success();
}

// Fills the receiver half of `a` (after bind_common) from the payload and count results
// (recv_count: nullptr for dispatch_send, which writes only this rank's own rows and counts).
ffi::Error bind_recv_outputs(const std::string& op, ffi::RemainingRets& payload, bool use_fp8,
                             ffi::Result<ffi::Buffer<ffi::S32>>* recv_count,
                             ffi::Result<ffi::Buffer<ffi::S32>>& recv_src_token,
                             ffi::Result<ffi::Buffer<ffi::S32>>& recv_count_per_rank,
                             LLDispatchArgs& a) {
  auto values = payload.get<ffi::AnyBuffer>(0);
  if (values.has_error()) return values.error();
  const auto d = values.value()->dimensions();
  const int L = a.num_experts / a.num_ranks, RM = a.num_ranks * a.max_tokens;
  if (d.size() != 3 || d[0] != L || d[1] != RM || d[2] != a.hidden)
    return invalid(op, "recv_x must have shape [num_local_experts, num_ranks * "
                       "max_tokens_per_rank, hidden]");
  a.recv_x = values.value()->untyped_data();
  a.recv_scales = nullptr;
  if (use_fp8) {
    auto scales = payload.get<ffi::AnyBuffer>(1);
    if (scales.has_error()) return scales.error();
    if (scales.value()->element_type() != ffi::DataType::F32 ||
        scales.value()->element_count() != size_t(L) * RM * (a.hidden / 128))
      return invalid(op, "FP8 scales must be float32 [L, R*M, hidden/128]");
    a.recv_scales = static_cast<float*>(scales.value()->untyped_data());
  }
  if ((recv_count != nullptr && (*recv_count)->element_count() != size_t(L)) ||
      recv_src_token->element_count() != size_t(L) * RM ||
      recv_count_per_rank->element_count() != size_t(L) * a.num_ranks)
    return invalid(op, "recv_count [L], recv_src_token [L, R*M] and recv_count_per_rank [L, R] "
                       "have the wrong sizes");
  a.recv_count = recv_count != nullptr ? (*recv_count)->typed_data() : nullptr;
  a.recv_src_token = recv_src_token->typed_data();
  a.recv_count_per_rank = recv_count_per_rank->typed_data();
  return ffi::Error::Success();
}

ffi::Error bind_sender(const std::string& op, ffi::AnyBuffer x, ffi::Buffer<ffi::S32> topk_idx,
                       ffi::Buffer<ffi::F32> slot_scale, bool has_slot_scale, bool use_fp8,
                       int* send_pos, LLDispatchArgs& a) {
  const auto xd = x.dimensions();
  const auto id = topk_idx.dimensions();
  if (xd.size() != 2 || id.size() != 2 || id[0] != xd[0])
    return invalid(op, "x must be [T, H] and topk_idx [T, K]");
  if (!elem_type_of(x.element_type(), &a.x_type))
    return invalid(op, "x must be bfloat16, float16 or float32");
  if (has_slot_scale && slot_scale.element_count() != size_t(id[0]) * size_t(id[1]))
    return invalid(op, "slot_scale must be [T, K]");
  if (has_slot_scale && use_fp8) return invalid(op, "slot_scale is not supported with use_fp8");
  a.hidden = int(xd[1]);
  ffi::Error err = check_row(op, a.hidden, a.x_type, use_fp8);
  if (err.failure()) return err;
  a.use_fp8 = use_fp8;
  a.x = x.untyped_data();
  a.topk_idx = topk_idx.typed_data();
  a.slot_scale = has_slot_scale ? slot_scale.typed_data() : nullptr;
  a.send_pos = send_pos;
  return ffi::Error::Success();
}

// The binding of the two handlers that run the send phase (the fused dispatch and
// dispatch_send): the sender's operands, and the receive buffers it writes (the fused op
// all of them; the send phase this rank's own rows, their tokens and counts), whose shape
// gives the experts and max_tokens_per_rank.
ffi::Error bind_dispatch(cudaStream_t stream, const std::string& op, int32_t device,
                         int64_t buffer_id, ffi::AnyBuffer x, ffi::Buffer<ffi::S32> topk_idx,
                         ffi::Buffer<ffi::F32> slot_scale, bool has_slot_scale, int* send_pos,
                         ffi::Result<ffi::Buffer<ffi::S32>>* recv_count,
                         ffi::Result<ffi::Buffer<ffi::S32>>& recv_src_token,
                         ffi::Result<ffi::Buffer<ffi::S32>>& recv_count_per_rank,
                         ffi::RemainingRets& payload, int64_t num_sms, int64_t num_warps,
                         LLDispatchArgs& a, LLEndpoint* endpoint) {
  const bool use_fp8 = payload.size() == 2;  // e4m3 values and f32 scales
  ffi::Error err = bind_sender(op, x, topk_idx, slot_scale, has_slot_scale, use_fp8, send_pos, a);
  if (err.failure()) return err;
  int hidden = 0;
  ElemType recv_type;
  err = recv_payload_type(op, payload, use_fp8, &hidden, &recv_type);
  if (err.failure()) return err;
  if (hidden != a.hidden || (!use_fp8 && recv_type != a.x_type))
    return invalid(op, "recv_x must be [L, R*M, H] in x's dtype (or float8_e4m3fn)");
  auto s = ll_endpoint(buffer_id, device, op);
  if (s.has_error()) return s.error();
  *endpoint = s.value();
  LLShape shape;
  err = shape_of_slots(op, "recv_x", payload.get<ffi::AnyBuffer>(0).value()->dimensions(),
                       endpoint->num_ranks, &shape);
  if (err.failure()) return err;
  const auto id = topk_idx.dimensions();
  err = bind_dispatch_common(stream, op, device, *endpoint, shape, int(id[0]), int(id[1]),
                             num_sms, num_warps, use_fp8, a);
  if (err.failure()) return err;
  return bind_recv_outputs(op, payload, use_fp8, recv_count, recv_src_token,
                           recv_count_per_rank, a);
}

ffi::Error LLDispatchImpl(cudaStream_t stream, int32_t device, ffi::AnyBuffer x,
                          ffi::Buffer<ffi::S32> topk_idx, ffi::Buffer<ffi::F32> slot_scale,
                          ffi::Result<ffi::Buffer<ffi::S32>> send_pos,
                          ffi::Result<ffi::Buffer<ffi::S32>> recv_count,
                          ffi::Result<ffi::Buffer<ffi::S32>> recv_src_token,
                          ffi::Result<ffi::Buffer<ffi::S32>> recv_count_per_rank,
                          ffi::RemainingRets payload, LLDispatchAttrs attrs) {
  const std::string op = "low_latency_dispatch";
  LLDispatchArgs a{};
  LLEndpoint ep;
  ffi::Error err = bind_dispatch(stream, op, device, attrs.buffer_id, x, topk_idx, slot_scale,
                                 attrs.has_slot_scale, send_pos->typed_data(), &recv_count,
                                 recv_src_token, recv_count_per_rank, payload, attrs.num_sms,
                                 attrs.num_warps, a, &ep);
  if (err.failure()) return err;
  a.zero_padding = attrs.zero_padding;
  return check_launch(ep.launchers->dispatch(a, kLLBoth, stream), op);
}

// The receive buffers are results of the send (it writes this rank's own rows there) and
// pass through the recv as aliased operands.
ffi::Error LLDispatchSendImpl(cudaStream_t stream, int32_t device, ffi::AnyBuffer x,
                              ffi::Buffer<ffi::S32> topk_idx, ffi::Buffer<ffi::F32> slot_scale,
                              ffi::Result<ffi::Buffer<ffi::S32>> send_pos,
                              ffi::Result<ffi::Buffer<ffi::S32>> ticket,
                              ffi::Result<ffi::Buffer<ffi::S32>> recv_src_token,
                              ffi::Result<ffi::Buffer<ffi::S32>> recv_count_per_rank,
                              ffi::RemainingRets payload, LLDispatchSendAttrs attrs) {
  const std::string op = "low_latency_dispatch_send";
  LLDispatchArgs a{};
  LLEndpoint ep;
  ffi::Error err = bind_dispatch(stream, op, device, attrs.buffer_id, x, topk_idx, slot_scale,
                                 attrs.has_slot_scale, send_pos->typed_data(), nullptr,
                                 recv_src_token, recv_count_per_rank, payload, attrs.num_sms,
                                 attrs.num_warps, a, &ep);
  if (err.failure()) return err;
  a.ticket = ticket->typed_data();
  return check_launch(ep.launchers->dispatch(a, kLLSend, stream), op);
}

// The send's receive buffers arrive as operands aliased to the results (unread here).
ffi::Error LLDispatchRecvImpl(cudaStream_t stream, int32_t device, ffi::Buffer<ffi::S32> ticket,
                              ffi::RemainingArgs /*aliased to the results*/,
                              ffi::Result<ffi::Buffer<ffi::S32>> recv_count,
                              ffi::Result<ffi::Buffer<ffi::S32>> recv_src_token,
                              ffi::Result<ffi::Buffer<ffi::S32>> recv_count_per_rank,
                              ffi::RemainingRets payload, LLDispatchRecvAttrs attrs) {
  const std::string op = "low_latency_dispatch_recv";
  const bool use_fp8 = payload.size() == 2;
  LLDispatchArgs a{};
  ffi::Error err = recv_payload_type(op, payload, use_fp8, &a.hidden, &a.x_type);
  if (err.failure()) return err;
  err = check_row(op, a.hidden, a.x_type, use_fp8);
  if (err.failure()) return err;
  a.use_fp8 = use_fp8;
  auto s = ll_endpoint(attrs.buffer_id, device, op);
  if (s.has_error()) return s.error();
  LLShape shape;
  err = shape_of_slots(op, "recv_x", payload.get<ffi::AnyBuffer>(0).value()->dimensions(),
                       s.value().num_ranks, &shape);
  if (err.failure()) return err;
  err = bind_dispatch_common(stream, op, device, s.value(), shape, 0, 1, attrs.num_sms,
                             attrs.num_warps, use_fp8, a);
  if (err.failure()) return err;
  err = bind_recv_outputs(op, payload, use_fp8, &recv_count, recv_src_token,
                          recv_count_per_rank, a);
  if (err.failure()) return err;
  a.zero_padding = attrs.zero_padding;
  a.expect_ticket = ticket.typed_data();
  return check_launch(s.value().launchers->dispatch(a, kLLRecv, stream), op);
}

// ------------------------------------------------------------------ combine

// y's rows (= the output's): width and dtype.
ffi::Error combine_row(const std::string& op, int width, ffi::DataType dtype, ElemType* type) {
  if (!elem_type_of(dtype, type)) return invalid(op, "y must be bfloat16, float16 or float32");
  if (width < 1) return invalid(op, "y rows must not be empty");
  return ffi::Error::Success();
}

ffi::Error bind_combine(cudaStream_t stream, const std::string& op, int32_t device,
                        const LLEndpoint& s, const LLShape& shape, int num_tokens, int num_topk,
                        int width, ffi::DataType dtype, int64_t num_sms, int64_t num_warps,
                        LLCombineArgs& a) {
  ffi::Error err = combine_row(op, width, dtype, &a.y_type);
  if (err.failure()) return err;
  a.width = width;
  const size_t half =
      ll_combine_half_bytes(size_t(shape.num_experts), size_t(shape.max_tokens),
                            ll_combine_row_stride(size_t(width), elem_bytes(a.y_type)));
  return bind_common(stream, op, device, s, shape, num_tokens, num_topk, num_sms, num_warps,
                     half, a);
}

// The binding of the handlers that run the recv phase (the fused combine and
// combine_recv): y (its shape gives the experts and max_tokens_per_rank; the recv reads
// this rank's own rows there), the home side's operands and the output.
ffi::Error bind_combine_receiver(cudaStream_t stream, const std::string& op, int32_t device,
                                 const LLLaunchAttrs& attrs, ffi::AnyBuffer y,
                                 ffi::Buffer<ffi::S32> topk_idx,
                                 ffi::Buffer<ffi::F32> topk_weights,
                                 ffi::Buffer<ffi::S32> send_pos, ffi::Result<ffi::AnyBuffer>& out,
                                 LLCombineArgs& a, LLEndpoint* endpoint) {
  const auto id = topk_idx.dimensions();
  if (id.size() != 2) return invalid(op, "topk_idx must be [T, K]");
  auto s = ll_endpoint(attrs.buffer_id, device, op);
  if (s.has_error()) return s.error();
  *endpoint = s.value();
  LLShape shape;
  ffi::Error err = shape_of_slots(op, "y", y.dimensions(), endpoint->num_ranks, &shape);
  if (err.failure()) return err;
  err = bind_combine(stream, op, device, *endpoint, shape, int(id[0]), int(id[1]),
                     int(y.dimensions()[2]), y.element_type(), attrs.num_sms, attrs.num_warps, a);
  if (err.failure()) return err;
  if (out->element_type() != y.element_type() ||
      out->element_count() != size_t(id[0]) * size_t(a.width))
    return invalid(op, "out must be [T, W] in y's dtype");
  a.y = y.untyped_data();
  a.topk_idx = topk_idx.typed_data();
  a.topk_weights = topk_weights.typed_data();
  a.send_pos = send_pos.typed_data();
  a.out = out->untyped_data();
  return ffi::Error::Success();
}

ffi::Error LLCombineImpl(cudaStream_t stream, int32_t device, ffi::AnyBuffer y,
                         ffi::Buffer<ffi::S32> topk_idx, ffi::Buffer<ffi::F32> topk_weights,
                         ffi::Buffer<ffi::S32> send_pos,
                         ffi::Buffer<ffi::S32> recv_count_per_rank,
                         ffi::Result<ffi::AnyBuffer> out, LLLaunchAttrs attrs) {
  const std::string op = "low_latency_combine";
  LLCombineArgs a{};
  LLEndpoint ep;
  ffi::Error err = bind_combine_receiver(stream, op, device, attrs, y, topk_idx, topk_weights,
                                         send_pos, out, a, &ep);
  if (err.failure()) return err;
  a.recv_count_per_rank = recv_count_per_rank.typed_data();
  return check_launch(ep.launchers->combine(a, kLLBoth, stream), op);
}

ffi::Error LLCombineSendImpl(cudaStream_t stream, int32_t device, ffi::AnyBuffer y,
                             ffi::Buffer<ffi::S32> recv_count_per_rank,
                             ffi::Result<ffi::Buffer<ffi::S32>> ticket, LLLaunchAttrs attrs) {
  const std::string op = "low_latency_combine_send";
  auto s = ll_endpoint(attrs.buffer_id, device, op);
  if (s.has_error()) return s.error();
  LLShape shape;
  ffi::Error err = shape_of_slots(op, "y", y.dimensions(), s.value().num_ranks, &shape);
  if (err.failure()) return err;
  LLCombineArgs a{};
  err = bind_combine(stream, op, device, s.value(), shape, 0, 1, int(y.dimensions()[2]),
                     y.element_type(), attrs.num_sms, attrs.num_warps, a);
  if (err.failure()) return err;
  a.y = y.untyped_data();
  a.recv_count_per_rank = recv_count_per_rank.typed_data();
  a.ticket = ticket->typed_data();
  return check_launch(s.value().launchers->combine(a, kLLSend, stream), op);
}

// y is an operand of the recv too: it reads this rank's own experts' rows there.
ffi::Error LLCombineRecvImpl(cudaStream_t stream, int32_t device, ffi::Buffer<ffi::S32> ticket,
                             ffi::AnyBuffer y, ffi::Buffer<ffi::S32> topk_idx,
                             ffi::Buffer<ffi::F32> topk_weights, ffi::Buffer<ffi::S32> send_pos,
                             ffi::Result<ffi::AnyBuffer> out, LLLaunchAttrs attrs) {
  const std::string op = "low_latency_combine_recv";
  LLCombineArgs a{};
  LLEndpoint ep;
  ffi::Error err = bind_combine_receiver(stream, op, device, attrs, y, topk_idx, topk_weights,
                                         send_pos, out, a, &ep);
  if (err.failure()) return err;
  a.expect_ticket = ticket.typed_data();
  return check_launch(ep.launchers->combine(a, kLLRecv, stream), op);
}

}  // namespace

std::string ll_timing_read(int device, std::string* out) {
  LLTimingRecord* p = nullptr;
  {
    std::lock_guard<std::mutex> lock(g_timing_mu);
    auto it = g_timing.find(device);
    if (it != g_timing.end()) p = it->second;
  }
  out->clear();
  if (p == nullptr) return "";  // no timed op ran on this GPU (or not a timing build)
  int saved = 0;
  if (cudaGetDevice(&saved) != cudaSuccess) saved = device;
  out->resize(sizeof(LLTimingRecord) * kLLTimingRing);
  cudaError_t err = cudaSetDevice(device);
  if (err == cudaSuccess) err = cudaDeviceSynchronize();  // every stream of the GPU
  if (err == cudaSuccess) err = cudaMemcpy(&(*out)[0], p, out->size(), cudaMemcpyDeviceToHost);
  cudaSetDevice(saved);
  if (err != cudaSuccess) {
    out->clear();
    return std::string("ll_timing: ") + cudaGetErrorString(err);
  }
  return "";
}


XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxEpLLDispatch, LLDispatchImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Arg<ffi::AnyBuffer>()           // x [T, H]
                                  .Arg<ffi::Buffer<ffi::S32>>()    // topk_idx [T, K]
                                  .Arg<ffi::Buffer<ffi::F32>>()    // slot_scale [T, K] or [1]
                                  .Ret<ffi::Buffer<ffi::S32>>()    // send_pos [T, K]
                                  .Ret<ffi::Buffer<ffi::S32>>()    // recv_count [L]
                                  .Ret<ffi::Buffer<ffi::S32>>()    // recv_src_token [L, R*M]
                                  .Ret<ffi::Buffer<ffi::S32>>()    // recv_count_per_rank [L, R]
                                  .RemainingRets()                 // recv_x (, FP8 scales)
                                  .Attrs<LLDispatchAttrs>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxEpLLDispatchSend, LLDispatchSendImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Arg<ffi::AnyBuffer>()           // x [T, H]
                                  .Arg<ffi::Buffer<ffi::S32>>()    // topk_idx [T, K]
                                  .Arg<ffi::Buffer<ffi::F32>>()    // slot_scale [T, K] or [1]
                                  .Ret<ffi::Buffer<ffi::S32>>()    // send_pos [T, K]
                                  .Ret<ffi::Buffer<ffi::S32>>()    // ticket [1]
                                  .Ret<ffi::Buffer<ffi::S32>>()    // recv_src_token [L, R*M]
                                  .Ret<ffi::Buffer<ffi::S32>>()    // recv_count_per_rank [L, R]
                                  .RemainingRets()                 // recv_x (, FP8 scales)
                                  .Attrs<LLDispatchSendAttrs>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxEpLLDispatchRecv, LLDispatchRecvImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Arg<ffi::Buffer<ffi::S32>>()    // ticket [1]
                                  .RemainingArgs()                 // the send's receive buffers
                                  .Ret<ffi::Buffer<ffi::S32>>()    // recv_count [L]
                                  .Ret<ffi::Buffer<ffi::S32>>()    // recv_src_token [L, R*M]
                                  .Ret<ffi::Buffer<ffi::S32>>()    // recv_count_per_rank [L, R]
                                  .RemainingRets()                 // recv_x (, FP8 scales)
                                  .Attrs<LLDispatchRecvAttrs>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxEpLLCombine, LLCombineImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Arg<ffi::AnyBuffer>()           // y [L, R*M, W]
                                  .Arg<ffi::Buffer<ffi::S32>>()    // topk_idx [T, K]
                                  .Arg<ffi::Buffer<ffi::F32>>()    // topk_weights [T, K]
                                  .Arg<ffi::Buffer<ffi::S32>>()    // send_pos [T, K]
                                  .Arg<ffi::Buffer<ffi::S32>>()    // recv_count_per_rank [L, R]
                                  .Ret<ffi::AnyBuffer>()           // out [T, W]
                                  .Attrs<LLLaunchAttrs>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxEpLLCombineSend, LLCombineSendImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Arg<ffi::AnyBuffer>()           // y [L, R*M, W]
                                  .Arg<ffi::Buffer<ffi::S32>>()    // recv_count_per_rank [L, R]
                                  .Ret<ffi::Buffer<ffi::S32>>()    // ticket [1]
                                  .Attrs<LLLaunchAttrs>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxEpLLCombineRecv, LLCombineRecvImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Arg<ffi::Buffer<ffi::S32>>()    // ticket [1]
                                  .Arg<ffi::AnyBuffer>()           // y [L, R*M, W]
                                  .Arg<ffi::Buffer<ffi::S32>>()    // topk_idx [T, K]
                                  .Arg<ffi::Buffer<ffi::F32>>()    // topk_weights [T, K]
                                  .Arg<ffi::Buffer<ffi::S32>>()    // send_pos [T, K]
                                  .Ret<ffi::AnyBuffer>()           // out [T, W]
                                  .Attrs<LLLaunchAttrs>());

}  // namespace jax_ep
