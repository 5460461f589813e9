#pragma once
#include <array>
#include <cstddef>
#include <span>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include <moekit/core/concepts.hpp>

namespace moekit {

namespace detail {

/// "AuxLossPlusZLoss": the terms' names joined, kept as a constant a name can view.
template <class... Terms>
struct joined_names {
  static constexpr auto chars = [] {
    constexpr std::size_t size = (Terms::name.size() + ...) + 4 * (sizeof...(Terms) - 1);
    std::array<char, size + 1> out{};
    std::size_t at = 0;
    const auto add = [&](std::string_view s) {
      for (char c : s) out[at++] = c;
    };
    bool first = true;
    ((first ? void() : add("Plus"), add(Terms::name), first = false), ...);
    return out;
  }();
  static constexpr std::string_view value{chars.data(), chars.size() - 1};
};

/// The one term whose state saves with the layer (AuxFree's bias), as a base that names it.
template <class... Terms>
struct saved_name_of_terms {};
template <class First, class... Rest>
struct saved_name_of_terms<First, Rest...> : saved_name_of_terms<Rest...> {};
template <class First, class... Rest>
  requires requires { First::saved_name; }
struct saved_name_of_terms<First, Rest...> {
  static constexpr std::string_view saved_name = First::saved_name;
};

}  // namespace detail

/// Several balancing terms at once: AuxLoss + ZLoss (Switch, ST-MoE), AuxFree + AuxLoss (DeepSeek-V3's
/// bias with a small loss beside it). docs/policies/balance.md#balanced
///
/// The loss is the sum of the terms' losses, the gradient the sum of theirs, and each hook a term
/// has is called on it: at most one term may select and at most one may save state. `stats()`
/// lists each term by its name. A term's options: `layer.balancer().term<ZLoss>().options`.
template <class... Terms>
struct Balanced : detail::saved_name_of_terms<Terms...> {
  static_assert(sizeof...(Terms) >= 2, "moekit::Balanced: give two balancing terms or more; one is itself a balancer");
  static_assert((Balancer<Terms> && ...), "moekit::Balanced: every term must model moekit::Balancer");
  static_assert((int(BalancerSelects<Terms, double>) + ...) <= 1,
                "moekit::Balanced: two terms shape selection (Sinkhorn's plan, AuxFree's bias); at most one may");
  static_assert((int(requires { Terms::saved_name; }) + ...) <= 1,
                "moekit::Balanced: two terms save state with the layer; at most one may");

  using policy_kind = balancer_kind;
  static constexpr std::string_view name = detail::joined_names<Terms...>::value;
  static constexpr bool assumes_top_k = (balancer_assumes_top_k<Terms> || ...);

  std::tuple<Terms...> terms{};

  Balanced() = default;
  explicit Balanced(Terms... t) : terms(std::move(t)...) {}

  template <class Term>
  Term& term() {
    return std::get<Term>(terms);
  }
  template <class Term>
  const Term& term() const {
    return std::get<Term>(terms);
  }

  template <Scalar T>
  struct State {
    std::tuple<typename Terms::template State<T>...> terms;
    std::array<double, sizeof...(Terms)> losses{};  // each term's last loss
  };

  void validate(const LayerShape& shape) const {
    std::apply([&](const auto&... t) { (t.validate(shape), ...); }, terms);
  }

  template <Scalar T>
  T forward(ConstMatrixRef<T> scores, const BalanceContext& context, State<T>& state) const {
    T sum = 0;
    each(state, [&]<std::size_t I>(const auto& term, auto& term_state) {
      const T loss = term.template forward<T>(scores, context, term_state);
      state.losses[I] = double(loss);
      sum += loss;
    });
    return sum;
  }

  template <Scalar T>
  void backward(ConstMatrixRef<T> scores, const BalanceContext& context, State<T>& state,
                MatrixRef<T> d_logits) const {
    each(state, [&]<std::size_t>(const auto& term, auto& term_state) {
      term.template backward<T>(scores, context, term_state, d_logits);
    });
  }

  // ---- each hook, where a term has it --------------------------------------------------------

  template <Scalar T>
    requires(BalancerReadsLogits<Terms, T> || ...)
  void logits(ConstMatrixRef<T> logits, const BalanceContext& context, State<T>& state) const {
    each(state, [&]<std::size_t>(const auto& term, auto& term_state) {
      if constexpr (BalancerReadsLogits<std::remove_cvref_t<decltype(term)>, T>)
        term.template logits<T>(logits, context, term_state);
    });
  }

  template <Scalar T>
    requires(BalancerReadsNoisyLogits<Terms, T> || ...)
  void noisy_logits(const NoisyLogits<T>& logits, const BalanceContext& context, State<T>& state) const {
    each(state, [&]<std::size_t>(const auto& term, auto& term_state) {
      if constexpr (BalancerReadsNoisyLogits<std::remove_cvref_t<decltype(term)>, T>)
        term.template noisy_logits<T>(logits, context, term_state);
    });
  }

  template <Scalar T>
    requires(BalancerReadsNoisyLogits<Terms, T> || ...)
  void noisy_logits_backward(const NoisyLogits<T>& logits, const BalanceContext& context, State<T>& state,
                             MatrixRef<T> d_noisy, MatrixRef<T> d_clean, MatrixRef<T> d_noise) const {
    each(state, [&]<std::size_t>(const auto& term, auto& term_state) {
      if constexpr (BalancerReadsNoisyLogits<std::remove_cvref_t<decltype(term)>, T>)
        term.template noisy_logits_backward<T>(logits, context, term_state, d_noisy, d_clean, d_noise);
    });
  }

  template <Scalar T>
    requires(BalancerReadsWeights<Terms, T> || ...)
  void weights(const Routing<T>& routing, const BalanceContext& context, State<T>& state) const {
    each(state, [&]<std::size_t>(const auto& term, auto& term_state) {
      if constexpr (BalancerReadsWeights<std::remove_cvref_t<decltype(term)>, T>)
        term.template weights<T>(routing, context, term_state);
    });
  }

  template <Scalar T>
    requires(BalancerReadsWeights<Terms, T> || ...)
  void weights_backward(const Routing<T>& routing, const BalanceContext& context, State<T>& state,
                        std::span<T> d_weight) const {
    each(state, [&]<std::size_t>(const auto& term, auto& term_state) {
      if constexpr (BalancerReadsWeights<std::remove_cvref_t<decltype(term)>, T>)
        term.template weights_backward<T>(routing, context, term_state, d_weight);
    });
  }

  template <Scalar T>
    requires(BalancerSelects<Terms, T> || ...)
  void select(ConstMatrixRef<T> scores, const BalanceContext& context, State<T>& state,
              MatrixRef<T> selection) const {
    each(state, [&]<std::size_t>(const auto& term, auto& term_state) {
      if constexpr (BalancerSelects<std::remove_cvref_t<decltype(term)>, T>)
        term.template select<T>(scores, context, term_state, selection);
    });
  }

  template <Scalar T>
    requires(BalancerCountsLoad<Terms, T> || ...)
  void routed(std::span<const Index> load, State<T>& state) const {
    each(state, [&]<std::size_t>(const auto& term, auto& term_state) {
      if constexpr (BalancerCountsLoad<std::remove_cvref_t<decltype(term)>, T>)
        term.template routed<T>(load, term_state);
    });
  }

  template <Scalar T>
    requires(BalancerSteps<Terms, T> || ...)
  void step(const BalanceContext& context, State<T>& state) const {
    each(state, [&]<std::size_t>(const auto& term, auto& term_state) {
      if constexpr (BalancerSteps<std::remove_cvref_t<decltype(term)>, T>) term.template step<T>(context, term_state);
    });
  }

  template <Scalar T>
    requires(SavesState<Terms, T> || ...)
  std::span<const double> saved(const State<T>& state) const {
    std::span<const double> out;
    each(state, [&]<std::size_t>(const auto& term, const auto& term_state) {
      if constexpr (SavesState<std::remove_cvref_t<decltype(term)>, T>) out = term.saved(term_state);
    });
    return out;
  }

  template <Scalar T>
    requires(SavesState<Terms, T> || ...)
  void restore(std::vector<double> values, State<T>& state) const {
    each(state, [&]<std::size_t>(const auto& term, auto& term_state) {
      if constexpr (SavesState<std::remove_cvref_t<decltype(term)>, T>) term.restore(std::move(values), term_state);
    });
  }

  /// Each term's name and last loss, in order, for the routing statistics.
  template <Scalar T>
  std::vector<std::pair<std::string_view, double>> term_losses(const State<T>& state) const {
    std::vector<std::pair<std::string_view, double>> out;
    std::size_t i = 0;
    ((out.emplace_back(Terms::name, state.losses[i++])), ...);
    return out;
  }

 private:
  /// f.template operator()<I>(term I, its state), for each term in order.
  template <class S, class F>
  void each(S& state, F&& f) const {
    [&]<std::size_t... I>(std::index_sequence<I...>) {
      (f.template operator()<I>(std::get<I>(terms), std::get<I>(state.terms)), ...);
    }(std::index_sequence_for<Terms...>{});
  }
};

}  // namespace moekit
