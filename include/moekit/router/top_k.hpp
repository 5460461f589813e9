#pragma once
#include <cmath>
#include <span>
#include <string_view>

#include <moekit/core/concepts.hpp>
#include <moekit/core/token_loops.hpp>
#include <moekit/core/detail/top_k.hpp>
#include <moekit/core/error.hpp>
#include <moekit/core/random.hpp>
#include <moekit/core/routing.hpp>

namespace moekit {

/// How a group of experts is scored for group-limited routing.
enum class GroupScore {
  top2_sum,  // the sum of its two best selection scores (DeepSeek-V3, topk_method "noaux_tc")
  max,       // its best selection score (DeepSeek-V2, "group_limited_greedy")
};

/// Score all E experts (softmax or sigmoid) and keep the K best per token. docs/policies/router.md#topk
///
/// weight_k = scale · s_k / (Σ_j s_j + 1e-20) with normalize, else scale · s_k, where s_k is the
/// score of the k-th chosen expert. Softmax with normalize equals a softmax over the K chosen
/// logits (Mixtral); softmax without it is Qwen2-MoE and Switch; sigmoid with it is DeepSeek-V3.
///
/// Group-limited (groups > 1, DeepSeek-V2/V3): the E experts form `groups` equal groups of
/// consecutive experts; each group is scored from the selection scores (GroupScore), the
/// `groups_kept` best groups are kept, and the K experts are the best of the masked selection
/// scores — a kept group's expert by its selection score, any other by 0, as transformers masks
/// them — so that with positive scores every choice lies in a kept group. Ties go to the lower
/// index. The weights still come from the plain scores, as above.
///
/// weight_at = WeightAt::input applies each weight to the expert's input rather than its output:
/// y = Σ_k expert_k(weight_k · x) (Llama 4), not Σ_k weight_k · expert_k(x).
///
/// jitter = ε > 0 multiplies, in training only, each element of the router's copy of x by a draw
/// from [1 − ε, 1 + ε) (Switch Transformer); the layer draws them (RouterJittersInput).
///
/// noisy_gating = true (Shazeer et al. 2017): in training the logits get noise of a learned scale,
/// H = x·W_gᵀ + n ⊙ softplus(x·W_nᵀ), n ~ N(0, 1) per token and expert, before they are scored;
/// the layer holds W_n (router.noise_weight, 0 at initialisation) and draws n
/// (RouterHasNoisyGating). Shazeer's gating is this with softmax and normalize (the default for
/// K > 1): a softmax over the K largest H.
///
/// random_second = θ > 0 (K = 2, GShard): in training, the second choice is kept with probability
/// min(1, p₂ / θ), p₂ = s₂ / (s₁ + s₂), and otherwise left empty; the first choice's weight is
/// what it would have been (not renormalised). The draw is the counter's (seed, step, token).
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
    int groups = 1;          // DeepSeek n_group: experts in this many equal groups; 1: no groups
    int groups_kept = 1;     // DeepSeek topk_group: the groups a token's experts come from
    GroupScore group_score = GroupScore::top2_sum;  // DeepSeek-V3's; max is DeepSeek-V2's
    WeightAt weight_at = WeightAt::output;  // Llama 4: input (the weight scales x into the expert)
    bool logit_bias = false;  // GPT-OSS: logits = x·Wᵀ + b, b the parameter router.logit_bias [E]
    double jitter = 0;        // Switch: 1e-2, the router's x times U[1 − jitter, 1 + jitter) in training
    double random_second = 0;  // GShard: 0.2 (θ); K = 2: the second expert kept with probability min(1, p₂/θ) in training
    bool noisy_gating = false;  // Shazeer: true; logits + N(0,1) ⊙ softplus(x·W_nᵀ) in training, W_n learned
    std::uint64_t seed = 0;   // of the jitter's, the second expert's and the logit noise's draws
  };
  static constexpr int max_groups = 64;
  Options options{};

  void validate(const LayerShape& shape) const {
    require(K <= shape.experts, "moekit::TopK: K = ", K, " but the layer has ",
            shape.experts, " experts; expected K <= experts");
    require(!(K == 1 && options.normalize),
            "moekit::TopK: K = 1 with normalize = true; every weight would be 1 and the "
            "router would get no gradient; set normalize = false (Switch routing)");
    require(std::isfinite(options.scale) && options.scale > 0,
            "moekit::TopK: scale = ", options.scale, "; expected a finite number > 0");
    require(options.jitter >= 0 && options.jitter < 1,
            "moekit::TopK: jitter = ", options.jitter, "; expected 0 <= jitter < 1 (Switch: 1e-2)");
    require(options.random_second >= 0 && std::isfinite(options.random_second), "moekit::TopK: random_second = ",
            options.random_second, "; expected a finite θ >= 0 (GShard: 0.2; 0: the second expert always kept)");
    require(options.random_second == 0 || K == 2, "moekit::TopK: random_second = ", options.random_second,
            " with K = ", K, "; expected K = 2 (GShard's random second expert is a top-2 rule)");
    if (options.groups == 1) return;
    const Index groups = options.groups, kept = options.groups_kept;
    require(groups >= 1 && groups <= max_groups && shape.experts % groups == 0, "moekit::TopK: groups = ", groups,
            " with ", shape.experts, " experts; expected a divisor of the experts, at most ", max_groups);
    const Index size = shape.experts / groups;
    require(kept >= 1 && kept <= groups && K <= kept * size, "moekit::TopK: groups_kept = ", kept, " of ", groups,
            " groups of ", size, " experts; expected 1 <= groups_kept <= groups and K = ", K,
            " <= groups_kept × experts per group");
    require(options.group_score != GroupScore::top2_sum || size >= 2, "moekit::TopK: group_score = top2_sum with ",
            size, " expert per group; expected at least 2 (or group_score = max)");
  }

  ScoreFn score_function() const { return options.score; }
  WeightAt weight_at() const { return options.weight_at; }
  bool logit_bias() const { return options.logit_bias; }
  InputJitter input_jitter() const { return {options.jitter, options.seed}; }
  bool draws() const { return options.random_second > 0; }
  NoisyGating noisy_gating() const { return {options.noisy_gating, options.seed}; }

  /// Logits → scores, row by row, in place.                                              [T,E]
  template <Scalar T>
  void score(MatrixRef<T> scores) const {
    score_logits<T>(options.score, scores);
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
      if (options.groups == 1)
        detail::top_k_indices(selection.row(t).data(), experts, K, index);
      else
        select_in_groups(selection.row(t).data(), experts, index);
      T sum = 0;
      for (int k = 0; k < K; ++k) sum += weight[k] = scores(t, index[k]);
      const T factor = options.normalize ? T(options.scale) / (sum + T(normalize_epsilon))
                                         : T(options.scale);
      for (int k = 0; k < K; ++k) weight[k] *= factor;
    });
  }

  /// select, then in training GShard's draw of each token's second expert (random_second).
  template <Scalar T>
  void select(ConstMatrixRef<T> selection, ConstMatrixRef<T> scores, const RouterContext& context,
              Routing<T>& out) const {
    select<T>(selection, scores, out);
    if (K != 2 || !context.training || options.random_second == 0) return;
    for_each_token(scores.rows(), [&](Index t) {
      Index* index = &out.index[static_cast<std::size_t>(t * K)];
      const double first = scores(t, index[0]), second = scores(t, index[1]);
      const double kept = second / (first + second + normalize_epsilon) / options.random_second;
      const RandomCounter counter{options.seed, context.step, context.first_token + t, 0, RandomStream::second_expert};
      if (random_uniform(counter) < kept) return;
      index[1] = Routing<T>::left_empty(index[1]);
      out.weight[static_cast<std::size_t>(t * K + 1)] = 0;
    });
  }

  /// The K experts of one token's selection row under group-limited routing (see above).
  template <Scalar T>
  void select_in_groups(const T* selection, Index experts, Index* index) const {
    const Index size = experts / options.groups;
    T group_value[max_groups];
    for (Index g = 0; g < options.groups; ++g) {
      const T* group = selection + g * size;
      Index best[2];
      const int take = options.group_score == GroupScore::top2_sum ? 2 : 1;
      detail::top_k_indices(group, size, take, best);
      group_value[g] = take == 2 ? group[best[0]] + group[best[1]] : group[best[0]];
    }
    Index kept_groups[max_groups];
    detail::top_k_indices(group_value, Index{options.groups}, options.groups_kept, kept_groups);
    bool kept[max_groups] = {};
    for (int g = 0; g < options.groups_kept; ++g) kept[kept_groups[g]] = true;
    detail::top_k_by(experts, K, [&](Index e) { return kept[e / size] ? selection[e] : T(0); }, index);
  }

  /// d(loss)/d(weight) → d(loss)/d(logits), overwriting d_logits. Only the weights carry
  /// gradient: the choice of experts does not.                                   [T,K] → [T,E]
  template <Scalar T>
  void backward(ConstMatrixRef<T> scores, const Routing<T>& routing,
                std::span<const T> d_weight, MatrixRef<T> d_logits) const {
    for_each_token(scores.rows(), [&](Index t) {
      // An empty choice's weight is a constant 0, but its passed-over expert still counts in the
      // normalisation of the others.
      Index index[K];
      T g[K];
      for (int k = 0; k < K; ++k) {
        const auto c = static_cast<std::size_t>(t * K + k);
        index[k] = Routing<T>::expert_of(routing.index[c]);
        g[k] = Routing<T>::is_empty(routing.index[c]) ? T(0) : d_weight[c];
      }
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
