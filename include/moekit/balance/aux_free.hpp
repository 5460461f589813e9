#pragma once
#include <cmath>
#include <span>
#include <string_view>
#include <utility>
#include <vector>

#include <moekit/core/concepts.hpp>
#include <moekit/core/token_loops.hpp>
#include <moekit/core/error.hpp>

namespace moekit {

/// DeepSeek-V3's auxiliary-loss-free balancing. docs/policies/balance.md#auxfree
///
/// A per-expert bias b is added to the scores for **selection only**: the combine weights come
/// from the unbiased scores, b gets no gradient and no optimizer touches it. The layer counts the
/// tokens each expert actually received (after any drops); at each step boundary, which the
/// training loop marks with `layer.end_step()`,
///
///   b_i ← b_i + rate · sign(mean load − load_i)     (sign(0) = 0)
///
/// and the counts restart. b saves and loads with the layer as "router.bias" (saved, restore).
struct AuxFree {
  using policy_kind = balancer_kind;
  static constexpr std::string_view name = "AuxFree";
  static constexpr bool assumes_top_k = true;  // its bias shifts each expert's selection score, which an expert's own pick of tokens ignores

  struct Options {
    double rate = 1e-3;  // u; DeepSeek-V3: 1e-3
  };
  Options options{};

  template <Scalar T>
  struct State {
    std::vector<double> bias;   // [E] b, kept in double whatever T is
    std::vector<Index> counts;  // [E] tokens received since the last step, on this rank
    std::vector<double> load;   // [E] the counts of the whole batch, at the step
  };

  void validate(const LayerShape&) const {
    require(std::isfinite(options.rate) && options.rate >= 0, "moekit::AuxFree: rate = ",
            options.rate, "; expected a finite number >= 0");
  }

  template <Scalar T>
  T forward(ConstMatrixRef<T>, const BalanceContext&, State<T>&) const {
    return T(0);  // no loss term
  }
  template <Scalar T>
  void backward(ConstMatrixRef<T>, const BalanceContext&, State<T>&, MatrixRef<T>) const {}

  /// selection = scores + b, row by row (whatever selection held on entry).           [T,E]
  template <Scalar T>
  void select(ConstMatrixRef<T> scores, const BalanceContext&, State<T>& state,
              MatrixRef<T> selection) const {
    ensure_size(state, scores.cols());
    for_each_token(scores.rows(), [&](Index t) {
      for (Index e = 0; e < scores.cols(); ++e)
        selection(t, e) = scores(t, e) + T(state.bias[static_cast<std::size_t>(e)]);
    });
  }

  /// The tokens each expert received in this forward, after drops.
  template <Scalar T>
  void routed(std::span<const Index> load, State<T>& state) const {
    ensure_size(state, static_cast<Index>(load.size()));
    for (std::size_t e = 0; e < load.size(); ++e) state.counts[e] += load[e];
  }

  /// The state that saves and loads with the layer's parameters: b, as "router.bias" [E] (the
  /// name in Hugging Face's DeepSeek-V3 files); nothing before the first forward.
  static constexpr std::string_view saved_name = "router.bias";
  template <Scalar T>
  std::span<const double> saved(const State<T>& state) const {
    return state.bias;
  }
  /// b from a file, checked to be [E] by the layer; the counts restart.
  template <Scalar T>
  void restore(std::vector<double> bias, State<T>& state) const {
    state.counts.assign(bias.size(), 0);
    state.bias = std::move(bias);
  }

  /// The step boundary: move the bias toward even load, then restart the counts. The load is
  /// the whole batch's, summed over every rank, so every rank moves its bias the same way.
  template <Scalar T>
  void step(const BalanceContext& context, State<T>& state) const {
    if (state.counts.empty()) return;
    state.load.assign(state.counts.begin(), state.counts.end());
    context.batch->sum(state.load);
    double mean = 0;
    for (double n : state.load) mean += n;
    mean /= double(state.load.size());
    for (std::size_t e = 0; e < state.counts.size(); ++e) {
      const double gap = mean - state.load[e];
      state.bias[e] += options.rate * double((gap > 0) - (gap < 0));
      state.counts[e] = 0;
    }
  }

 private:
  template <Scalar T>
  static void ensure_size(State<T>& state, Index experts) {
    if (static_cast<Index>(state.bias.size()) == experts) return;
    state.bias.assign(static_cast<std::size_t>(experts), 0.0);
    state.counts.assign(static_cast<std::size_t>(experts), 0);
  }
};

static_assert(Balancer<AuxFree>);

}  // namespace moekit
