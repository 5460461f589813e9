#pragma once
#include <string_view>

#include <moekit/core/concepts.hpp>

namespace moekit {

/// Every (token, expert) choice is kept. Rows are ordered by expert, then by token, then by k:
/// the stable expert-major order of Megatron-Core's permute. docs/policies/dispatch.md#dropless
struct Dropless {
  using policy_kind = dispatcher_kind;
  static constexpr std::string_view name = "Dropless";
  static constexpr bool decides_each_choice_alone = true;  // over ranks, each plans its own tokens

  void validate(const LayerShape&) const {}

  template <Scalar T>
  void plan(const Routing<T>& routing, Index experts, Plan& plan) const {
    plan.reset(routing.tokens, experts, routing.top_k);
    plan.place(routing.index, [](std::size_t) { return true; });
  }
};

static_assert(Dispatcher<Dropless>);

}  // namespace moekit
