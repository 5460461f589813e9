// TopK's laws: K distinct experts per token, best first; weights ≥ 0 that sum to `scale` when
// normalised; softmax + normalise equals a softmax over the chosen logits; and its gradient.
#include <gtest/gtest.h>

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
void expect_gradient_matches_differences(const TopK<K>& router) {
  // L = Σ g ⊙ weight(logits), differentiated in the logits.
  auto logits = random_logits(6, 5, 5);
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
  Matrix<double> d_logits(6, 5);
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
