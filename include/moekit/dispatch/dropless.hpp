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
    for (Index e : routing.index) ++plan.counts[static_cast<std::size_t>(e)];
    for (Index e = 0; e < experts; ++e)
      plan.offsets[static_cast<std::size_t>(e + 1)] =
          plan.offsets[static_cast<std::size_t>(e)] + plan.counts[static_cast<std::size_t>(e)];
    plan.source.resize(static_cast<std::size_t>(plan.rows()));
    // Second pass: counts again serve as each block's fill cursor and end where they began.
    std::fill(plan.counts.begin(), plan.counts.end(), 0);
    for (Index choice = 0; choice < routing.choices(); ++choice) {
      const auto e = static_cast<std::size_t>(routing.index[static_cast<std::size_t>(choice)]);
      const Index row = plan.offsets[e] + plan.counts[e]++;
      plan.slot[static_cast<std::size_t>(choice)] = row;
      plan.source[static_cast<std::size_t>(row)] = choice;
    }
  }
};

static_assert(Dispatcher<Dropless>);

}  // namespace moekit
