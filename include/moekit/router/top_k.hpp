#pragma once
#include <cmath>
#include <span>
#include <string_view>

#include <moekit/core/concepts.hpp>
#include <moekit/core/token_loops.hpp>
#include <moekit/core/detail/top_k.hpp>
#include <moekit/core/error.hpp>
#include <moekit/core/routing.hpp>

namespace moekit {

/// Score all E experts (softmax or sigmoid) and keep the K best per token. docs/policies/router.md#topk
///
/// weight_k = scale · s_k / (Σ_j s_j + 1e-20) with normalize, else scale · s_k, where s_k is the
/// score of the k-th chosen expert. Softmax with normalize equals a softmax over the K chosen
/// logits (Mixtral); softmax without it is Qwen2-MoE and Switch; sigmoid with it is DeepSeek-V3.
template <int K>
struct TopK {
  static_assert(K >= 1, "moekit::TopK<K>: K must be at least 1 (TopK<1> is Switch routing)");
  using policy_kind = router_kind;
  static constexpr int top_k = K;
  static constexpr std::string_view name = "TopK";
  static constexpr double normalize_epsilon = 1e-20;

  struct Options {
    ScoreFn score = ScoreFn::softmax;
    bool normalize = K > 1;  // Mixtral, DeepSeek-V3: true; Qwen2-MoE, Switch: false
    double scale = 1.0;      // DeepSeek-V3: 2.5
  };
  Options options{};

  void validate(const LayerShape& shape) const {
    require(K <= shape.experts, "moekit::TopK: K = ", K, " but the layer has ",
            shape.experts, " experts; expected K <= experts");
    require(!(K == 1 && options.normalize),
            "moekit::TopK: K = 1 with normalize = true; every weight would be 1 and the "
            "router would get no gradient; set normalize = false (Switch routing)");
    require(std::isfinite(options.scale) && options.scale > 0,
            "moekit::TopK: scale = ", options.scale, "; expected a finite number > 0");
  }

  ScoreFn score_function() const { return options.score; }

  /// Logits → scores, row by row, in place.                                              [T,E]
  template <Scalar T>
  void score(MatrixRef<T> scores) const {
    for_each_token(scores.rows(), [&](Index t) {
      auto row = scores.row(t);
      if (options.score == ScoreFn::softmax) {
        row.array() = (row.array() - row.maxCoeff()).exp();  // max first: no overflow at any logit
        row /= row.sum();
      } else {
        row.array() = (T(1) + (-row.array()).exp()).inverse();
      }
    });
  }

  /// Top-K of `selection` (the scores, or the balancer's biased or balanced version of them);
  /// weights from `scores`.                                                        [T,E] → [T,K]
  template <Scalar T>
  void select(ConstMatrixRef<T> selection, ConstMatrixRef<T> scores, Routing<T>& out) const {
    const Index tokens = scores.rows(), experts = scores.cols();
    out.resize(tokens, K);
    for_each_token(tokens, [&](Index t) {
      Index* index = &out.index[static_cast<std::size_t>(t * K)];
      T* weight = &out.weight[static_cast<std::size_t>(t * K)];
      detail::top_k_indices(selection.row(t).data(), experts, K, index);
      T sum = 0;
      for (int k = 0; k < K; ++k) sum += weight[k] = scores(t, index[k]);
      const T factor = options.normalize ? T(options.scale) / (sum + T(normalize_epsilon))
                                         : T(options.scale);
      for (int k = 0; k < K; ++k) weight[k] *= factor;
    });
  }

  /// d(loss)/d(weight) → d(loss)/d(logits), overwriting d_logits. Only the weights carry
  /// gradient: the choice of experts does not.                                   [T,K] → [T,E]
  template <Scalar T>
  void backward(ConstMatrixRef<T> scores, const Routing<T>& routing,
                std::span<const T> d_weight, MatrixRef<T> d_logits) const {
    for_each_token(scores.rows(), [&](Index t) {
      const Index* index = &routing.index[static_cast<std::size_t>(t * K)];
      const T* g = &d_weight[static_cast<std::size_t>(t * K)];
      T d_score[K];  // d(loss)/d(s_k)
      if (options.normalize) {
        T sum = T(normalize_epsilon), dot = 0;
        for (int k = 0; k < K; ++k) {
          sum += scores(t, index[k]);
          dot += g[k] * scores(t, index[k]);
        }
        for (int k = 0; k < K; ++k) d_score[k] = T(options.scale) * (g[k] / sum - dot / (sum * sum));
      } else {
        for (int k = 0; k < K; ++k) d_score[k] = T(options.scale) * g[k];
      }
      if (options.score == ScoreFn::softmax) {
        // Softmax Jacobian: d_logit_e = s_e · (d_score_e − Σ_k d_score_k · s_k).
        T dot = 0;
        for (int k = 0; k < K; ++k) dot += d_score[k] * scores(t, index[k]);
        d_logits.row(t) = -dot * scores.row(t);
        for (int k = 0; k < K; ++k) d_logits(t, index[k]) += d_score[k] * scores(t, index[k]);
      } else {
        d_logits.row(t).setZero();
        for (int k = 0; k < K; ++k) {
          const T s = scores(t, index[k]);
          d_logits(t, index[k]) = d_score[k] * s * (T(1) - s);
        }
      }
    });
  }
};

/// Switch Transformer routing: one expert per token, weighted by its unnormalised score.
using Switch = TopK<1>;

static_assert(Router<TopK<2>>);

}  // namespace moekit
