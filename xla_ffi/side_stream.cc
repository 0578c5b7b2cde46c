// The side stream of the normal ops and its join (see side_stream.h).
#include "xla_ffi/side_stream.h"

#include <map>
#include <mutex>
#include <utility>

namespace jax_ep {
namespace {

namespace ffi = xla::ffi;

// A slot: the event after its last launch, and whether that launch awaits its join.
struct Slot {
  cudaEvent_t done = nullptr;
  bool pending = false;
};

// One GPU's side stream, the event XLA's stream records before each launch, and the
// slots. Created on first use with that GPU's context current (XLA's thread runs the
// handler); kept for the life of the process.
struct DeviceSide {
  cudaStream_t stream = nullptr;
  cudaEvent_t ready = nullptr;
  std::map<int64_t, Slot> slots;
};

std::mutex g_mutex;
std::map<int32_t, DeviceSide> g_devices;

ffi::Error cuda_error(cudaError_t err, const std::string& what) {
  return ffi::Error(ffi::ErrorCode::kInternal,
                    "jax_ep: " + what + " failed: " + cudaGetErrorString(err));
}

// *ev becomes a new event without timing (left null on failure).
ffi::Error new_event(cudaEvent_t* ev, const std::string& what) {
  cudaError_t err = cudaEventCreateWithFlags(ev, cudaEventDisableTiming);
  if (err == cudaSuccess) return ffi::Error::Success();
  *ev = nullptr;
  return cuda_error(err, what);
}

// The device's side state, created if needed (caller holds g_mutex).
ffi::ErrorOr<DeviceSide*> device_side(int32_t device, const std::string& op) {
  DeviceSide& d = g_devices[device];
  if (d.stream == nullptr) {
    int lowest = 0, highest = 0;
    cudaError_t err = cudaDeviceGetStreamPriorityRange(&lowest, &highest);
    if (err == cudaSuccess)
      err = cudaStreamCreateWithPriority(&d.stream, cudaStreamNonBlocking, highest);
    if (err != cudaSuccess) {
      d.stream = nullptr;
      return ffi::Unexpected(cuda_error(err, op + ": creating the side stream"));
    }
  }
  if (d.ready == nullptr) {
    if (auto e = new_event(&d.ready, op + ": creating the side stream's event"); e.failure())
      return ffi::Unexpected(e);
  }
  return &d;
}

// The slot, its event created if needed (caller holds g_mutex).
ffi::ErrorOr<Slot*> slot_of(DeviceSide& d, int64_t slot, const std::string& op) {
  Slot& sl = d.slots[slot];
  if (sl.done == nullptr) {
    if (auto e = new_event(&sl.done, op + ": creating a side-stream slot event"); e.failure())
      return ffi::Unexpected(e);
  }
  return &sl;
}

}  // namespace

ffi::ErrorOr<cudaStream_t> SideStreamLaunch::begin() {
  if (slot_ < 0) return xla_stream_;
  std::lock_guard<std::mutex> lock(g_mutex);
  auto d = device_side(device_, op_);
  if (d.has_error()) return ffi::Unexpected(d.error());
  auto sl = slot_of(*d.value(), slot_, op_);
  if (sl.has_error()) return ffi::Unexpected(sl.error());
  cudaError_t err = cudaEventRecord(d.value()->ready, xla_stream_);
  if (err == cudaSuccess) err = cudaStreamWaitEvent(d.value()->stream, d.value()->ready, 0);
  if (err != cudaSuccess) return ffi::Unexpected(cuda_error(err, op_ + ": joining the side stream"));
  side_ = d.value()->stream;
  done_ = sl.value()->done;
  sl.value()->pending = true;
  return side_;
}

SideStreamLaunch::~SideStreamLaunch() {
  // Recorded on every path after begin(), also when a launch failed: the join then waits
  // for what did launch instead of a stale event.
  if (side_ != nullptr) cudaEventRecord(done_, side_);
}

namespace {

// join: XLA's stream waits for the last side-stream launch of `side_slot`. Its operands
// are the op's inputs and results: XLA keeps them alive (and unwritten) until here. Its
// one result is a token that orders the results' consumers after it.
ffi::Error SideStreamJoinImpl(cudaStream_t stream, int32_t device, ffi::RemainingArgs,
                              ffi::Result<ffi::Buffer<ffi::S32>>, int64_t side_slot) {
  std::lock_guard<std::mutex> lock(g_mutex);
  auto d = g_devices.find(device);
  Slot* sl = nullptr;
  if (d != g_devices.end()) {
    auto it = d->second.slots.find(side_slot);
    if (it != d->second.slots.end()) sl = &it->second;
  }
  if (sl == nullptr || !sl->pending)
    return ffi::Error(ffi::ErrorCode::kInternal,
                      "jax_ep: side-stream join of slot " + std::to_string(side_slot) +
                          " on GPU " + std::to_string(device) +
                          " has no launch to wait for (a join without its op)");
  sl->pending = false;
  cudaError_t err = cudaStreamWaitEvent(stream, sl->done, 0);
  if (err != cudaSuccess) return cuda_error(err, "side-stream join");
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jax_ep

// Not command-buffer compatible: the wait is on an event recorded outside any graph.
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxEpSideStreamJoin, jax_ep::SideStreamJoinImpl,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<xla::ffi::DeviceOrdinal>()
                                  .RemainingArgs()
                                  .Ret<xla::ffi::Buffer<xla::ffi::S32>>()
                                  .Attr<int64_t>("side_slot"));
