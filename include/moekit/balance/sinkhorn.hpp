#pragma once
#include <algorithm>
#include <cmath>
#include <string_view>
#include <vector>

#include <moekit/core/concepts.hpp>
#include <moekit/core/token_loops.hpp>
#include <moekit/core/error.hpp>

namespace moekit {

/// S-BASE: experts are chosen from the Sinkhorn-balanced plan of exp(logits), without gradient;
/// the combine weights stay the router's own. docs/policies/balance.md#sinkhorn
///
/// Megatron-Core's iteration, with u = 1_T, v = 1_E:
///   u_t = (1/T) / (Σ_j v_j·C_tj + 1e-8),   v_j = (1/E) / (Σ_t u_t·C_tj + 1e-8)
/// until mean|v − v_prev| ≤ tolerance; the plan is diag(u)·C·diag(v). Unlike Megatron-Core,
/// C = exp(l − max of the row) (a row scaling, which the plan absorbs), so logits of ±1e4 give
/// no overflow, and the iterations are capped, so no input hangs. Megatron-Core's weights:
/// TopK<K>{{.normalize = false}} (softmax over all E) for K > 1, TopK<1>{{.score = ScoreFn::sigmoid}}.
struct Sinkhorn {
  using policy_kind = balancer_kind;
  static constexpr std::string_view name = "Sinkhorn";
  static constexpr bool assumes_top_k = true;  // its plan is selected on for each token's top K

  struct Options {
    double tolerance = 1e-4;   // Megatron-Core's
    int max_iterations = 100;  // Megatron-Core has no cap
  };
  Options options{};

  template <Scalar T>
  struct State {
    std::vector<T> u, v, v_previous;  // [T], [E], [E]
    std::vector<T> block_column;      // [blocks,E] each block of tokens' share of the column sums
    std::vector<double> column;       // [E] Σ_t u_t·C_te, over the whole batch
    int iterations = 0;               // of the last plan
    bool converged = false;
  };

  void validate(const LayerShape&) const {
    require(std::isfinite(options.tolerance) && options.tolerance > 0 && options.max_iterations >= 1,
            "moekit::Sinkhorn: tolerance = ", options.tolerance, ", max_iterations = ",
            options.max_iterations, "; expected tolerance > 0 and max_iterations >= 1");
  }

  template <Scalar T>
  T forward(ConstMatrixRef<T>, const BalanceContext&, State<T>&) const {
    return T(0);
  }
  template <Scalar T>
  void backward(ConstMatrixRef<T>, const BalanceContext&, State<T>&, MatrixRef<T>) const {}

  /// On entry `selection` holds the logits; on return, the balanced plan (or, at evaluation, the
  /// plain scores, as Megatron-Core selects then). Over ranks, T and the column sums are the
  /// whole batch's, and every rank stops after the same iteration.                        [T,E]
  template <Scalar T>
  void select(ConstMatrixRef<T> scores, const BalanceContext& context, State<T>& state,
              MatrixRef<T> selection) const {
    if (!context.training) {
      selection = scores;
      return;
    }
    const BatchGroup& batch = *context.batch;
    const Index tokens = selection.rows(), experts = selection.cols();
    for_each_token(tokens, [&](Index t) {
      selection.row(t).array() = (selection.row(t).array() - selection.row(t).maxCoeff()).exp();
    });
    double batch_tokens = double(tokens);
    batch.sum(std::span<double>(&batch_tokens, 1));
    state.u.assign(static_cast<std::size_t>(tokens), T(1));
    state.v.assign(static_cast<std::size_t>(experts), T(1));
    state.column.resize(static_cast<std::size_t>(experts));
    const Index blocks = token_blocks(tokens);
    state.block_column.resize(static_cast<std::size_t>(blocks * experts));
    state.iterations = 0;
    state.converged = batch_tokens == 0;
    const T eps = T(1e-8), row_target = T(1) / T(std::max(batch_tokens, 1.0)),
            column_target = T(1) / T(experts);
    while (!state.converged && state.iterations < options.max_iterations) {
      // u from v, token by token; each block of tokens then adds up its share of Σ_t u_t·C_te.
      for_each_token_block(tokens, [&](Index block, Index first, Index count) {
        T* column = &state.block_column[static_cast<std::size_t>(block * experts)];
        std::fill(column, column + experts, T(0));
        for (Index t = first; t < first + count; ++t) {
          T sum = 0;
          for (Index e = 0; e < experts; ++e) sum += state.v[static_cast<std::size_t>(e)] * selection(t, e);
          const T u = state.u[static_cast<std::size_t>(t)] = row_target / (sum + eps);
          for (Index e = 0; e < experts; ++e) column[e] += u * selection(t, e);
        }
      });
      sum_of_blocks(state.block_column, blocks, state.column);
      if (batch.size() > 1) batch.sum(state.column);
      state.v_previous = state.v;
      for (Index e = 0; e < experts; ++e)
        state.v[static_cast<std::size_t>(e)] = column_target / (T(state.column[static_cast<std::size_t>(e)]) + eps);
      T change = 0;
      for (Index e = 0; e < experts; ++e)
        change += std::abs(state.v[static_cast<std::size_t>(e)] - state.v_previous[static_cast<std::size_t>(e)]);
      ++state.iterations;
      state.converged = change / T(experts) <= T(options.tolerance);
    }
    for_each_token(tokens, [&](Index t) {
      for (Index e = 0; e < experts; ++e)
        selection(t, e) *= state.u[static_cast<std::size_t>(t)] * state.v[static_cast<std::size_t>(e)];
    });
  }
};

static_assert(Balancer<Sinkhorn>);

}  // namespace moekit
