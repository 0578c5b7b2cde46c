// XLA FFI handlers of the low-latency ops: fused (send and recv phases in one cooperative
// launch on XLA's stream; two launches where the grid cannot be co-resident) and split (*_send /
// *_recv, one launch each, tied by a one-int ticket). Every handler binds its arguments
// through bind_common.
// Shapes are static and nothing waits on the host (safe in lax.scan). The handlers are
// deliberately not marked command-buffer compatible: inside a CUDA graph XLA orders nodes
// by the buffers it knows, and two low-latency ops with no data dependency could then run
// concurrently, while they share the Buffer's op counter and must run one after the other.
#include <cuda_runtime.h>

#include <map>
#include <mutex>
#include <string>

#include "cuda/low_latency.h"
#include "xla/ffi/api/ffi.h"
#include "xla_ffi/buffer_registry.h"
#include "xla_ffi/low_latency_handlers.h"

namespace ffi = xla::ffi;

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

ffi::Error invalid(const std::string& op, const std::string& msg) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument, "jax_ep: " + op + ": " + msg);
}

ffi::Error launched(cudaError_t err, const std::string& op) {
  if (err == cudaSuccess) return ffi::Error::Success();
  return ffi::Error(ffi::ErrorCode::kInternal,
                    "jax_ep: launching " + op + " failed: " + cudaGetErrorString(err));
}

bool elem_type_of(ffi::DataType t, ElemType* out) {
  switch (t) {
    case ffi::DataType::BF16: *out = ElemType::kBF16; return true;
    case ffi::DataType::F16: *out = ElemType::kF16; return true;
    case ffi::DataType::F32: *out = ElemType::kF32; return true;
    default: return false;
  }
}

size_t elem_bytes(ElemType t) { return t == ElemType::kF32 ? 4 : 2; }

int blocks_of(int64_t num_sms) { return num_sms < 1 ? 1 : (num_sms > 1024 ? 1024 : int(num_sms)); }
// At most 16 warps: the kernels are compiled for 512 threads (up to 128 registers each).
int threads_of(int64_t num_warps) {
  return 32 * (num_warps < 1 ? 1 : (num_warps > 16 ? 16 : int(num_warps)));
}

// This GPU's buffer, checked to hold a low-latency half of `half_needed` bytes.
ffi::Error find_ll_buffer(const std::string& op, int64_t buffer_id, int32_t device,
                          size_t half_needed, const BufferState** state, size_t* half_bytes) {
  const BufferState* s = find_buffer(buffer_id, device);
  if (s == nullptr)
    return invalid(op, "no communication buffer " + std::to_string(buffer_id) + " on GPU " +
                           std::to_string(device) +
                           " (was the jax_ep.Buffer closed, or made for other devices?)");
  const size_t available = ll_half_bytes_available(s->num_bytes);
  if (half_needed > available)
    return invalid(op, "the communication buffer holds " + std::to_string(s->num_bytes) +
                           " bytes but this low-latency call needs " +
                           std::to_string(ll_buffer_bytes(half_needed)) +
                           "; create jax_ep.Buffer(..., num_nvl_bytes=jax_ep.backends."
                           "cuda_low_latency.ll_bytes_hint(max_tokens_per_rank, hidden, "
                           "num_experts, num_ranks)) or larger");
  *state = s;
  *half_bytes = available;
  return ffi::Error::Success();
}

PeerBases peer_bases(const BufferState& s) {
  PeerBases p{};
  for (int r = 0; r < s.num_ranks; ++r) p.base[r] = s.peers[r];
  return p;
}

ffi::Error check_sizes(const std::string& op, int num_ranks, int64_t num_experts,
                       int64_t max_tokens, int64_t num_tokens, int64_t num_topk) {
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
// finds this GPU's buffer, checks the sizes and that a half of half_needed(num_ranks)
// bytes fits, and fills the common fields of `a` (LLDispatchArgs or LLCombineArgs).
template <typename Args, typename HalfNeeded>
ffi::Error bind_common(cudaStream_t stream, const std::string& op, int32_t device, int64_t buffer_id,
                       int64_t num_experts, int64_t max_tokens, int num_tokens, int num_topk,
                       int64_t num_sms, int64_t num_warps, HalfNeeded half_needed, Args& a) {
  const BufferState* s = find_buffer(buffer_id, device);
  size_t half = 0;
  if (s == nullptr) return find_ll_buffer(op, buffer_id, device, 0, &s, &half);  // the error
  ffi::Error err = check_sizes(op, s->num_ranks, num_experts, max_tokens, num_tokens, num_topk);
  if (err.failure()) return err;
  err = find_ll_buffer(op, buffer_id, device, half_needed(s->num_ranks), &s, &half);
  if (err.failure()) return err;
  a.peers = peer_bases(*s);
  a.me = s->rank;
  a.num_ranks = s->num_ranks;
  a.num_experts = int(num_experts);
  a.num_tokens = num_tokens;
  a.num_topk = num_topk;
  a.max_tokens = int(max_tokens);
  a.half_bytes = half;
  a.num_blocks = blocks_of(num_sms);
  a.num_threads = threads_of(num_warps);
  a.timing = timing_ring(device, stream);
  return ffi::Error::Success();
}

// ------------------------------------------------------------------ dispatch

// bind_common for the dispatch handlers (a.hidden and a.x_type already set): a dispatch
// half's bytes follow from the rows' stride and the number of ranks.
ffi::Error bind_dispatch_common(cudaStream_t stream, const std::string& op, int32_t device,
                                int64_t buffer_id, int64_t num_experts, int64_t max_tokens,
                                int num_tokens, int num_topk, int64_t num_sms, int64_t num_warps,
                                bool use_fp8, LLDispatchArgs& a) {
  const size_t stride = ll_dispatch_row_stride(size_t(a.hidden), elem_bytes(a.x_type), use_fp8);
  auto half_needed = [=](int num_ranks) {
    return ll_dispatch_half_bytes(size_t(num_experts), size_t(num_ranks), size_t(max_tokens),
                                  stride);
  };
  return bind_common(stream, op, device, buffer_id, num_experts, max_tokens, num_tokens,
                     num_topk, num_sms, num_warps, half_needed, a);
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

// Fills the receiver half of `a` (after bind_common) from the payload and count results.
ffi::Error bind_recv_outputs(const std::string& op, ffi::RemainingRets& payload, bool use_fp8,
                             ffi::Result<ffi::Buffer<ffi::S32>>& recv_count,
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
  if (recv_count->element_count() != size_t(L) || recv_src_token->element_count() != size_t(L) * RM ||
      recv_count_per_rank->element_count() != size_t(L) * a.num_ranks)
    return invalid(op, "recv_count [L], recv_src_token [L, R*M] and recv_count_per_rank [L, R] "
                       "have the wrong sizes");
  a.recv_count = recv_count->typed_data();
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

ffi::Error LLDispatchImpl(cudaStream_t stream, int32_t device, ffi::AnyBuffer x,
                          ffi::Buffer<ffi::S32> topk_idx, ffi::Buffer<ffi::F32> slot_scale,
                          ffi::Result<ffi::Buffer<ffi::S32>> send_pos,
                          ffi::Result<ffi::Buffer<ffi::S32>> recv_count,
                          ffi::Result<ffi::Buffer<ffi::S32>> recv_src_token,
                          ffi::Result<ffi::Buffer<ffi::S32>> recv_count_per_rank,
                          ffi::RemainingRets payload, int64_t buffer_id, int64_t num_experts,
                          int64_t max_tokens_per_rank, bool use_fp8, bool has_slot_scale,
                          bool zero_padding, int64_t num_sms, int64_t num_warps) {
  const std::string op = "low_latency_dispatch";
  LLDispatchArgs a{};
  ffi::Error err = bind_sender(op, x, topk_idx, slot_scale, has_slot_scale, use_fp8,
                               send_pos->typed_data(), a);
  if (err.failure()) return err;
  int hidden = 0;
  ElemType recv_type;
  err = recv_payload_type(op, payload, use_fp8, &hidden, &recv_type);
  if (err.failure()) return err;
  if (hidden != a.hidden || (!use_fp8 && recv_type != a.x_type))
    return invalid(op, "recv_x must be [L, R*M, H] in x's dtype (or float8_e4m3fn)");
  const auto id = topk_idx.dimensions();
  err = bind_dispatch_common(stream, op, device, buffer_id, num_experts, max_tokens_per_rank,
                             int(id[0]), int(id[1]), num_sms, num_warps, use_fp8, a);
  if (err.failure()) return err;
  err = bind_recv_outputs(op, payload, use_fp8, recv_count, recv_src_token, recv_count_per_rank,
                          a);
  if (err.failure()) return err;
  a.zero_padding = zero_padding;
  return launched(launch_ll_dispatch(a, kLLBoth, stream), op);
}

ffi::Error LLDispatchSendImpl(cudaStream_t stream, int32_t device, ffi::AnyBuffer x,
                              ffi::Buffer<ffi::S32> topk_idx, ffi::Buffer<ffi::F32> slot_scale,
                              ffi::Result<ffi::Buffer<ffi::S32>> send_pos,
                              ffi::Result<ffi::Buffer<ffi::S32>> ticket, int64_t buffer_id,
                              int64_t num_experts, int64_t max_tokens_per_rank, bool use_fp8,
                              bool has_slot_scale, int64_t num_sms, int64_t num_warps) {
  const std::string op = "low_latency_dispatch_send";
  LLDispatchArgs a{};
  ffi::Error err = bind_sender(op, x, topk_idx, slot_scale, has_slot_scale, use_fp8,
                               send_pos->typed_data(), a);
  if (err.failure()) return err;
  const auto id = topk_idx.dimensions();
  err = bind_dispatch_common(stream, op, device, buffer_id, num_experts, max_tokens_per_rank,
                             int(id[0]), int(id[1]), num_sms, num_warps, use_fp8, a);
  if (err.failure()) return err;
  a.ticket = ticket->typed_data();
  return launched(launch_ll_dispatch(a, kLLSend, stream), op);
}

ffi::Error LLDispatchRecvImpl(cudaStream_t stream, int32_t device, ffi::Buffer<ffi::S32> ticket,
                              ffi::Result<ffi::Buffer<ffi::S32>> recv_count,
                              ffi::Result<ffi::Buffer<ffi::S32>> recv_src_token,
                              ffi::Result<ffi::Buffer<ffi::S32>> recv_count_per_rank,
                              ffi::RemainingRets payload, int64_t buffer_id, int64_t num_experts,
                              int64_t max_tokens_per_rank, bool use_fp8, bool zero_padding,
                              int64_t num_sms, int64_t num_warps) {
  const std::string op = "low_latency_dispatch_recv";
  LLDispatchArgs a{};
  ffi::Error err = recv_payload_type(op, payload, use_fp8, &a.hidden, &a.x_type);
  if (err.failure()) return err;
  err = check_row(op, a.hidden, a.x_type, use_fp8);
  if (err.failure()) return err;
  a.use_fp8 = use_fp8;
  err = bind_dispatch_common(stream, op, device, buffer_id, num_experts, max_tokens_per_rank, 0,
                             1, num_sms, num_warps, use_fp8, a);
  if (err.failure()) return err;
  err = bind_recv_outputs(op, payload, use_fp8, recv_count, recv_src_token, recv_count_per_rank,
                          a);
  if (err.failure()) return err;
  a.zero_padding = zero_padding;
  a.expect_ticket = ticket.typed_data();
  return launched(launch_ll_dispatch(a, kLLRecv, stream), op);
}

// ------------------------------------------------------------------ combine

// y's rows (= the output's): width and dtype.
ffi::Error combine_row(const std::string& op, int width, ffi::DataType dtype, ElemType* type) {
  if (!elem_type_of(dtype, type)) return invalid(op, "y must be bfloat16, float16 or float32");
  if (width < 1) return invalid(op, "y rows must not be empty");
  return ffi::Error::Success();
}

size_t combine_half_needed(int64_t num_experts, int64_t max_tokens, int width, ElemType type) {
  return ll_combine_half_bytes(size_t(num_experts), size_t(max_tokens),
                               ll_combine_row_stride(size_t(width), elem_bytes(type)));
}

ffi::Error check_y(const std::string& op, ffi::AnyBuffer y, int num_ranks, int64_t num_experts,
                   int64_t max_tokens) {
  const auto d = y.dimensions();
  if (d.size() != 3 || d[0] != num_experts / num_ranks || d[1] != num_ranks * max_tokens)
    return invalid(op, "y must have shape [num_local_experts, num_ranks * max_tokens_per_rank, W]");
  return ffi::Error::Success();
}

ffi::Error bind_combine(cudaStream_t stream, const std::string& op, int32_t device, int64_t buffer_id,
                        int64_t num_experts, int64_t max_tokens, int num_tokens, int num_topk,
                        int width, ffi::DataType dtype, int64_t num_sms, int64_t num_warps,
                        LLCombineArgs& a) {
  ffi::Error err = combine_row(op, width, dtype, &a.y_type);
  if (err.failure()) return err;
  a.width = width;
  const size_t half = combine_half_needed(num_experts, max_tokens, width, a.y_type);
  return bind_common(stream, op, device, buffer_id, num_experts, max_tokens, num_tokens, num_topk,
                     num_sms, num_warps, [half](int) { return half; }, a);
}

ffi::Error LLCombineImpl(cudaStream_t stream, int32_t device, ffi::AnyBuffer y,
                         ffi::Buffer<ffi::S32> topk_idx, ffi::Buffer<ffi::F32> topk_weights,
                         ffi::Buffer<ffi::S32> send_pos,
                         ffi::Buffer<ffi::S32> recv_count_per_rank,
                         ffi::Result<ffi::AnyBuffer> out, int64_t buffer_id, int64_t num_experts,
                         int64_t max_tokens_per_rank, int64_t num_sms, int64_t num_warps) {
  const std::string op = "low_latency_combine";
  const auto id = topk_idx.dimensions();
  if (id.size() != 2) return invalid(op, "topk_idx must be [T, K]");
  LLCombineArgs a{};
  const auto yd = y.dimensions();
  ffi::Error err = bind_combine(stream, op, device, buffer_id, num_experts, max_tokens_per_rank,
                                int(id[0]), int(id[1]), yd.size() == 3 ? int(yd[2]) : 0,
                                y.element_type(), num_sms, num_warps, a);
  if (err.failure()) return err;
  err = check_y(op, y, a.num_ranks, num_experts, max_tokens_per_rank);
  if (err.failure()) return err;
  if (out->element_type() != y.element_type() ||
      out->element_count() != size_t(id[0]) * size_t(a.width))
    return invalid(op, "out must be [T, W] in y's dtype");
  a.y = y.untyped_data();
  a.recv_count_per_rank = recv_count_per_rank.typed_data();
  a.topk_idx = topk_idx.typed_data();
  a.topk_weights = topk_weights.typed_data();
  a.send_pos = send_pos.typed_data();
  a.out = out->untyped_data();
  return launched(launch_ll_combine(a, kLLBoth, stream), op);
}

ffi::Error LLCombineSendImpl(cudaStream_t stream, int32_t device, ffi::AnyBuffer y,
                             ffi::Buffer<ffi::S32> recv_count_per_rank,
                             ffi::Result<ffi::Buffer<ffi::S32>> ticket, int64_t buffer_id,
                             int64_t num_experts, int64_t max_tokens_per_rank, int64_t num_sms,
                             int64_t num_warps) {
  const std::string op = "low_latency_combine_send";
  LLCombineArgs a{};
  const auto yd = y.dimensions();
  ffi::Error err = bind_combine(stream, op, device, buffer_id, num_experts, max_tokens_per_rank, 0, 1,
                                yd.size() == 3 ? int(yd[2]) : 0, y.element_type(), num_sms,
                                num_warps, a);
  if (err.failure()) return err;
  err = check_y(op, y, a.num_ranks, num_experts, max_tokens_per_rank);
  if (err.failure()) return err;
  a.y = y.untyped_data();
  a.recv_count_per_rank = recv_count_per_rank.typed_data();
  a.ticket = ticket->typed_data();
  return launched(launch_ll_combine(a, kLLSend, stream), op);
}

ffi::Error LLCombineRecvImpl(cudaStream_t stream, int32_t device, ffi::Buffer<ffi::S32> ticket,
                             ffi::Buffer<ffi::S32> topk_idx, ffi::Buffer<ffi::F32> topk_weights,
                             ffi::Buffer<ffi::S32> send_pos, ffi::Result<ffi::AnyBuffer> out,
                             int64_t buffer_id, int64_t num_experts, int64_t max_tokens_per_rank,
                             int64_t num_sms, int64_t num_warps) {
  const std::string op = "low_latency_combine_recv";
  const auto id = topk_idx.dimensions();
  const auto od = out->dimensions();
  if (id.size() != 2 || od.size() != 2 || od[0] != id[0])
    return invalid(op, "topk_idx must be [T, K] and out [T, W]");
  LLCombineArgs a{};
  ffi::Error err = bind_combine(stream, op, device, buffer_id, num_experts, max_tokens_per_rank,
                                int(id[0]), int(id[1]), int(od[1]), out->element_type(), num_sms,
                                num_warps, a);
  if (err.failure()) return err;
  a.topk_idx = topk_idx.typed_data();
  a.topk_weights = topk_weights.typed_data();
  a.send_pos = send_pos.typed_data();
  a.out = out->untyped_data();
  a.expect_ticket = ticket.typed_data();
  return launched(launch_ll_combine(a, kLLRecv, stream), op);
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
                                  .RemainingRets()                 // recv_x (, scales)
                                  .Attr<int64_t>("buffer_id")
                                  .Attr<int64_t>("num_experts")
                                  .Attr<int64_t>("max_tokens_per_rank")
                                  .Attr<bool>("use_fp8")
                                  .Attr<bool>("has_slot_scale")
                                  .Attr<bool>("zero_padding")
                                  .Attr<int64_t>("num_sms")
                                  .Attr<int64_t>("num_warps"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxEpLLDispatchSend, LLDispatchSendImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()    // send_pos [T, K]
                                  .Ret<ffi::Buffer<ffi::S32>>()    // ticket [1]
                                  .Attr<int64_t>("buffer_id")
                                  .Attr<int64_t>("num_experts")
                                  .Attr<int64_t>("max_tokens_per_rank")
                                  .Attr<bool>("use_fp8")
                                  .Attr<bool>("has_slot_scale")
                                  .Attr<int64_t>("num_sms")
                                  .Attr<int64_t>("num_warps"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxEpLLDispatchRecv, LLDispatchRecvImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Arg<ffi::Buffer<ffi::S32>>()    // ticket [1]
                                  .Ret<ffi::Buffer<ffi::S32>>()    // recv_count
                                  .Ret<ffi::Buffer<ffi::S32>>()    // recv_src_token
                                  .Ret<ffi::Buffer<ffi::S32>>()    // recv_count_per_rank
                                  .RemainingRets()                 // recv_x (, scales)
                                  .Attr<int64_t>("buffer_id")
                                  .Attr<int64_t>("num_experts")
                                  .Attr<int64_t>("max_tokens_per_rank")
                                  .Attr<bool>("use_fp8")
                                  .Attr<bool>("zero_padding")
                                  .Attr<int64_t>("num_sms")
                                  .Attr<int64_t>("num_warps"));

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
                                  .Attr<int64_t>("buffer_id")
                                  .Attr<int64_t>("num_experts")
                                  .Attr<int64_t>("max_tokens_per_rank")
                                  .Attr<int64_t>("num_sms")
                                  .Attr<int64_t>("num_warps"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxEpLLCombineSend, LLCombineSendImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Arg<ffi::AnyBuffer>()           // y
                                  .Arg<ffi::Buffer<ffi::S32>>()    // recv_count_per_rank
                                  .Ret<ffi::Buffer<ffi::S32>>()    // ticket [1]
                                  .Attr<int64_t>("buffer_id")
                                  .Attr<int64_t>("num_experts")
                                  .Attr<int64_t>("max_tokens_per_rank")
                                  .Attr<int64_t>("num_sms")
                                  .Attr<int64_t>("num_warps"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxEpLLCombineRecv, LLCombineRecvImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Arg<ffi::Buffer<ffi::S32>>()    // ticket [1]
                                  .Arg<ffi::Buffer<ffi::S32>>()    // topk_idx
                                  .Arg<ffi::Buffer<ffi::F32>>()    // topk_weights
                                  .Arg<ffi::Buffer<ffi::S32>>()    // send_pos
                                  .Ret<ffi::AnyBuffer>()           // out [T, W]
                                  .Attr<int64_t>("buffer_id")
                                  .Attr<int64_t>("num_experts")
                                  .Attr<int64_t>("max_tokens_per_rank")
                                  .Attr<int64_t>("num_sms")
                                  .Attr<int64_t>("num_warps"));

}  // namespace jax_ep
