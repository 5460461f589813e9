#pragma once
// Policy pairs that cannot work together, each with its reason and source. MoELayer checks them
// after it has found every kind.
#include <concepts>

#include <moekit/balance/balanced.hpp>
#include <moekit/balance/sinkhorn.hpp>
#include <moekit/dispatch/capacity.hpp>

namespace moekit::detail {

/// Whether a balancer is Sinkhorn or has it among its terms.
template <class Balancer>
inline constexpr bool has_sinkhorn = std::same_as<Balancer, Sinkhorn>;
template <class... Terms>
inline constexpr bool has_sinkhorn<Balanced<Terms...>> = (has_sinkhorn<Terms> || ...);

template <class Balancer, class Dispatcher>
struct require_compatible {
  // Megatron-Core rejects a capacity factor with Sinkhorn balancing: the plan already balances
  // the load, and capacity drops by weight would overrule its choices.
  static constexpr bool sinkhorn_with_capacity =
      has_sinkhorn<Balancer> && std::same_as<Dispatcher, Capacity>;
  static_assert(!sinkhorn_with_capacity,
                "moekit::MoELayer: Sinkhorn with Capacity; these do not compose (Megatron-Core "
                "rejects the pair too: the Sinkhorn plan balances the load and capacity drops "
                "would overrule it); use Sinkhorn with Dropless");
  static constexpr bool value = !sinkhorn_with_capacity;
};

}  // namespace moekit::detail
