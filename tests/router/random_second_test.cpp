// GShard's random second expert (TopK<2>'s random_second = θ): in training the second choice is
// kept with probability min(1, p₂/θ), p₂ = s₂/(s₁ + s₂), else left empty; the rest is top-2.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>

#include <moekit/router/top_k.hpp>

#include "../support/errors.hpp"
#include "../support/grad_check.hpp"
#include "../support/random.hpp"

namespace moekit::test {
namespace {

/// The router's scores for logits of N(0, 1).
Matrix<double> scores_of(const TopK<2>& router, Index tokens, Index experts, unsigned seed) {
  Matrix<double> scores = random_matrix(tokens, experts, seed);
  router.score(MatrixRef<double>(scores));
  return scores;
}

Routing<double> drawn(const TopK<2>& router, const Matrix<double>& scores, RouterContext context) {
  Routing<double> routing;
  router.select(ConstMatrixRef<double>(scores), ConstMatrixRef<double>(scores), context, routing);
  return routing;
}

Routing<double> plain(const TopK<2>& router, const Matrix<double>& scores) {
  Routing<double> routing;
  router.select(ConstMatrixRef<double>(scores), ConstMatrixRef<double>(scores), routing);
  return routing;
}

/// p₂ / θ, capped at 1: the chance that token t keeps its second expert.
double keep_chance(const Matrix<double>& scores, const Routing<double>& top2, Index t, double theta) {
  const double first = scores(t, top2.index[static_cast<std::size_t>(2 * t)]);
  const double second = scores(t, top2.index[static_cast<std::size_t>(2 * t + 1)]);
  return std::min(1.0, second / (first + second) / theta);
}

// Over 20000 tokens the kept count is a sum of independent Bernoulli(p_t): it must lie within five
// standard deviations of Σ p_t (at θ = 0.5 that is 2.3% of it: a rule 5% off falls outside).
TEST(RandomSecond, KeptAtTheStatedRateOverManyTokens) {
  for (const double theta : {0.2, 0.5, 0.9}) {
    const TopK<2> router{{.random_second = theta, .seed = 4}};
    const Matrix<double> scores = scores_of(router, 20000, 8, 1);
    const Routing<double> top2 = plain(router, scores), routing = drawn(router, scores, {.step = 3});
    double expected = 0, variance = 0, kept = 0, certain_and_dropped = 0;
    for (Index t = 0; t < scores.rows(); ++t) {
      const double p = keep_chance(scores, top2, t, theta);
      expected += p, variance += p * (1 - p);
      const bool is_kept = !Routing<double>::is_empty(routing.index[static_cast<std::size_t>(2 * t + 1)]);
      kept += is_kept;
      certain_and_dropped += p == 1.0 && !is_kept;
    }
    EXPECT_NEAR(kept, expected, 5 * std::sqrt(variance)) << "θ = " << theta;
    EXPECT_EQ(certain_and_dropped, 0) << "θ = " << theta;
    EXPECT_LT(kept, double(scores.rows())) << "θ = " << theta << ": nothing was dropped";
  }
}

// The first choice and every kept second are top-2's, weights and all; an empty second names the
// expert it passed over as ~e and weighs 0; the first's weight is not renormalised.
TEST(RandomSecond, OnlyTheSecondChoiceChangesAndOnlyToEmpty) {
  const TopK<2> router{{.random_second = 0.5, .seed = 1}};
  const Matrix<double> scores = scores_of(router, 500, 6, 2);
  const Routing<double> top2 = plain(router, scores), routing = drawn(router, scores, {});
  int empty = 0;
  for (std::size_t c = 0; c < routing.index.size(); ++c) {
    if (Routing<double>::is_empty(routing.index[c])) {
      ++empty;
      EXPECT_EQ(c % 2, 1u) << "only a second choice may be left empty";
      EXPECT_EQ(Routing<double>::expert_of(routing.index[c]), top2.index[c]);
      EXPECT_EQ(routing.weight[c], 0.0);
    } else {
      EXPECT_EQ(routing.index[c], top2.index[c]);
      EXPECT_EQ(routing.weight[c], top2.weight[c]);
    }
  }
  EXPECT_GT(empty, 0);
}

// Draws are the counter's: evaluation draws nothing; a step draws the same numbers every time
// and the next step others; a batch cut in two (as over ranks, each part told its first token)
// draws what the whole batch draws.
TEST(RandomSecond, DrawsFollowTheCounter) {
  const TopK<2> router{{.random_second = 0.5, .seed = 7}};
  const Matrix<double> scores = scores_of(router, 400, 6, 3);
  const Routing<double> evaluation = drawn(router, scores, {.training = false});
  EXPECT_EQ(evaluation.index, plain(router, scores).index);
  EXPECT_EQ(evaluation.weight, plain(router, scores).weight);

  const Routing<double> whole = drawn(router, scores, {.step = 2});
  EXPECT_EQ(drawn(router, scores, {.step = 2}).index, whole.index);
  EXPECT_NE(drawn(router, scores, {.step = 3}).index, whole.index);
  EXPECT_NE(drawn(TopK<2>{{.random_second = 0.5, .seed = 8}}, scores, {.step = 2}).index, whole.index);

  const Routing<double> head = drawn(router, scores.topRows(150), {.step = 2});
  const Routing<double> tail = drawn(router, scores.bottomRows(250), {.step = 2, .first_token = 150});
  std::vector<Index> parts = head.index;
  parts.insert(parts.end(), tail.index.begin(), tail.index.end());
  EXPECT_EQ(parts, whole.index);
}

// L = Σ g ⊙ weight; an empty choice's weight is a constant 0 (its g is ignored), but its expert
// still normalises the first's weight, so the first's weight has a gradient in both scores.
TEST(RandomSecond, GradientMatchesFiniteDifferences) {
  for (const auto& options : {TopK<2>::Options{.random_second = 0.6, .seed = 2},
                              TopK<2>::Options{.score = ScoreFn::sigmoid, .scale = 2.5, .random_second = 0.6, .seed = 2}}) {
    const TopK<2> router{options};
    Matrix<double> logits = random_matrix(8, 5, 5, 2.0);
    std::vector<double> g(16);
    std::mt19937 rng(6);
    std::normal_distribution<double> draw;
    for (double& v : g) v = draw(rng);
    const RouterContext context{.step = 1};
    auto route = [&](const Matrix<double>& l) {
      Matrix<double> scores = l;
      router.score(MatrixRef<double>(scores));
      return std::pair{scores, drawn(router, scores, context)};
    };
    const auto [scores, routing] = route(logits);
    int empty = 0;
    for (Index i : routing.index) empty += Routing<double>::is_empty(i);
    ASSERT_GT(empty, 0) << "the test needs an empty choice";
    Matrix<double> d_logits(8, 5);
    router.backward(ConstMatrixRef<double>(scores), routing, std::span<const double>(g), MatrixRef<double>(d_logits));
    std::span<double> values(logits.data(), static_cast<std::size_t>(logits.size()));
    const auto numeric = numeric_gradient(values, [&] {
      const auto r = route(logits).second;
      double sum = 0;
      for (std::size_t i = 0; i < g.size(); ++i) sum += g[i] * r.weight[i];
      return sum;
    });
    for (std::size_t i = 0; i < numeric.size(); ++i) EXPECT_NEAR(d_logits.data()[i], numeric[i], 1e-8) << "logit " << i;
  }
}

TEST(RandomSecond, ImpossibleSettingsAreRefusedByName) {
  const LayerShape shape{.hidden = 4, .ffn = 4, .experts = 6, .top_k = 3};
  EXPECT_EQ(message_of([&] { TopK<3>{{.random_second = 0.2}}.validate(shape); }),
            "moekit::TopK: random_second = 0.2 with K = 3; expected K = 2 (GShard's random second expert is a top-2 rule)");
  EXPECT_EQ(message_of([&] { TopK<2>{{.random_second = -1}}.validate(shape); }),
            "moekit::TopK: random_second = -1; expected a finite θ >= 0 (GShard: 0.2; 0: the second expert always kept)");
}

}  // namespace
}  // namespace moekit::test
