// The nanobind module jax_ep._jax_ep_ffi: registrations only. The FFI handler capsules
// (registered with XLA by jax_ep/_native.py), the buffer bindings (buffer_bindings.cc) and,
// in the submodule `testing`, probes for tests and profiling (testing.cc).
#include <nanobind/nanobind.h>

#include "xla_ffi/bindings.h"
#include "xla_ffi/handlers.h"

namespace nb = nanobind;

namespace {

template <typename Fn>
nb::capsule handler_capsule(Fn* fn) {
  return nb::capsule(reinterpret_cast<void*>(fn));
}

nb::dict cuda_targets() {
  nb::dict d;
#ifdef JAX_EP_WITH_CUDA
  d["jax_ep_dispatch_layout"] = handler_capsule(JaxEpDispatchLayout);
  d["jax_ep_dispatch"] = handler_capsule(JaxEpDispatch);
  d["jax_ep_cached_dispatch"] = handler_capsule(JaxEpCachedDispatch);
  d["jax_ep_combine"] = handler_capsule(JaxEpCombine);
  d["jax_ep_dispatch_on_side_stream"] = handler_capsule(JaxEpDispatchOnSideStream);
  d["jax_ep_cached_dispatch_on_side_stream"] = handler_capsule(JaxEpCachedDispatchOnSideStream);
  d["jax_ep_combine_on_side_stream"] = handler_capsule(JaxEpCombineOnSideStream);
  d["jax_ep_side_stream_join"] = handler_capsule(JaxEpSideStreamJoin);
  d["jax_ep_ll_dispatch"] = handler_capsule(JaxEpLLDispatch);
  d["jax_ep_ll_dispatch_send"] = handler_capsule(JaxEpLLDispatchSend);
  d["jax_ep_ll_dispatch_recv"] = handler_capsule(JaxEpLLDispatchRecv);
  d["jax_ep_ll_combine"] = handler_capsule(JaxEpLLCombine);
  d["jax_ep_ll_combine_send"] = handler_capsule(JaxEpLLCombineSend);
  d["jax_ep_ll_combine_recv"] = handler_capsule(JaxEpLLCombineRecv);
#endif
#ifdef JAX_EP_WITH_GROUPED_MATMUL
  d["jax_ep_grouped_matmul"] = handler_capsule(JaxEpGroupedMatmul);
  d["jax_ep_grouped_matmul_weight_grad"] = handler_capsule(JaxEpGroupedMatmulWeightGrad);
#endif
  return d;
}

}  // namespace

NB_MODULE(_jax_ep_ffi, m) {
  m.doc() = "jax_ep native extension: XLA FFI handlers and NVLink buffer management";
  m.attr("version") = "0.1.0";
#ifdef JAX_EP_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  m.def("cuda_targets", &cuda_targets, "FFI targets for platform 'CUDA': name -> capsule");
#ifdef JAX_EP_WITH_CUDA
  jax_ep::add_buffer_bindings(m);
#endif
#ifdef JAX_EP_WITH_GROUPED_MATMUL
  m.attr("with_grouped_matmul") = true;
  jax_ep::add_grouped_matmul_bindings(m);
#else
  m.attr("with_grouped_matmul") = false;
#endif
  nb::module_ testing = m.def_submodule(
      "testing", "Probes for tests and profiling; the ops never need them");
  jax_ep::add_testing_bindings(testing);
}
