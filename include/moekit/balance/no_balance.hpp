#pragma once
#include <string_view>

#include <moekit/core/concepts.hpp>

namespace moekit {

/// No balancing: no loss, no bias. docs/policies/balance.md#nobalance
struct NoBalance {
  using policy_kind = balancer_kind;
  static constexpr std::string_view name = "NoBalance";
  static constexpr bool reads_scores = false;  // so it serves routers without scores (Hash)

  template <Scalar T>
  struct State {};

  void validate(const LayerShape&) const {}

  template <Scalar T>
  T forward(ConstMatrixRef<T>, const BalanceContext&, State<T>&) const {
    return T(0);
  }

  template <Scalar T>
  void backward(ConstMatrixRef<T>, const BalanceContext&, State<T>&, MatrixRef<T>) const {}
};

static_assert(Balancer<NoBalance>);

}  // namespace moekit
