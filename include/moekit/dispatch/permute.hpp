#pragma once
// The permutation a Plan describes, between the batch's tokens x [T,H] and the experts' rows
// [S,H] (one contiguous block per expert): gather, combine, and their backward. Every dispatcher
// shares it: a dispatcher decides the plan, this moves the rows. docs/policies/dispatch.md
#include <cstddef>
#include <span>
#include <vector>

#include <moekit/core/detail/tiles.hpp>
#include <moekit/core/routing.hpp>
#include <moekit/core/tensor.hpp>

namespace moekit {

/// Rows the permutation's loops take at once; each row's work is independent of the blocking.
inline constexpr Index permute_block = 256;

/// body(choice, slot) for each of token t's choices that the plan kept, in order: its number in
/// the routing (t·K + k) and its row in the experts' blocks.
template <class Body>
void for_each_kept_choice(const Plan& plan, Index t, Body body) {
  for (int k = 0; k < plan.top_k; ++k) {
    const auto choice = static_cast<std::size_t>(t * plan.top_k + k);
    if (const Index slot = plan.slot[choice]; slot != Plan::no_slot) body(choice, slot);
  }
}

namespace detail {

/// Prefetches the rows of m that token t's kept choices went to: for the loops that sum each
/// token's rows, which lie in its experts' blocks, where the hardware's prefetcher cannot guess
/// them (docs/kernels.md#combine).
template <class M>
void fetch_rows_of(const Plan& plan, Index t, const M& m) {
  for_each_kept_choice(plan, t, [&](std::size_t, Index slot) {
    const char* line = reinterpret_cast<const char*>(m.row(slot).data());
    for (Index b = 0; b < m.cols() * Index{sizeof(typename M::Scalar)}; b += 64) __builtin_prefetch(line + b);
  });
}

}  // namespace detail

/// rows[r] = x[token of row r], times the choice's weight when `weight` is given (weights that
/// scale the experts' input, WeightAt::input); a padding row is zero.           [T,H] → [S,H]
template <Scalar T>
void gather(const Plan& plan, ConstMatrixRef<T> x, MatrixRef<T> rows, std::span<const T> weight = {}) {
  detail::for_each_index(plan.rows(), permute_block, [&](Index r) {
    const Index choice = plan.source[static_cast<std::size_t>(r)];
    if (choice == Plan::no_slot)
      rows.row(r).setZero();
    else if (weight.empty())
      rows.row(r) = x.row(choice / plan.top_k);
    else
      rows.row(r) = weight[static_cast<std::size_t>(choice)] * x.row(choice / plan.top_k);
  });
}

/// The weights' part of gather's backward when they scaled the input: rows_r = w_c · x_t, so
/// d_weight_c = ⟨d_rows_r, x_t⟩ and d_rows_r becomes w_c · d_rows_r, the gradient of x_t's copy
/// (scatter_add then adds it into dx).
template <Scalar T>
void weighted_gather_backward(const Plan& plan, std::span<const T> weight, ConstMatrixRef<T> x,
                              MatrixRef<T> d_rows, std::span<T> d_weight) {
  detail::for_each_index(plan.rows(), permute_block, [&](Index r) {
    const Index choice = plan.source[static_cast<std::size_t>(r)];
    if (choice == Plan::no_slot) return;
    const auto c = static_cast<std::size_t>(choice);
    d_weight[c] = d_rows.row(r).dot(x.row(choice / plan.top_k));
    d_rows.row(r) *= weight[c];
  });
}

/// y[t] = Σ_k weight[t·K + k] · out[slot of (t, k)] over t's kept choices (every weight 1 when
/// `weight` is empty: they scaled the input); a token with none gets zero. The first term is
/// written, the others added; the next token's rows are fetched meanwhile.     [S,H] → [T,H]
template <Scalar T>
void combine(const Plan& plan, std::span<const T> weight, ConstMatrixRef<T> out, MatrixRef<T> y) {
  const Index tokens = plan.tokens;
  detail::for_each_index(tokens, permute_block, [&](Index t) {
    if (t + 1 < tokens) detail::fetch_rows_of(plan, t + 1, out);
    auto row = y.row(t);
    bool written = false;
    for_each_kept_choice(plan, t, [&](std::size_t choice, Index slot) {
      if (weight.empty() && written)
        row += out.row(slot);
      else if (weight.empty())
        row = out.row(slot);
      else if (written)
        row += weight[choice] * out.row(slot);
      else
        row = weight[choice] * out.row(slot);
      written = true;
    });
    if (!written) row.setZero();
  });
}

/// combine's backward. y_t = Σ_k w_tk · out_slot, so d_out_slot = w_tk · dy_t and
/// d_weight_tk = ⟨dy_t, out_slot⟩. Each row of out is read once, then overwritten by its
/// gradient; a dropped choice's d_weight stays as it was (the caller zeroes it). With `weight`
/// empty (unit weights) d_out_slot = dy_t and d_weight is not touched.
template <Scalar T>
void combine_backward(const Plan& plan, std::span<const T> weight, ConstMatrixRef<T> dy,
                      MatrixRef<T> out_then_d_out, std::span<T> d_weight) {
  detail::for_each_index(plan.rows(), permute_block, [&](Index r) {
    const Index choice = plan.source[static_cast<std::size_t>(r)];
    if (choice == Plan::no_slot) {
      out_then_d_out.row(r).setZero();
      return;
    }
    const auto token = dy.row(choice / plan.top_k);
    if (weight.empty()) {
      out_then_d_out.row(r) = token;
      return;
    }
    d_weight[static_cast<std::size_t>(choice)] = token.dot(out_then_d_out.row(r));
    out_then_d_out.row(r) = weight[static_cast<std::size_t>(choice)] * token;
  });
}

/// gather's backward for tokens [first, first + count): dx[t] += Σ d_rows[slot] over t's kept
/// choices. Run on one thread, by the caller's block of tokens.
template <Scalar T>
void scatter_add(const Plan& plan, ConstMatrixRef<T> d_rows, Index first, Index count, MatrixRef<T> dx) {
  for (Index t = first; t < first + count; ++t) {
    if (t + 1 < plan.tokens) detail::fetch_rows_of(plan, t + 1, d_rows);
    for_each_kept_choice(plan, t, [&](std::size_t, Index slot) { dx.row(t) += d_rows.row(slot); });
  }
}

/// load[e] = the choices of expert e that the plan kept (padding rows not counted).
inline void count_kept(const Plan& plan, std::span<const Index> index, std::vector<Index>& load) {
  load.assign(static_cast<std::size_t>(plan.experts), 0);
  for (std::size_t choice = 0; choice < plan.slot.size(); ++choice)
    if (plan.slot[choice] != Plan::no_slot) ++load[static_cast<std::size_t>(index[choice])];
}

}  // namespace moekit
