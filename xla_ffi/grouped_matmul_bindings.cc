// The grouped matmul's workspace size, for jax_ep/backends/cuda/grouped_matmul.py to
// allocate it as the custom call's second result.
#include <nanobind/nanobind.h>

#include <cstdint>
#include <stdexcept>

#include "cuda/grouped_matmul/grouped_matmul.h"
#include "xla_ffi/bindings.h"

namespace nb = nanobind;

namespace jax_ep {

void add_grouped_matmul_bindings(nb::module_& m) {
  m.def(
      "grouped_matmul_workspace_bytes",
      [](int kind, int num_groups, int64_t rows, int64_t k, int64_t n) {
        if (kind < 0 || kind > 2) throw std::invalid_argument("kind must be 0, 1 or 2");
        GroupedMatmulArgs args{GroupedKind(kind), nullptr, nullptr, nullptr, nullptr,
                               num_groups, rows, k, n};
        return int64_t(grouped_matmul_workspace_bytes(args));
      },
      nb::arg("kind"), nb::arg("num_groups"), nb::arg("rows"), nb::arg("k"), nb::arg("n"),
      "Workspace bytes of one grouped matmul (kind 0: forward, 1: transposed rhs, 2: "
      "weight gradient; b[g] is [k, n]).");
}

}  // namespace jax_ep
