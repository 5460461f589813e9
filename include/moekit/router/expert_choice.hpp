#pragma once
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <span>
#include <string_view>
#include <vector>

#include <moekit/core/concepts.hpp>
#include <moekit/core/detail/tiles.hpp>
#include <moekit/core/error.hpp>
#include <moekit/core/routing.hpp>
#include <moekit/core/token_loops.hpp>

namespace moekit {

/// Expert Choice routing (Zhou et al. 2022): each expert takes the C tokens that score it
/// highest, rather than each token its K experts. docs/policies/router.md#expertchoice
///
///   S = softmax over experts of x·Wᵀ                          [T,E]
///   expert e takes the C tokens t with the largest S_te,      C = ⌈T · capacity_factor / E⌉ (at most T)
///   y_t = Σ over the experts e that took t of S_te · expert_e(x_t)
///
/// Every expert gets exactly C tokens, so the load is even by construction and nothing is dropped;
/// a token may get no expert (its y is 0: the residual alone) or several, on average
/// capacity_factor. Ties go to the lower token. Over ranks, C and the choice are over the whole
/// batch, as one process would make them. The choice needs the whole batch: the routing is not
/// causal, so it is for training and scoring batches, not for decoding token by token.
///
/// A token's choices vary, so its Routing has one slot per expert ([T,E]): slot e is expert e if e
/// took the token, else left empty. The gradient reaches the logits through the chosen S_te (the
/// softmax's Jacobian over every expert), never through the choice itself.
struct ExpertChoice {
  using policy_kind = router_kind;
  static constexpr int top_k = 0;             // no fixed K per token:
  static constexpr bool choices_vary = true;  // each expert picks, so a token gets 0 to E experts
  static constexpr std::string_view name = "ExpertChoice";

  struct Options {
    double capacity_factor = 2.0;  // the paper's EC-CF2: tokens per expert = 2 · T / E, 2 experts per token on average
  };
  Options options{};

  void validate(const LayerShape&) const {
    require(std::isfinite(options.capacity_factor) && options.capacity_factor > 0,
            "moekit::ExpertChoice: capacity_factor = ", options.capacity_factor,
            "; expected a finite number > 0 (the paper's default: 2)");
  }

  ScoreFn score_function() const { return ScoreFn::softmax; }

  /// C, the tokens each expert takes from a batch of `tokens`: ⌈T · capacity_factor / E⌉ (as
  /// Capacity rounds: a product a hair above an integer, from binary fractions, is that integer),
  /// at most T.
  Index capacity(Index tokens, Index experts) const {
    const double exact = double(tokens) / double(experts) * options.capacity_factor;
    return std::min(tokens, static_cast<Index>(std::ceil(exact - 1e-9)));
  }

  /// Logits → scores: a softmax over each token's experts, in place.                      [T,E]
  template <Scalar T>
  void score(MatrixRef<T> scores) const {
    score_logits<T>(ScoreFn::softmax, scores);
  }

  /// Each expert's C tokens, the batch being these tokens alone.                      [T,E] → [T,E]
  template <Scalar T>
  void select(ConstMatrixRef<T> selection, ConstMatrixRef<T> scores, Routing<T>& out) const {
    take(selection, 0, selection.rows());
    write(scores, out);
  }

  /// Each expert's C tokens of the whole batch group (context.batch): every rank's selection
  /// scores gathered, the same choice made on each, this rank's tokens kept.
  template <Scalar T>
  void select(ConstMatrixRef<T> selection, ConstMatrixRef<T> scores, const RouterContext& context,
              Routing<T>& out) const {
    const BatchGroup& batch = *context.batch;
    if (batch.size() == 1) return select<T>(selection, scores, out);
    const Index experts = selection.cols();
    auto& [mine, all, counts] = scratch.gathered;
    mine.resize(static_cast<std::size_t>(selection.size()));
    for (Index t = 0; t < selection.rows(); ++t)
      for (Index e = 0; e < experts; ++e) mine[static_cast<std::size_t>(t * experts + e)] = double(selection(t, e));
    batch.gather(mine, all, counts);
    Index before = 0;  // tokens of the ranks before this one
    for (int r = 0; r < batch.rank(); ++r) before += counts[static_cast<std::size_t>(r)] / experts;
    const Eigen::Map<const Matrix<double>> whole(all.data(), static_cast<Index>(all.size()) / experts, experts);
    take(ConstMatrixRef<double>(whole), before, selection.rows());
    write(scores, out);
  }

  /// d(loss)/d(weight) → d(loss)/d(logits), overwriting d_logits: the softmax's Jacobian,
  /// d_logit_e = S_e · (g_e − Σ_j g_j · S_j), g_e the chosen slots' d_weight (0 for the others).
  template <Scalar T>
  void backward(ConstMatrixRef<T> scores, const Routing<T>& routing, std::span<const T> d_weight,
                MatrixRef<T> d_logits) const {
    const Index experts = scores.cols();
    for_each_token(scores.rows(), [&](Index t) {
      const std::size_t first = static_cast<std::size_t>(t * experts);
      T dot = 0;
      for (Index e = 0; e < experts; ++e)
        if (!Routing<T>::is_empty(routing.index[first + e])) dot += d_weight[first + e] * scores(t, e);
      for (Index e = 0; e < experts; ++e) {
        const T g = Routing<T>::is_empty(routing.index[first + e]) ? T(0) : d_weight[first + e];
        d_logits(t, e) = scores(t, e) * (g - dot);
      }
    });
  }

  /// Buffers of select, grown to the largest batch and reused, so that a forward allocates
  /// nothing once they have grown: the gathered scores over ranks, each expert's order of the
  /// batch's tokens, what each expert took. Public only so that the router stays an aggregate
  /// (ExpertChoice{{.capacity_factor = 2}}); not an option.
  struct Scratch {
    struct {
      std::vector<double> mine, all;
      std::vector<Index> counts;
    } gathered;
    std::vector<Index> order;          // [E, T_all]
    std::vector<unsigned char> taken;  // [T, E]
  };
  mutable Scratch scratch{};

 private:
  /// taken[t·E + e] for the tokens [first, first + count) of the batch `selection`: whether
  /// expert e takes token first + t, i.e. whether it is among e's C best (by score, then by the
  /// lower token). Experts in parallel.
  template <Scalar U>
  void take(ConstMatrixRef<U> selection, Index first, Index count) const {
    const Index tokens = selection.rows(), experts = selection.cols(), c = capacity(tokens, experts);
    auto& taken = scratch.taken;
    taken.assign(static_cast<std::size_t>(count * experts), 0);
    scratch.order.resize(static_cast<std::size_t>(experts * tokens));
    detail::for_each_index(experts, 1, [&](Index e) {
      const auto order = scratch.order.begin() + e * tokens;
      for (Index t = 0; t < tokens; ++t) order[t] = t;
      const auto before = [&](Index a, Index b) {
        return selection(a, e) > selection(b, e) || (selection(a, e) == selection(b, e) && a < b);
      };
      std::nth_element(order, order + c, order + tokens, before);
      for (Index i = 0; i < c; ++i) {
        const Index t = order[i] - first;
        if (t >= 0 && t < count) taken[static_cast<std::size_t>(t * experts + e)] = 1;
      }
    });
  }

  /// The routing from what each expert took: slot e is expert e with weight S_te, or left empty.
  template <Scalar T>
  void write(ConstMatrixRef<T> scores, Routing<T>& out) const {
    const auto& taken = scratch.taken;
    const Index tokens = scores.rows(), experts = scores.cols();
    out.resize(tokens, static_cast<int>(experts));
    for_each_token(tokens, [&](Index t) {
      for (Index e = 0; e < experts; ++e) {
        const auto c = static_cast<std::size_t>(t * experts + e);
        out.index[c] = taken[c] ? e : Routing<T>::left_empty(e);
        out.weight[c] = taken[c] ? scores(t, e) : T(0);
      }
    });
  }
};

static_assert(Router<ExpertChoice>);

}  // namespace moekit
