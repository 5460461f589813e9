#pragma once
// Policy pairs that cannot work together, each with its reason and source. MoELayer checks them
// after it has found every kind.
#include <concepts>

#include <moekit/balance/balanced.hpp>
#include <moekit/balance/sinkhorn.hpp>
#include <moekit/core/concepts.hpp>
#include <moekit/dispatch/capacity.hpp>

namespace moekit::detail {

/// Whether a balancer is Sinkhorn or has it among its terms.
template <class Balancer>
inline constexpr bool has_sinkhorn = std::same_as<Balancer, Sinkhorn>;
template <class... Terms>
inline constexpr bool has_sinkhorn<Balanced<Terms...>> = (has_sinkhorn<Terms> || ...);

template <class Router, class Balancer, class Dispatcher>
struct require_compatible {
  // Megatron-Core rejects a capacity factor with Sinkhorn balancing: the plan already balances
  // the load, and capacity drops by weight would overrule its choices.
  static constexpr bool sinkhorn_with_capacity =
      has_sinkhorn<Balancer> && std::same_as<Dispatcher, Capacity>;
  static_assert(!sinkhorn_with_capacity,
                "moekit::MoELayer: Sinkhorn with Capacity; these do not compose (Megatron-Core "
                "rejects the pair too: the Sinkhorn plan balances the load and capacity drops "
                "would overrule it); use Sinkhorn with Dropless");

  // Expert Choice is a capacity of its own: each expert takes exactly C tokens. A dispatcher that
  // drops choices would break that count, and a balancer that counts each token's top K has no
  // top K to count (and nothing to balance: the load is even by construction).
  static constexpr bool expert_choice_with_capacity =
      router_choices_vary<Router> && std::same_as<Dispatcher, Capacity>;
  static_assert(!expert_choice_with_capacity,
                "moekit::MoELayer: a router whose choices vary (ExpertChoice) with Capacity; these do not "
                "compose (each expert already takes exactly its capacity C of tokens); use Dropless");
  static constexpr bool expert_choice_with_top_k_balancer =
      router_choices_vary<Router> && balancer_assumes_top_k<Balancer>;
  static_assert(!expert_choice_with_top_k_balancer,
                "moekit::MoELayer: a router whose choices vary (ExpertChoice) with a balancer that assumes each "
                "token's top K (AuxLoss, SeqAuxLoss, Sinkhorn, AuxFree, LoadLoss); the load is even by "
                "construction: use NoBalance, ZLoss or ImportanceLoss");
  static constexpr bool value =
      !sinkhorn_with_capacity && !expert_choice_with_capacity && !expert_choice_with_top_k_balancer;
};

}  // namespace moekit::detail
