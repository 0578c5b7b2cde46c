// The parts of the nanobind module jax_ep._jax_ep_ffi, assembled by module.cc.
#pragma once

#include <nanobind/nanobind.h>

namespace jax_ep {

// buffer_bindings.cc (CUDA builds): communication-buffer management and the limits the
// kernels are compiled for.
void add_buffer_bindings(nanobind::module_& m);

// grouped_matmul_bindings.cc (builds with CUTLASS): the grouped matmul's workspace size.
void add_grouped_matmul_bindings(nanobind::module_& m);

// testing.cc: probes for tests and profiling (never needed to run the ops).
void add_testing_bindings(nanobind::module_& m);

}  // namespace jax_ep
