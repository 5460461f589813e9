#pragma once
#include <span>
#include <string_view>

#include <moekit/core/concepts.hpp>
#include <moekit/core/group.hpp>

namespace moekit {

/// Every expert lives in this process; rows never leave it. docs/policies/parallel.md#singleprocess
struct SingleProcess {
  using policy_kind = parallel_kind;
  static constexpr std::string_view name = "SingleProcess";
  static constexpr bool moves_rows = false;

  void validate(const LayerShape&) {}
  ExpertRange local_experts(const LayerShape& shape) const { return {0, shape.experts}; }
  ExpertRange local_ffn(const LayerShape& shape) const { return {0, shape.ffn}; }
  const BatchGroup& batch() const { return single_process_batch(); }

  /// Nothing to agree with: runs the checks of `step`.
  template <class F>
  void all_or_none(std::string_view /*step*/, F&& local) const {
    local();
  }

  /// The gradients are already the whole batch's.
  template <Scalar T>
  void reduce_gradients(std::span<Tensor<T>>, std::span<Tensor<T>>) const {}
};

static_assert(Parallel<SingleProcess>);

}  // namespace moekit
