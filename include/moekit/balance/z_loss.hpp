#pragma once
#include <algorithm>
#include <cmath>
#include <string_view>
#include <vector>

#include <moekit/core/concepts.hpp>
#include <moekit/core/token_loops.hpp>
#include <moekit/core/error.hpp>

namespace moekit {

/// ST-MoE's router z-loss (Zoph et al. 2022), as Megatron-Core computes it.
/// docs/policies/balance.md#zloss
///
///   L = c · (1/T) · Σ_t LSE_t²,   LSE_t = log Σ_e exp(l_te)
///
/// on the router's logits l, whatever its score function: it keeps the logits small, which keeps
/// the router's softmax (and the float arithmetic around it) stable. ∂L/∂l_te = c · 2 · LSE_t ·
/// softmax(l_t)_e / T. Over ranks T and Σ_t LSE_t² are the whole batch's (BalanceContext::batch).
struct ZLoss {
  using policy_kind = balancer_kind;
  static constexpr std::string_view name = "ZLoss";

  struct Options {
    double coefficient = 1e-3;  // c; ST-MoE: 1e-3
  };
  Options options{};

  template <Scalar T>
  struct State {
    std::vector<T> lse;          // [T] LSE_t
    std::vector<T> softmax;      // [T,E] softmax(l_t)
    std::vector<double> packed;  // [2] Σ_t LSE_t² and T, of the whole batch
  };

  void validate(const LayerShape&) const {
    require(std::isfinite(options.coefficient) && options.coefficient >= 0, "moekit::ZLoss: coefficient = ",
            options.coefficient, "; expected a finite number >= 0");
  }

  /// Reads the logits before the router turns them into scores: LSE_t and softmax(l_t).  [T,E]
  template <Scalar T>
  void logits(ConstMatrixRef<T> logits, const BalanceContext&, State<T>& state) const {
    const Index tokens = logits.rows(), experts = logits.cols();
    state.lse.resize(static_cast<std::size_t>(tokens));
    state.softmax.resize(static_cast<std::size_t>(tokens * experts));
    for_each_token(tokens, [&](Index t) {
      const T* l = logits.row(t).data();
      T* p = &state.softmax[static_cast<std::size_t>(t * experts)];
      const T top = *std::max_element(l, l + experts);
      T sum = 0;
      for (Index e = 0; e < experts; ++e) sum += p[e] = std::exp(l[e] - top);
      for (Index e = 0; e < experts; ++e) p[e] /= sum;
      state.lse[static_cast<std::size_t>(t)] = top + std::log(sum);
    });
  }

  template <Scalar T>
  T forward(ConstMatrixRef<T>, const BalanceContext& context, State<T>& state) const {
    double squares = 0;
    for (T v : state.lse) squares += double(v) * double(v);
    state.packed = {squares, double(state.lse.size())};
    if (context.batch->size() > 1) context.batch->sum(state.packed);
    return state.packed[1] > 0 ? T(options.coefficient * state.packed[0] / state.packed[1]) : T(0);
  }

  template <Scalar T>
  void backward(ConstMatrixRef<T> scores, const BalanceContext& context, State<T>& state,
                MatrixRef<T> d_logits) const {
    const Index tokens = scores.rows(), experts = scores.cols();
    if (tokens == 0) return;
    // The batch's T, and D for the average over ranks that the gradients then go through.
    const T c = T(2 * options.coefficient * double(context.batch->size()) / state.packed[1]);
    for_each_token(tokens, [&](Index t) {
      const T g = c * state.lse[static_cast<std::size_t>(t)];
      const T* p = &state.softmax[static_cast<std::size_t>(t * experts)];
      for (Index e = 0; e < experts; ++e) d_logits(t, e) += g * p[e];
    });
  }
};

static_assert(Balancer<ZLoss>);

}  // namespace moekit
