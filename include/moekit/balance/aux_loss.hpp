#pragma once
#include <cmath>
#include <string_view>
#include <vector>

#include <moekit/core/concepts.hpp>
#include <moekit/core/token_loops.hpp>
#include <moekit/core/detail/top_k.hpp>
#include <moekit/core/error.hpp>

namespace moekit {

/// The Switch/GShard load-balancing loss as Megatron-Core computes it. docs/policies/balance.md#auxloss
///
///   L = c · E / (K · T²) · Σ_i n_i · Σ_t s̃_ti
///
/// s̃ is the softmax over all E logits (for sigmoid routers, σ(l) / Σ_e σ(l_e)); n_i counts the
/// tokens whose plain top-K of s̃ holds expert i. At uniform routing L = c. The counts carry no
/// gradient; s̃ does, into every logit of every token. Over ranks, n, Σ_t s̃ and T are the whole
/// batch's (BalanceContext::batch), so L is the loss one process would compute for it.
struct AuxLoss {
  using policy_kind = balancer_kind;
  static constexpr std::string_view name = "AuxLoss";
  static constexpr bool assumes_top_k = true;  // f_i counts each token's top K

  struct Options {
    double coefficient = 1e-2;  // c
  };
  Options options{};

  template <Scalar T>
  struct State {
    std::vector<Index> counts;  // [E] n_i
    std::vector<T> column_sum;  // [E] Σ_t s̃_ti
    Index batch_tokens = 0;     // T: of the whole batch, over every rank
    // Each block of tokens' own: its share of the sums, a row of s̃ (sigmoid routers), a top-K.
    std::vector<Index> block_counts;  // [blocks,E]
    std::vector<T> block_sums;        // [blocks,E]
    std::vector<T> normalized;        // [blocks,E]
    std::vector<Index> chosen;        // [blocks,K]
    std::vector<double> packed;       // [2E+1] what the batch sums
  };

  void validate(const LayerShape&) const {
    require(std::isfinite(options.coefficient) && options.coefficient >= 0,
            "moekit::AuxLoss: coefficient = ", options.coefficient,
            "; expected a finite number >= 0");
  }

  template <Scalar T>
  T forward(ConstMatrixRef<T> scores, const BalanceContext& context, State<T>& state) const {
    const Index tokens = scores.rows(), experts = scores.cols(), blocks = token_blocks(tokens);
    const auto width = static_cast<std::size_t>(experts), k = static_cast<std::size_t>(context.top_k);
    state.block_counts.assign(static_cast<std::size_t>(blocks) * width, 0);
    state.block_sums.assign(static_cast<std::size_t>(blocks) * width, T(0));
    state.normalized.resize(static_cast<std::size_t>(blocks) * width);
    state.chosen.resize(static_cast<std::size_t>(blocks) * k);
    for_each_token_block(tokens, [&](Index block, Index first, Index count) {
      const auto b = static_cast<std::size_t>(block);
      Index* counts = &state.block_counts[b * width];
      T* sums = &state.block_sums[b * width];
      Index* chosen = &state.chosen[b * k];
      for (Index t = first; t < first + count; ++t) {
        const T* row = normalized_row(scores, t, context, &state.normalized[b * width]);
        detail::top_k_indices(row, experts, context.top_k, chosen);
        for (std::size_t i = 0; i < k; ++i) ++counts[chosen[i]];
        for (Index e = 0; e < experts; ++e) sums[e] += row[e];
      }
    });
    state.counts.resize(width);
    state.column_sum.resize(width);
    sum_of_blocks(state.block_counts, blocks, state.counts);
    sum_of_blocks(state.block_sums, blocks, state.column_sum);
    state.batch_tokens = tokens;
    if (context.batch->size() > 1) sum_over_batch(*context.batch, state);
    if (state.batch_tokens == 0) return T(0);
    T sum = 0;
    for (Index e = 0; e < experts; ++e)
      sum += T(state.counts[static_cast<std::size_t>(e)]) * state.column_sum[static_cast<std::size_t>(e)];
    return scale<T>(state.batch_tokens, experts, context) * sum;
  }

  template <Scalar T>
  void backward(ConstMatrixRef<T> scores, const BalanceContext& context, State<T>& state,
                MatrixRef<T> d_logits) const {
    const Index tokens = scores.rows(), experts = scores.cols();
    if (tokens == 0) return;
    const T c = scale<T>(state.batch_tokens, experts, context) * T(context.batch->size());
    auto g = [&](Index e) { return c * T(state.counts[static_cast<std::size_t>(e)]); };  // dL/ds̃_e
    state.normalized.resize(static_cast<std::size_t>(token_blocks(tokens) * experts));
    for_each_token_block(tokens, [&](Index block, Index first, Index count) {
      T* row = &state.normalized[static_cast<std::size_t>(block * experts)];
      for (Index t = first; t < first + count; ++t) {
        const T* s = normalized_row(scores, t, context, row);
        T dot = 0;
        for (Index e = 0; e < experts; ++e) dot += s[e] * g(e);
        if (context.score == ScoreFn::softmax) {
          for (Index e = 0; e < experts; ++e) d_logits(t, e) += s[e] * (g(e) - dot);
        } else {
          // s̃ = σ / Z: quotient rule, then σ' = σ(1 − σ).
          const T z = scores.row(t).sum();
          for (Index e = 0; e < experts; ++e) {
            const T sigma = scores(t, e);
            d_logits(t, e) += (g(e) - dot) / z * sigma * (T(1) - sigma);
          }
        }
      }
    });
  }

 private:
  /// n_i, Σ_t s̃_ti and T of the whole batch, from every rank's share.
  template <Scalar T>
  static void sum_over_batch(const BatchGroup& batch, State<T>& state) {
    const std::size_t experts = state.counts.size();
    state.packed.resize(2 * experts + 1);
    for (std::size_t e = 0; e < experts; ++e) {
      state.packed[e] = double(state.counts[e]);
      state.packed[experts + e] = double(state.column_sum[e]);
    }
    state.packed[2 * experts] = double(state.batch_tokens);
    batch.sum(state.packed);
    for (std::size_t e = 0; e < experts; ++e) {
      state.counts[e] = static_cast<Index>(state.packed[e]);
      state.column_sum[e] = T(state.packed[experts + e]);
    }
    state.batch_tokens = static_cast<Index>(state.packed[2 * experts]);
  }

  template <Scalar T>
  T scale(Index tokens, Index experts, const BalanceContext& context) const {
    return T(options.coefficient) * T(experts) /
           (T(context.top_k) * T(tokens) * T(tokens));
  }

  /// Row t of s̃: the scores themselves for softmax routers, else written into `row` (E elements).
  template <Scalar T>
  static const T* normalized_row(ConstMatrixRef<T> scores, Index t, const BalanceContext& context, T* row) {
    if (context.score == ScoreFn::softmax) return scores.row(t).data();
    const T z = scores.row(t).sum();
    for (Index e = 0; e < scores.cols(); ++e) row[e] = scores(t, e) / z;
    return row;
  }
};

static_assert(Balancer<AuxLoss>);

}  // namespace moekit
