#pragma once
// The expert a reduced-precision expert approximates: the same expert computing in the layer's
// scalar. The law suites hold a bf16 expert to it; a double layer in the layer tests uses it,
// since bf16 products sum in float.
#include <moekit/expert/grouped_gemm.hpp>

namespace moekit::test {

/// X computing in the layer's scalar; itself for an expert that does already. Specialise it for
/// an expert of your own that rounds its operands.
template <class X>
struct exact_twin {
  using type = X;
};
template <Activation A, ExpertBias B, Precision P>
struct exact_twin<GroupedGemmType<A, B, P>> {
  using type = GroupedGemmType<A, B>;
};

}  // namespace moekit::test
