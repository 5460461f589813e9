#pragma once
#include <string_view>

#include <moekit/core/concepts.hpp>

namespace moekit {

/// Every expert lives in this process; rows never leave it. docs/policies/parallel.md#singleprocess
struct SingleProcess {
  using policy_kind = parallel_kind;
  static constexpr std::string_view name = "SingleProcess";

  void validate(const LayerShape&) const {}
  ExpertRange local_experts(const LayerShape& shape) const { return {0, shape.experts}; }
};

static_assert(Parallel<SingleProcess>);

}  // namespace moekit
