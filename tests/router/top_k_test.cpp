// TopK's laws: K distinct experts per token, best first; weights ≥ 0 that sum to `scale` when
// normalised; softmax + normalise equals a softmax over the chosen logits; and its gradient.
#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>
#include <random>
#include <set>

#include <moekit/router/top_k.hpp>

#include "../support/grad_check.hpp"
#include "../support/random.hpp"

namespace moekit::test {
namespace {

/// Logits of N(0, 2²).
Matrix<double> random_logits(Index tokens, Index experts, unsigned seed) { return random_matrix(tokens, experts, seed, 2.0); }

template <int K>
Routing<double> route(const TopK<K>& router, Matrix<double> scores) {
  router.score(MatrixRef<double>(scores));
  Routing<double> routing;
  router.select(ConstMatrixRef<double>(scores), ConstMatrixRef<double>(scores), routing);
  return routing;
}

TEST(TopK, ChoosesKDistinctExpertsBestFirst) {
  const TopK<3> router{};
  const auto logits = random_logits(50, 7, 1);
  const auto routing = route(router, logits);
  for (Index t = 0; t < 50; ++t) {
    std::set<Index> chosen;
    for (int k = 0; k < 3; ++k) chosen.insert(routing.index[static_cast<std::size_t>(t * 3 + k)]);
    EXPECT_EQ(chosen.size(), 3u);
    for (int k = 0; k + 1 < 3; ++k)
      EXPECT_GE(logits(t, routing.index[static_cast<std::size_t>(t * 3 + k)]),
                logits(t, routing.index[static_cast<std::size_t>(t * 3 + k + 1)]));
    // No expert left out scores higher than the last one chosen.
    for (Index e = 0; e < 7; ++e) {
      if (chosen.contains(e)) continue;
      EXPECT_LE(logits(t, e), logits(t, routing.index[static_cast<std::size_t>(t * 3 + 2)]));
    }
  }
}

TEST(TopK, TiesGoToTheLowerIndex) {
  const TopK<2> router{};
  Matrix<double> logits(1, 4);
  logits << 1.0, 3.0, 3.0, 3.0;
  const auto routing = route(router, logits);
  EXPECT_EQ(routing.index[0], 1);
  EXPECT_EQ(routing.index[1], 2);
}

TEST(TopK, SoftmaxNormalisedEqualsSoftmaxOverTheChosenLogits) {
  const TopK<2> router{};  // Mixtral
  const auto logits = random_logits(20, 8, 2);
  const auto routing = route(router, logits);
  for (Index t = 0; t < 20; ++t) {
    const double a = logits(t, routing.index[static_cast<std::size_t>(2 * t)]);
    const double b = logits(t, routing.index[static_cast<std::size_t>(2 * t + 1)]);
    EXPECT_NEAR(routing.weight[static_cast<std::size_t>(2 * t)], 1 / (1 + std::exp(b - a)), 1e-15);
    EXPECT_NEAR(routing.weight[static_cast<std::size_t>(2 * t)] + routing.weight[static_cast<std::size_t>(2 * t + 1)], 1.0, 1e-15);
  }
}

TEST(TopK, UnnormalisedWeightsAreTheScoresTimesScale) {
  const TopK<2> softmax{{.normalize = false}};  // Qwen2-MoE
  const TopK<2> sigmoid{{.score = ScoreFn::sigmoid, .normalize = false, .scale = 2.5}};
  const auto logits = random_logits(10, 6, 3);
  const auto a = route(softmax, logits), b = route(sigmoid, logits);
  for (Index t = 0; t < 10; ++t) {
    const Eigen::RowVectorXd p = (logits.row(t).array() - logits.row(t).maxCoeff()).exp().matrix();
    EXPECT_NEAR(a.weight[static_cast<std::size_t>(2 * t)], p(a.index[static_cast<std::size_t>(2 * t)]) / p.sum(), 1e-15);
    const double l = logits(t, b.index[static_cast<std::size_t>(2 * t + 1)]);
    EXPECT_NEAR(b.weight[static_cast<std::size_t>(2 * t + 1)], 2.5 / (1 + std::exp(-l)), 1e-14);
  }
}

TEST(TopK, SigmoidNormalisedWeightsSumToScale) {
  const TopK<4> router{{.score = ScoreFn::sigmoid, .normalize = true, .scale = 2.5}};  // DeepSeek-V3
  const auto routing = route(router, random_logits(10, 16, 4));
  for (Index t = 0; t < 10; ++t) {
    double sum = 0;
    for (int k = 0; k < 4; ++k) {
      EXPECT_GE(routing.weight[static_cast<std::size_t>(4 * t + k)], 0.0);
      sum += routing.weight[static_cast<std::size_t>(4 * t + k)];
    }
    EXPECT_NEAR(sum, 2.5, 1e-14);
  }
}

TEST(TopK, LogitsOfTenThousandGiveNoNaN) {
  const TopK<2> router{};
  Matrix<double> logits(2, 3);
  logits << 1e4, -1e4, 0, -1e4, -1e4, -1e4;
  const auto routing = route(router, logits);
  for (double w : routing.weight) EXPECT_TRUE(std::isfinite(w));
}

template <int K>
void expect_gradient_matches_differences(const TopK<K>& router, Index experts = 5) {
  // L = Σ g ⊙ weight(logits), differentiated in the logits.
  auto logits = random_logits(6, experts, 5);
  std::vector<double> g(static_cast<std::size_t>(6 * K));
  std::mt19937 rng(6);
  std::normal_distribution<double> draw;
  for (double& v : g) v = draw(rng);
  auto loss = [&](const Matrix<double>& l) {
    const auto r = route(router, l);
    double sum = 0;
    for (std::size_t i = 0; i < g.size(); ++i) sum += g[i] * r.weight[i];
    return sum;
  };
  Matrix<double> scores = logits;
  router.score(MatrixRef<double>(scores));
  const auto routing = route(router, logits);
  Matrix<double> d_logits(6, experts);
  router.backward(ConstMatrixRef<double>(scores), routing, std::span<const double>(g), MatrixRef<double>(d_logits));
  std::span<double> values(logits.data(), static_cast<std::size_t>(logits.size()));
  const auto numeric = numeric_gradient(values, [&] { return loss(logits); });
  for (std::size_t i = 0; i < numeric.size(); ++i)
    EXPECT_NEAR(d_logits.data()[i], numeric[i], 1e-8) << "logit " << i;
}

TEST(TopK, GradientMatchesFiniteDifferences) {
  expect_gradient_matches_differences(TopK<2>{});
  expect_gradient_matches_differences(TopK<2>{{.normalize = false}});
  expect_gradient_matches_differences(TopK<3>{{.score = ScoreFn::sigmoid, .normalize = true, .scale = 2.5}});
  expect_gradient_matches_differences(TopK<1>{{.score = ScoreFn::sigmoid}});
  expect_gradient_matches_differences(TopK<1>{});
}

/// Group-limited routing written from its rule (docs/policies/router.md#group-limited): group
/// scores from the selection, the best groups kept (ties to the lower index), the best K of the
/// selection with every expert outside them counted as 0, weights from the plain scores.
Routing<double> grouped_by_hand(const Matrix<double>& selection, const Matrix<double>& scores, int k, int groups,
                                int kept, GroupScore rule, bool normalize, double scale) {
  const Index tokens = selection.rows(), experts = selection.cols(), size = experts / groups;
  Routing<double> out;
  out.resize(tokens, k);
  auto best_first = [](std::vector<std::pair<double, Index>> v) {  // by value, then lower index
    std::stable_sort(v.begin(), v.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
    return v;
  };
  for (Index t = 0; t < tokens; ++t) {
    std::vector<std::pair<double, Index>> group_scores;
    for (Index g = 0; g < groups; ++g) {
      std::vector<std::pair<double, Index>> members;
      for (Index e = g * size; e < (g + 1) * size; ++e) members.emplace_back(selection(t, e), e);
      members = best_first(members);
      group_scores.emplace_back(rule == GroupScore::max ? members[0].first : members[0].first + members[1].first, g);
    }
    group_scores = best_first(group_scores);
    std::vector<bool> in_kept(static_cast<std::size_t>(groups), false);
    for (int g = 0; g < kept; ++g) in_kept[static_cast<std::size_t>(group_scores[static_cast<std::size_t>(g)].second)] = true;
    std::vector<std::pair<double, Index>> masked;
    for (Index e = 0; e < experts; ++e) masked.emplace_back(in_kept[static_cast<std::size_t>(e / size)] ? selection(t, e) : 0.0, e);
    masked = best_first(masked);
    double sum = 0;
    for (int j = 0; j < k; ++j) {
      const auto c = static_cast<std::size_t>(t * k + j);
      out.index[c] = masked[static_cast<std::size_t>(j)].second;
      sum += out.weight[c] = scores(t, out.index[c]);
    }
    for (int j = 0; j < k; ++j) out.weight[static_cast<std::size_t>(t * k + j)] *= normalize ? scale / (sum + 1e-20) : scale;
  }
  return out;
}

// Qwen3-MoE and OLMoE route as transformers' Qwen2MoeTopKRouter does: softmax over all E, the
// top-k, divided by their sum when norm_topk_prob (Qwen3-MoE: true; OLMoE: false). TopK with
// normalize = norm_topk_prob is that rule (its 1e-20 guard aside, below rounding).
TEST(TopK, Qwen3MoeAndOlmoeRoutingIsTopKWithTheirNormalisation) {
  const Matrix<double> logits = random_logits(30, 64, 21);
  for (const bool norm_topk_prob : {true, false}) {  // Qwen3-MoE, OLMoE (each 8 of 64 experts)
    const TopK<8> router{{.normalize = norm_topk_prob}};
    const auto routing = route(router, logits);
    for (Index t = 0; t < 30; ++t) {
      std::vector<double> p(64);
      const double m = logits.row(t).maxCoeff();
      double z = 0;
      for (Index e = 0; e < 64; ++e) z += p[static_cast<std::size_t>(e)] = std::exp(logits(t, e) - m);
      for (double& v : p) v /= z;
      std::vector<Index> order(64);
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(), [&](Index a, Index b) {
        return p[static_cast<std::size_t>(a)] > p[static_cast<std::size_t>(b)];
      });
      double sum = 0;
      for (int k = 0; k < 8; ++k) sum += p[static_cast<std::size_t>(order[static_cast<std::size_t>(k)])];
      for (int k = 0; k < 8; ++k) {
        const auto c = static_cast<std::size_t>(t * 8 + k);
        const double expected = p[static_cast<std::size_t>(order[static_cast<std::size_t>(k)])] / (norm_topk_prob ? sum : 1.0);
        EXPECT_EQ(routing.index[c], order[static_cast<std::size_t>(k)]);
        EXPECT_NEAR(routing.weight[c], expected, 1e-15);
      }
    }
  }
}

TEST(TopK, GroupLimitedRoutingFollowsItsRule) {
  // DeepSeek-V3: sigmoid, a selection bias (AuxFree's), group = sum of its top 2, normalised, × 2.5.
  const TopK<4> v3{{.score = ScoreFn::sigmoid, .normalize = true, .scale = 2.5, .groups = 4, .groups_kept = 2}};
  v3.validate({.hidden = 4, .ffn = 4, .experts = 16, .top_k = 4});
  Matrix<double> scores = random_logits(40, 16, 11);
  v3.score(MatrixRef<double>(scores));
  const Matrix<double> bias = random_logits(1, 16, 12) * 0.1;
  const Matrix<double> selection = scores + bias.replicate(40, 1);
  Routing<double> routing;
  v3.select(ConstMatrixRef<double>(selection), ConstMatrixRef<double>(scores), routing);
  const auto expected = grouped_by_hand(selection, scores, 4, 4, 2, GroupScore::top2_sum, true, 2.5);
  EXPECT_EQ(routing.index, expected.index);
  for (std::size_t c = 0; c < expected.weight.size(); ++c) EXPECT_NEAR(routing.weight[c], expected.weight[c], 1e-15);

  // DeepSeek-V2: softmax, a group scored by its best expert, not normalised.
  const TopK<3> v2{{.normalize = false, .groups = 4, .groups_kept = 3, .group_score = GroupScore::max}};
  Matrix<double> soft = random_logits(40, 16, 13);
  v2.score(MatrixRef<double>(soft));
  v2.select(ConstMatrixRef<double>(soft), ConstMatrixRef<double>(soft), routing);
  const auto by_hand = grouped_by_hand(soft, soft, 3, 4, 3, GroupScore::max, false, 1.0);
  EXPECT_EQ(routing.index, by_hand.index);
  for (std::size_t c = 0; c < by_hand.weight.size(); ++c) EXPECT_NEAR(routing.weight[c], by_hand.weight[c], 1e-15);
}

TEST(TopK, GroupLimitedRoutingCountsExpertsOutsideTheKeptGroupsAsZero) {
  // Biased selection scores can be negative: transformers then prefers an expert of a dropped
  // group (masked to 0) to a kept one below 0, and so does moekit.
  const TopK<2> router{{.score = ScoreFn::sigmoid, .groups = 2, .groups_kept = 1}};
  Matrix<double> selection(1, 4), scores(1, 4);
  selection << -0.5, -0.6, -0.9, -0.95;  // group 0 scores -1.1, group 1 -1.85: group 0 is kept
  scores << 0.5, 0.4, 0.2, 0.1;
  Routing<double> routing;
  router.select(ConstMatrixRef<double>(selection), ConstMatrixRef<double>(scores), routing);
  EXPECT_EQ(routing.index, (std::vector<Index>{2, 3}));
}

TEST(TopK, GroupLimitedGradientMatchesFiniteDifferences) {
  expect_gradient_matches_differences(
      TopK<4>{{.score = ScoreFn::sigmoid, .normalize = true, .scale = 2.5, .groups = 4, .groups_kept = 2}}, 16);
  expect_gradient_matches_differences(
      TopK<3>{{.normalize = false, .groups = 4, .groups_kept = 3, .group_score = GroupScore::max}}, 12);
}

TEST(TopK, RejectsImpossibleGroupsByName) {
  const LayerShape shape{.hidden = 4, .ffn = 4, .experts = 12, .top_k = 4};
  auto message = [&](const TopK<4>& router) {
    try {
      router.validate(shape);
    } catch (const error& e) {
      return std::string(e.what());
    }
    return std::string("(no error)");
  };
  EXPECT_EQ(message(TopK<4>{{.groups = 5}}),
            "moekit::TopK: groups = 5 with 12 experts; expected a divisor of the experts, at most 64");
  EXPECT_EQ(message(TopK<4>{{.groups = 6, .groups_kept = 1}}),
            "moekit::TopK: groups_kept = 1 of 6 groups of 2 experts; expected 1 <= groups_kept <= groups and K = 4 "
            "<= groups_kept × experts per group");
  EXPECT_EQ(message(TopK<4>{{.groups = 12, .groups_kept = 6}}),
            "moekit::TopK: group_score = top2_sum with 1 expert per group; expected at least 2 (or group_score = max)");
  EXPECT_EQ(message(TopK<4>{{.groups = 12, .groups_kept = 6, .group_score = GroupScore::max}}), "(no error)");
}

TEST(TopK, RejectsImpossibleSettingsByName) {
  const LayerShape shape{.hidden = 4, .ffn = 4, .experts = 3, .top_k = 4};
  EXPECT_THROW(TopK<4>{}.validate(shape), error);
  try {
    TopK<4>{}.validate(shape);
  } catch (const error& e) {
    EXPECT_STREQ(e.what(), "moekit::TopK: K = 4 but the layer has 3 experts; expected K <= experts");
  }
  EXPECT_THROW(TopK<1>{{.normalize = true}}.validate(shape), error);
  EXPECT_THROW(TopK<2>{{.scale = 0.0}}.validate(shape), error);
  EXPECT_NO_THROW(TopK<1>{}.validate(shape));  // Switch: unnormalised by default
}

}  // namespace
}  // namespace moekit::test
