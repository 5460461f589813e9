#pragma once
// Shazeer et al.'s two balancing losses (Outrageously Large Neural Networks, 2017): the spread of
// the experts' summed gates (ImportanceLoss), and of their smooth load under noisy gating
// (LoadLoss). docs/policies/balance.md#importanceloss
#include <cmath>
#include <numbers>
#include <span>
#include <string_view>
#include <vector>

#include <moekit/core/concepts.hpp>
#include <moekit/core/detail/top_k.hpp>
#include <moekit/core/error.hpp>
#include <moekit/core/token_loops.hpp>

namespace moekit {

namespace detail {

/// CV(v)² = Var(v) / (mean(v)² + ε) over the E values of v, Var the population variance — as
/// tensor2tensor's cv_squared, the authors' code (torch ports that call x.var() divide by E − 1).
struct CvSquared {
  static constexpr double epsilon = 1e-10;

  static double value(std::span<const double> v) {
    const auto [mean, variance] = moments(v);
    return variance / (mean * mean + epsilon);
  }

  /// d CV² / d v_e, into g [E].
  static void gradient(std::span<const double> v, std::span<double> g) {
    const auto [mean, variance] = moments(v);
    const double n = double(v.size()), denominator = mean * mean + epsilon;
    for (std::size_t e = 0; e < v.size(); ++e)
      g[e] = 2 * (v[e] - mean) / n / denominator - variance * 2 * mean / n / (denominator * denominator);
  }

 private:
  struct Moments {
    double mean, variance;
  };
  static Moments moments(std::span<const double> v) {
    double mean = 0, variance = 0;
    for (double x : v) mean += x;
    mean /= double(v.size());
    for (double x : v) variance += (x - mean) * (x - mean);
    return {mean, variance / double(v.size())};
  }
};

/// What both losses are: L = c · CV(s)² of a per-expert sum s over the whole batch, whose
/// gradient reaches what was summed into s through dL/ds.
struct CvSquaredOfSum {
  std::vector<double> sum;       // [E] s, the whole batch's
  std::vector<double> gradient;  // [E] c · D · ∂CV²/∂s_e (D the batch's ranks, for their average), from backward()

  /// After this rank's share of s is in `sum`: the whole batch's.
  void add_over_ranks(const BalanceContext& context) {
    if (context.batch->size() > 1) context.batch->sum(sum);
  }
  double loss(double coefficient) const { return coefficient * CvSquared::value(sum); }
  void backward(double coefficient, const BalanceContext& context) {
    gradient.resize(sum.size());
    CvSquared::gradient(sum, gradient);
    const double scale = coefficient * double(context.batch->size());
    for (double& g : gradient) g *= scale;
  }
};

/// Checks a loss coefficient: finite and >= 0.
inline void require_coefficient(std::string_view policy, double coefficient) {
  require(std::isfinite(coefficient) && coefficient >= 0, "moekit::", policy, ": coefficient = ", coefficient,
          "; expected a finite number >= 0 (Shazeer et al.: 0.1)");
}

}  // namespace detail

/// The importance loss: how unevenly the experts' gates add up over the batch.
///
///   Importance_e = Σ_t Σ_k [e_tk = e] · w_tk,   L = c · CV(Importance)²
///
/// w the router's combine weights (its gates G(x), before any capacity drops them), e_tk its
/// choices; empty choices (GShard's random second expert) add nothing. The gradient reaches the
/// router through its weights. Over ranks, Importance is the whole batch's.
struct ImportanceLoss {
  using policy_kind = balancer_kind;
  static constexpr std::string_view name = "ImportanceLoss";

  struct Options {
    double coefficient = 0.1;  // c; Shazeer et al.: w_importance = 0.1
  };
  Options options{};

  template <Scalar T>
  struct State {
    detail::CvSquaredOfSum importance;  // Importance [E], and the loss's gradient in it
  };

  void validate(const LayerShape&) const { detail::require_coefficient(name, options.coefficient); }

  /// Reads the router's weights, after it selects: Importance.
  template <Scalar T>
  void weights(const Routing<T>& routing, const BalanceContext& context, State<T>& state) const {
    require(context.experts >= 1, "moekit::ImportanceLoss: BalanceContext::experts = ", context.experts,
            "; expected the layer's expert count");
    auto& importance = state.importance.sum;
    importance.assign(static_cast<std::size_t>(context.experts), 0.0);
    for (std::size_t c = 0; c < routing.index.size(); ++c)
      if (!Routing<T>::is_empty(routing.index[c]))
        importance[static_cast<std::size_t>(routing.index[c])] += double(routing.weight[c]);
    state.importance.add_over_ranks(context);
  }

  template <Scalar T>
  T forward(ConstMatrixRef<T>, const BalanceContext&, State<T>& state) const {
    return T(state.importance.loss(options.coefficient));
  }

  template <Scalar T>
  void backward(ConstMatrixRef<T>, const BalanceContext&, State<T>&, MatrixRef<T>) const {}

  /// d(loss)/d(w_tk) = c · ∂CV²/∂Importance_{e_tk}, times D for the average over ranks.
  template <Scalar T>
  void weights_backward(const Routing<T>& routing, const BalanceContext& context, State<T>& state,
                        std::span<T> d_weight) const {
    state.importance.backward(options.coefficient, context);
    const auto& gradient = state.importance.gradient;
    for (std::size_t c = 0; c < routing.index.size(); ++c)
      if (!Routing<T>::is_empty(routing.index[c]))
        d_weight[c] += T(gradient[static_cast<std::size_t>(routing.index[c])]);
  }
};

/// The load loss: how unevenly the experts would be chosen, in expectation over noisy gating's
/// noise. For token t and expert i, with H the noisy logits, l the clean ones and s = softplus of
/// the noise logits (router.noise_weight's product),
///
///   P_ti = Φ((l_ti − θ_ti) / s_ti),   θ_ti = the K-th largest of H_t with H_ti left out,
///   Load_i = Σ_t P_ti,   L = c · CV(Load)²
///
/// — the probability that i is among the K chosen if only its own noise were drawn again. θ_ti is
/// the (K+1)-th largest H_t for a chosen i, the K-th for any other. The gradient reaches the clean
/// logits, the noise logits, and the noisy logits of the experts at the thresholds (as in the
/// authors' code). Needs a router with noisy gating (TopK's noisy_gating); at evaluation H = l.
struct LoadLoss {
  using policy_kind = balancer_kind;
  static constexpr std::string_view name = "LoadLoss";
  static constexpr bool assumes_top_k = true;  // P_ti is the chance of being in a token's top K

  struct Options {
    double coefficient = 0.1;  // c; Shazeer et al.: w_load = 0.1
  };
  Options options{};

  template <Scalar T>
  struct State {
    std::vector<Index> order;       // [T,K+1] each token's K + 1 largest H, largest first
    std::vector<double> block_load;  // [blocks,E] each block of tokens' share of Load
    detail::CvSquaredOfSum load;     // Load [E], and the loss's gradient in it
  };

  void validate(const LayerShape& shape) const {
    detail::require_coefficient(name, options.coefficient);
    require(shape.top_k < shape.experts, "moekit::LoadLoss: K = ", shape.top_k, " with ", shape.experts,
            " experts; expected K < experts (when every expert is chosen the load has no spread)");
  }

  /// Reads the noisy logits before the router scores them: each token's thresholds and Load.
  template <Scalar T>
  void noisy_logits(const NoisyLogits<T>& logits, const BalanceContext& context, State<T>& state) const {
    const Index tokens = logits.clean.rows(), experts = logits.clean.cols(), blocks = token_blocks(tokens);
    const auto width = static_cast<std::size_t>(experts), k = static_cast<std::size_t>(context.top_k);
    state.order.resize(static_cast<std::size_t>(tokens) * (k + 1));
    state.block_load.assign(static_cast<std::size_t>(blocks) * width, 0.0);
    for_each_token_block(tokens, [&](Index block, Index first, Index count) {
      double* load = &state.block_load[static_cast<std::size_t>(block) * width];
      for (Index t = first; t < first + count; ++t) {
        Index* order = ordered(logits, t, context, state);
        for (Index e = 0; e < experts; ++e) load[e] += Chance(logits, t, e, order, context).probability;
      }
    });
    state.load.sum.resize(width);
    sum_of_blocks(state.block_load, blocks, state.load.sum);
    state.load.add_over_ranks(context);
  }

  template <Scalar T>
  T forward(ConstMatrixRef<T>, const BalanceContext&, State<T>& state) const {
    return T(state.load.loss(options.coefficient));
  }

  template <Scalar T>
  void backward(ConstMatrixRef<T>, const BalanceContext&, State<T>&, MatrixRef<T>) const {}

  /// Adds dL/dP_ti · ∂P_ti/∂(l_ti, noise_ti, H at the threshold), times D for the average over ranks.
  template <Scalar T>
  void noisy_logits_backward(const NoisyLogits<T>& logits, const BalanceContext& context, State<T>& state,
                             MatrixRef<T> d_noisy, MatrixRef<T> d_clean, MatrixRef<T> d_noise) const {
    const Index tokens = logits.clean.rows(), experts = logits.clean.cols();
    state.load.backward(options.coefficient, context);
    const auto& gradient = state.load.gradient;
    const auto k = static_cast<std::size_t>(context.top_k);
    for_each_token(tokens, [&](Index t) {
      const Index* order = &state.order[static_cast<std::size_t>(t) * (k + 1)];
      for (Index e = 0; e < experts; ++e) {
        const Chance chance(logits, t, e, order, context);
        const double g = gradient[static_cast<std::size_t>(e)] * chance.density / chance.deviation;
        d_clean(t, e) += T(g);
        d_noise(t, e) += T(-g * chance.z * chance.deviation_slope);
        d_noisy(t, chance.threshold) += T(-g);
      }
    });
  }

 private:
  /// Token t's K + 1 largest noisy logits, largest first, kept in the state.
  template <Scalar T>
  static Index* ordered(const NoisyLogits<T>& logits, Index t, const BalanceContext& context, State<T>& state) {
    const auto k = static_cast<std::size_t>(context.top_k);
    Index* order = &state.order[static_cast<std::size_t>(t) * (k + 1)];
    detail::top_k_indices(logits.noisy.row(t).data(), logits.noisy.cols(), context.top_k + 1, order);
    return order;
  }

  /// P_ti and what its gradient needs.
  struct Chance {
    Index threshold;         // the expert whose H is θ_ti
    double deviation;        // s_ti = softplus(noise_ti)
    double deviation_slope;  // ds/dnoise = σ(noise_ti)
    double z;                // (l_ti − θ_ti) / s_ti
    double probability;      // Φ(z)
    double density;          // φ(z)

    template <Scalar T>
    Chance(const NoisyLogits<T>& logits, Index t, Index e, const Index* order, const BalanceContext& context) {
      const int k = context.top_k;
      bool chosen = false;
      for (int j = 0; j < k; ++j) chosen |= order[j] == e;
      threshold = order[chosen ? k : k - 1];
      const double noise = double(logits.noise(t, e));
      deviation = softplus(noise);
      deviation_slope = 1 / (1 + std::exp(-noise));
      z = (double(logits.clean(t, e)) - double(logits.noisy(t, threshold))) / deviation;
      probability = 0.5 * std::erfc(-z / std::numbers::sqrt2);
      density = std::exp(-0.5 * z * z) / std::sqrt(2 * std::numbers::pi);
    }
  };
};

static_assert(Balancer<ImportanceLoss>);
static_assert(Balancer<LoadLoss>);

}  // namespace moekit
